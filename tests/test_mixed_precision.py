"""bfloat16 compute (``model.dtype=bfloat16``): the trained state stays float32.

The ViT computes its matmuls in bfloat16 while parameters stay float32; the
SD-LoRA step must then still keep the current factors, the magnitudes, the
head and the optimiser state in float32 and update them by close to what a
float32 step does (a bfloat16 update would lose the small steps of a late
task).
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sl
from slora_jax.models import vit
from slora_jax.runner import methods
from slora_jax.runner import steps as steps_lib
from slora_jax.runner.methods import base

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=32, depth=2,
                    num_heads=2, mlp_dim=64)


def _state(params, capacity=4, rank=2):
  ad = sl.init_adapters(params, sl.vit_qv_rules(CFG.qkv), capacity=capacity,
                        max_rank=rank)
  for i in range(2):                    # two stored directions, then a task
    ad = sl.begin_task(ad, jax.random.key(i), rank)
    tr = jax.tree.map(lambda x, k=jax.random.key(50 + i):
                      x + 0.1 * jax.random.normal(k, x.shape), ad.trainable)
    ad, _ = sl.end_task(ad.replace(trainable=tr))
  ad = sl.begin_task(ad, jax.random.key(9), rank)
  cur = jax.tree.map(lambda x: x + 0.05, ad.trainable["current"])
  return ad.replace(trainable=dict(ad.trainable, current=cur))


def _one_step(dtype, params, ad, head, batch):
  """The runner's SD-LoRA step on a ViT computing in ``dtype``."""
  cfg = dataclasses.replace(CFG, dtype=dtype)
  exp = types.SimpleNamespace(train=types.SimpleNamespace(momentum=0.9))
  run = base.Run(exp=exp, settings=None, seed=0,
                 model=vit.VisionTransformer(cfg), model_config=cfg,
                 backbone_template=params, width=CFG.width, num_classes=6,
                 num_phases=3)
  method = methods.get_method("sdlora")
  arrays = jax.tree.map(jnp.copy, {"adapters": ad, "head": head})
  state = steps_lib.TrainState(arrays,
                               steps_lib.init_opt_state(method, run, arrays))
  new, _ = steps_lib.make_train_step(method, run)(
      state, batch, steps_lib.task_args(0, 0, 6, 0.1), params)
  return (sl.trainable_params(new.arrays["adapters"], new.arrays["head"]),
          new.opt_state)


def test_bf16_step_keeps_float32_state_and_float32_sized_updates():
  params = vit.VisionTransformer(CFG).init(
      jax.random.key(0), jnp.ones((1, 16, 16, 3)))["params"]
  ad, head = _state(params), sl.init_head(jax.random.key(1), CFG.width, 6)
  batch = {"image": jax.random.uniform(jax.random.key(2), (8, 16, 16, 3)),
           "label": jnp.arange(8) % 6, "mask": jnp.ones((8,))}
  before = sl.trainable_params(ad, head)
  f32, f32_opt = _one_step(jnp.float32, params, ad, head, batch)
  bf16, bf16_opt = _one_step(jnp.bfloat16, params, ad, head, batch)
  for leaf in jax.tree.leaves((bf16, bf16_opt)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
  checked = 0
  for path, b, u32, u16 in zip(
      [jax.tree_util.keystr(p) for p, _ in
       jax.tree_util.tree_leaves_with_path(before)],
      jax.tree.leaves(before), jax.tree.leaves(f32), jax.tree.leaves(bf16)):
    d32, d16 = np.asarray(u32 - b), np.asarray(u16 - b)
    if not np.any(d32):
      continue                          # e.g. magnitudes of empty slots
    # The update itself, not the updated value, must be float32-accurate to
    # within bfloat16 compute noise (a few %); a bf16-rounded *value* would
    # drop updates 1000x smaller than the weight.
    rel = np.linalg.norm(d16 - d32) / np.linalg.norm(d32)
    assert rel < 0.1, (path, rel)
    checked += 1
  assert checked >= 10      # A, B of 4 maps, magnitudes, head kernel, bias
  # The magnitudes of both stored directions and of the current one moved.
  mags = bf16["adapters"]["magnitudes"]
  old = before["adapters"]["magnitudes"]
  assert np.all(np.asarray(mags["previous"][:2] != old["previous"][:2]))
  assert float(mags["current"]) != float(old["current"])
