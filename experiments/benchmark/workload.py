"""What is timed: a ViT with random weights, its batches, SD-LoRA states.

Nothing is trained: weights, batches and stored directions are random draws
at realistic scales, with fixed seeds, so every run times the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sl
from slora_jax.models import vit
from slora_jax.runner import steps

from experiments.benchmark.settings import Settings


def random_params(cfg, seed: int = 0) -> dict:
  """ViT parameters drawn on the host (no compiled initialiser needed).

  Kernels and embeddings ~ N(0, 0.02²), LayerNorm scales 1, biases 0: the
  scale of a pre-trained ViT, so no denormals or overflow distort timings.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    if "bias" in name:
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.02, leaf.shape).astype(np.float32))

  return jax.tree_util.tree_map_with_path(draw, vit.abstract_params(cfg))


def fresh_copy(tree):
  """New buffers for ``tree``, so a donating step cannot delete the originals."""
  return jax.tree.map(jnp.copy, tree)


class TaskOps:
  """Jitted begin_task / end_task, and storing a random direction with them.

  One compilation each serves the simulated run and the state building.
  """

  def __init__(self, rank: int):
    self.begin = jax.jit(lambda ad, key: sl.begin_task(ad, key, rank))
    self.end = jax.jit(lambda ad: sl.end_task(ad)[0])

    def randomize(adapters, key):
      current = adapters.trainable["current"]
      keys = jax.random.split(key, len(current))
      current = {name: {"A": f["A"],
                        "B": 0.02 * jax.random.normal(k, f["B"].shape)}
                 for k, (name, f) in zip(keys, sorted(current.items()))}
      return adapters.replace(trainable=dict(adapters.trainable,
                                             current=current))
    self.randomize = jax.jit(randomize)

  def store_random(self, adapters, key):
    """Begins a task, draws a random non-zero B, ends it: one more slot used."""
    k_begin, k_b = jax.random.split(key)
    return self.end(self.randomize(self.begin(adapters, k_begin), k_b))


class Workload:
  """The model, backbone, head, optimiser and batches every timed step shares."""

  def __init__(self, s: Settings, cfg: vit.ViTConfig | None = None):
    self.settings = s
    self.cfg = cfg or s.vit_config()
    self.model = vit.VisionTransformer(self.cfg)
    self.backbone = random_params(self.cfg)
    self.rules = sl.vit_qv_rules(self.cfg.qkv)
    self._rng = np.random.default_rng(0)
    self._classes_per_task = s.num_classes // s.sim_tasks
    self.lr = np.float32(0.01)
    self.tx = steps.make_optimizer()
    self.head0 = sl.init_head(jax.random.key(1), self.cfg.width, s.num_classes)

  def apply(self, params, images):
    return self.model.apply({"params": params}, images)

  def batch_for(self, task: int) -> dict:
    """A fresh random batch whose labels are classes of ``task``."""
    s, lo = self.settings, task * self._classes_per_task
    shape = (s.batch, self.cfg.image_size, self.cfg.image_size, 3)
    return {"image": jnp.asarray(self._rng.uniform(0, 1, shape), jnp.float32),
            "label": jnp.asarray(self._rng.integers(
                lo, lo + self._classes_per_task, s.batch), jnp.int32),
            "mask": jnp.ones((s.batch,), jnp.float32)}

  def images(self, n: int):
    """``n`` random images at the model's input size."""
    size = self.cfg.image_size
    return jnp.asarray(self._rng.uniform(0, 1, (n, size, size, 3)),
                       jnp.float32)

  def bounds(self, task: int) -> tuple:
    """The class range ``[lo, hi)`` of ``task``, as the step takes it."""
    return (np.int32(task * self._classes_per_task),
            np.int32((task + 1) * self._classes_per_task))

  def make_step(self):
    """A new jitted SD-LoRA train step (`slora_jax.runner.steps`)."""
    return steps.make_train_step(self.apply, self.settings.num_classes,
                                 self.tx,
                                 adapter_form=self.settings.adapter_form)

  def init_adapters(self, capacity: int):
    return sl.init_adapters(self.backbone, self.rules, capacity=capacity,
                            max_rank=self.settings.rank)


class SDLoRA:
  """The SD-LoRA train step, its capacity template and states to time it on."""

  def __init__(self, w: Workload):
    self.w = w
    self.step = w.make_step()
    self.template = w.init_adapters(w.settings.capacity)
    self.ops = TaskOps(w.settings.rank)
    self.opt_init = jax.jit(w.tx.init)
    self._key = jax.random.key(7)

  def simulate(self, num_tasks: int):
    """A run of begin_task / one step / end_task per task; the final adapters."""
    w = self.w
    # The step donates its inputs: keep the template's buffers out of it.
    adapters = self.template.replace(frozen=fresh_copy(self.template.frozen))
    head = fresh_copy(w.head0)
    for task in range(num_tasks):
      adapters = self.ops.begin(adapters, jax.random.key(100 + task))
      opt_state = self.opt_init(sl.trainable_params(adapters, head))
      adapters, head, opt_state, _ = self.step(
          adapters, head, opt_state, w.backbone, w.batch_for(task),
          *w.bounds(task), w.lr)
      adapters = self.ops.end(adapters)
    return jax.block_until_ready(adapters)

  def stored_states(self, tasks) -> dict:
    """``{t: template with t random directions stored}`` for sorted ``tasks``."""
    built, state, t_done = {}, self.template, 0
    for t in tasks:
      for i in range(t_done, t):
        state = self.ops.store_random(state, jax.random.key(10_000 + i))
      t_done, built[t] = t, state
    return built

  def ready(self, stored) -> tuple:
    """``(adapters, head, opt_state)`` for a task begun after ``stored``.

    Fresh buffers throughout, since the step donates (deletes) its inputs.
    """
    ad = self.ops.begin(stored, self._key)
    ad = ad.replace(frozen=fresh_copy(ad.frozen))
    head = fresh_copy(self.w.head0)
    return ad, head, self.opt_init(sl.trainable_params(ad, head))
