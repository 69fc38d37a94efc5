"""What is timed: a ViT with random weights, its batches, SD-LoRA states.

Nothing is trained: weights, batches and stored directions are random draws
at realistic scales, with fixed seeds, so every run times the same values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sl
from slora_jax.methods import inflora as inflora_lib
from slora_jax.models import vit
from slora_jax.runner import config as config_lib
from slora_jax.runner import methods
from slora_jax.runner import steps
from slora_jax.runner.methods import base as methods_base
from slora_jax.runner.methods import inflora as inflora_method

from experiments.benchmark.settings import Settings
from experiments.configs import base as base_config


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


def experiment(s: Settings, cfg: vit.ViTConfig) -> config_lib.Experiment:
  """The runner's config of an SD-LoRA run of the timed ViT ``cfg`` (the
  plug-in reads its momentum, rank, capacity and semantics)."""
  c = base_config.base()
  c.method = "sdlora"
  c.model.update(name="custom", init="random", weights="", **{
      k: getattr(cfg, k) for k in ("image_size", "patch_size", "width",
                                   "depth", "num_heads", "mlp_dim", "qkv")})
  c.model.dtype = jnp.dtype(cfg.dtype).name
  c.adapter.update(rank=s.rank, capacity=s.capacity)
  return config_lib.from_config(c)


class Workload:
  """The model, backbone, head, run and batches every timed step shares."""

  def __init__(self, s: Settings, cfg: vit.ViTConfig | None = None):
    self.settings = s
    self.cfg = cfg or s.vit_config()
    self.model = vit.VisionTransformer(self.cfg)
    self.backbone = random_params(self.cfg)
    self.rules = sl.vit_qv_rules(self.cfg.qkv)
    self._rng = np.random.default_rng(0)
    self._classes_per_task = s.num_classes // s.sim_tasks
    self.lr = np.float32(0.01)
    self.method = dataclasses.replace(methods.get_method("sdlora"),
                                      adapter_form=s.adapter_form)
    self.run = methods_base.Run(
        exp=experiment(s, self.cfg), settings=None, seed=0, model=self.model,
        model_config=self.cfg, backbone_template=None, width=self.cfg.width,
        num_classes=s.num_classes, num_phases=s.sim_tasks)
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

  def bounds(self, task: int) -> tuple[int, int]:
    """The class range ``[lo, hi)`` of ``task``."""
    return task * self._classes_per_task, (task + 1) * self._classes_per_task

  def task(self, task: int) -> dict:
    """The step's traced task values (index, class range, rate) of ``task``."""
    return steps.task_args(task, *self.bounds(task), self.lr)

  def make_step(self):
    """A new jitted SD-LoRA train step (`slora_jax.runner.steps`)."""
    return steps.make_train_step(self.method, self.run)

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
    self.opt_init = jax.jit(
        lambda arrays: steps.init_opt_state(w.method, w.run, arrays))
    self._key = jax.random.key(7)

  def train_state(self, adapters, head) -> steps.TrainState:
    """The step's state: the plug-in's arrays and a fresh optimiser state."""
    arrays = {"adapters": adapters, "head": head}
    return steps.TrainState(arrays, self.opt_init(arrays))

  def simulate(self, num_tasks: int):
    """A run of begin_task / one step / end_task per task; the final adapters."""
    w = self.w
    # The step donates its inputs: keep the template's buffers out of it.
    adapters = self.template.replace(frozen=fresh_copy(self.template.frozen))
    head = fresh_copy(w.head0)
    for task in range(num_tasks):
      adapters = self.ops.begin(adapters, jax.random.key(100 + task))
      state, _ = self.step(self.train_state(adapters, head), w.batch_for(task),
                           w.task(task), w.backbone)
      adapters = self.ops.end(state.arrays["adapters"])
      head = state.arrays["head"]
    return jax.block_until_ready(adapters)

  def stored_states(self, tasks) -> dict:
    """``{t: template with t random directions stored}`` for sorted ``tasks``."""
    built, state, t_done = {}, self.template, 0
    for t in tasks:
      for i in range(t_done, t):
        state = self.ops.store_random(state, jax.random.key(10_000 + i))
      t_done, built[t] = t, state
    return built

  def ready(self, stored) -> steps.TrainState:
    """The step's state for a task begun after ``stored``.

    Fresh buffers throughout, since the step donates (deletes) its inputs.
    """
    ad = self.ops.begin(stored, self._key)
    ad = ad.replace(frozen=fresh_copy(ad.frozen))
    return self.train_state(ad, fresh_copy(self.w.head0))


class InfLoRA:
  """InfLoRA's train step (the runner's, over its plug-in) at the same model,
  rank and batch, and its states after t tasks.

  After a task InfLoRA merges ``B·A`` into the kernels, so its state after t
  tasks is the backbone with t rank-r updates merged (random ones here, B as
  `TaskOps.randomize` draws it, A with orthonormal rows over √3 as designed),
  whose shapes do not depend on t; the current task's A is then designed by
  the plug-in's `before_task` from one batch's inputs.
  """

  def __init__(self, w: Workload):
    self.w = w
    self.method = inflora_method.InfLoRA()
    # The plug-in reads its own settings (its defaults at --rank), not exp.
    self.run = dataclasses.replace(
        w.run, settings=inflora_method.InfLoRASettings(rank=w.settings.rank))
    self.step = steps.make_train_step(self.method, self.run)
    self.targets = inflora_lib.find_targets(w.backbone)
    self._merge = jax.jit(self._merge_random)

  def _merge_random(self, params, key):
    r = self.w.settings.rank
    a, b = {}, {}
    for k, t in zip(jax.random.split(key, len(self.targets)), self.targets):
      k_a, k_b = jax.random.split(k)
      if t.path not in a:     # one A per layer, shared by its targets
        q, _ = jnp.linalg.qr(jax.random.normal(k_a, (t.d_in, r)))
        a[t.path] = q.T / jnp.sqrt(3.0)
      b[t.name] = 0.02 * jax.random.normal(k_b, (t.d_out, r))
    return inflora_lib.apply_lora(params, self.targets, a, b)

  def merged_states(self, tasks) -> dict:
    """``{t: the plug-in's initial state with t random updates merged}``."""
    state = self.method.init(self.run, self.w.backbone)
    built, params, t_done = {}, state.arrays["params"], 0
    for t in tasks:
      for i in range(t_done, t):
        params = self._merge(params, jax.random.key(20_000 + i))
      t_done = t
      built[t] = dataclasses.replace(
          state, arrays={**state.arrays, "params": params})
    return built

  def ready(self, merged: methods_base.MethodState) -> steps.TrainState:
    """The step's state for the task after ``merged`` (A designed)."""
    w, batch = self.w, self.w.batch_for(0)
    task = methods_base.Task(0, *w.bounds(0), 1, 1, lambda: iter([batch]),
                             lambda: iter([batch]))
    ms = self.method.before_task(self.run, merged, task, w.backbone)
    arrays = fresh_copy(ms.arrays)
    return steps.TrainState(
        arrays, steps.init_opt_state(self.method, self.run, arrays))
