"""The method registry and what each method trains."""

import jax
import numpy as np
import pytest

import slora_jax as sl
from experiments.configs import base
from slora_jax.models import vit
from slora_jax.runner import config as config_lib
from slora_jax.runner import methods
from slora_jax.runner import steps

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1,
                    num_heads=2, mlp_dim=32)


def _tree():
  params = vit.init_params(CFG, jax.random.key(0))
  ad = sl.init_adapters(params, sl.vit_qv_rules(), capacity=2, max_rank=2)
  ad = sl.begin_task(ad, jax.random.key(1), 2)
  return sl.trainable_params(ad, sl.init_head(jax.random.key(2), 16, 4))


def _run(method, settings=None):
  c = base.base()
  c.method = method.name
  c.model.name = "custom"
  c.model.image_size, c.model.patch_size = 16, 8
  c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 16, 1, 2, 32
  c.model.qkv = "fused"
  c.adapter.rank = 2
  exp = config_lib.from_config(c)
  return methods.base.Run(
      exp=exp, settings=settings or exp.methods.get(method.name), seed=0,
      model=vit.VisionTransformer(CFG), model_config=CFG,
      backbone_template=None, width=16, num_classes=4, num_phases=2)


def _moved(a, b):
  return any(bool(np.any(np.asarray(x) != np.asarray(y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_each_method_updates_exactly_what_it_trains(name):
  """One generic step moves the method's trainable leaves and nothing else."""
  m = methods.get_method(name)
  run = _run(m)
  params = vit.init_params(CFG, jax.random.key(0))
  state = m.init(run, params)
  arrays = state.arrays
  if name == "inflora":   # before_task reads data: a designed-like A instead
    arrays = {**arrays, "a": jax.tree.map(
        lambda a: jax.random.normal(jax.random.key(3), a.shape) / 8,
        arrays["a"])}
  elif hasattr(m, "direction_per_task"):
    ad = sl.begin_task(arrays["adapters"], jax.random.key(1), 2)
    # B ≠ 0, so the magnitudes get a gradient in the first step already.
    cur = jax.tree.map(lambda x: x + 0.1, ad.trainable["current"])
    arrays = {**arrays, "adapters": ad.replace(
        trainable={**ad.trainable, "current": cur})}
  tree = m.trainable(arrays)
  if not jax.tree.leaves(tree):
    assert m.epochs(run.exp) == 0        # nothing to train: no step taken
    return
  batch = {"image": jax.random.normal(jax.random.key(4), (4, 16, 16, 3)),
           "label": np.array([0, 1, 0, 1], np.int32),
           "mask": np.ones((4,), np.float32)}
  train = steps.TrainState(arrays, steps.init_opt_state(m, run, arrays))
  step = steps.make_train_step(m, run)
  new, metrics = step(jax.tree.map(np.array, train), batch,
                      steps.task_args(0, 0, 2, 0.1), params)
  assert np.isfinite(float(metrics["loss"]))
  moved_tree = m.trainable(new.arrays)
  assert _moved(tree, moved_tree)
  # Every leaf outside the trainable subtree is unchanged.
  frozen_old = m.with_trainable(arrays, jax.tree.map(np.zeros_like, tree))
  frozen_new = m.with_trainable(new.arrays, jax.tree.map(np.zeros_like, tree))
  assert not _moved(frozen_old, frozen_new)
  if hasattr(m, "trains_magnitudes"):
    mags = lambda a: a["adapters"].trainable["magnitudes"]
    assert _moved(mags(arrays), mags(new.arrays)) == (
        m.trains_magnitudes and m.trains_adapters)
    cur = lambda a: a["adapters"].trainable["current"]
    assert _moved(cur(arrays), cur(new.arrays)) == m.trains_adapters


def test_methods_fix_the_policy_they_need():
  c = base.base()
  c.method = "seq_lora"
  pol = config_lib.from_config(c).policy()
  assert pol.magnitude_init == 1.0 and not pol.reset_magnitudes
  c.method = "sdlora"
  assert config_lib.from_config(c).policy().magnitude_init == 0.8
  assert methods.get_method("joint").capacity(0, 1) == 1
  assert methods.get_method("sdlora").capacity(0, 7) == 7
  with pytest.raises(ValueError, match="unknown method 'lora'; choose one of"):
    methods.get_method("lora")


def test_rank_reduction_follows_the_schedule():
  c = base.base()
  c.method = "sdlora_rr"
  exp = config_lib.from_config(c)
  assert [exp.rank(t) for t in (0, 3, 4, 7, 8, 19)] == [10, 10, 8, 8, 6, 6]
  c.method = "sdlora"
  assert config_lib.from_config(c).rank(19) == 10


LOOP_MODULES = ("train", "steps", "session", "config", "report", "evaluators",
                "dry_run", "sweep")


def test_the_loop_names_no_method():
  """A method is a plug-in: the loop's modules never compare or special-case
  a method by name (docstrings included)."""
  import os
  import re
  root = os.path.dirname(methods.__file__)
  for module in LOOP_MODULES:
    with open(os.path.join(os.path.dirname(root), module + ".py")) as f:
      text = f.read()
    for name in methods.METHODS:
      assert not re.search(rf"\b{name}\b", text), (module, name)
