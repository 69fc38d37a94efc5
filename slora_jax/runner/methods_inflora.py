"""InfLoRA as a `method_api.MethodPlugin` (not yet wired into the loop).

Per task: the covariance of every adapted layer's inputs over the task's
training batches designs A (earlier subspace projected out); B for k and v and
the head train (Adam, the official per-epoch cosine); B·A is merged into the
kernels; the covariance of the trained model grows the DualGPM memory.
Hyper-parameters per benchmark: `PRESETS` (docs/methods.md).
"""

from __future__ import annotations

import dataclasses
import math
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slora_jax import head as head_lib
from slora_jax.methods import inflora
from slora_jax.runner.method_api import MethodState, Task

__all__ = ["InfLoRAConfig", "PRESETS", "InfLoRA", "cosine_epoch_schedule"]


@dataclasses.dataclass(frozen=True)
class InfLoRAConfig:
  """InfLoRA's hyper-parameters (names as the official JSON configs').

  Attributes:
    rank: r of A and B.
    lamb, lame: the memory threshold goes from ``lamb`` (task 0) towards
      ``lame``: ``(lame − lamb)·t/num_tasks + lamb``.
    dual: DualGPM (True) or plain GPM (the DomainNet runs).
    optim: 'adam' (cosine per epoch) or 'sgd' (momentum 0.9, step decay).
    init_lr, init_epochs: task 0; lr, epochs: later tasks.
    fc_lr: the head's lr under 'sgd' (None: ``lr``).
    milestones, lr_decay: 'sgd' step decay at these epochs.
  """
  rank: int = 10
  lamb: float = 0.95
  lame: float = 1.0
  dual: bool = True
  optim: str = "adam"
  init_lr: float = 5e-4
  init_epochs: int = 20
  lr: float = 5e-4
  epochs: int = 20
  fc_lr: float | None = None
  milestones: tuple[int, ...] = ()
  lr_decay: float = 0.1


_INR = InfLoRAConfig(lamb=0.98, init_epochs=50, epochs=50)
# ViT-B/16 (IN-21k) runs, batch 128, from the official configs/*.json.
PRESETS = {
    "cifar100_10": InfLoRAConfig(),
    "imagenet_r_5": _INR,
    "imagenet_r_10": _INR,
    "imagenet_r_20": _INR,
    "domainnet_5": InfLoRAConfig(rank=30, dual=False, optim="sgd", lr=5e-3,
                                 init_lr=5e-3, fc_lr=1e-2, epochs=5,
                                 init_epochs=5, milestones=(4,)),
}


def cosine_epoch_schedule(base: float, epochs: int, steps_per_epoch: int):
  """The official CosineSchedule as it runs: epoch e ≥ 1 trains at
  ``base·cos(99π·(e−1) / (200(K−1)))``, epoch 0 at ``base``.

  Its constructor sets the epoch-0 lr and then resets its counter, so the
  first ``step()`` repeats epoch 0's lr: the cosine lags one epoch behind its
  formula. (K = 1 divides by zero there; here the lr stays ``base``.)
  """
  def lr(step):
    e = jnp.maximum(step // steps_per_epoch - 1, 0)
    return base * jnp.cos(99 * math.pi * e / (200 * max(epochs - 1, 1)))
  return lr


class InfLoRA:
  """InfLoRA on a Linen backbone ``model`` returning ``(B, d)`` features."""
  name = "inflora"

  def __init__(self, model: nn.Module, config: InfLoRAConfig = InfLoRAConfig(),
               rules=inflora.DEFAULT_RULES):
    self.model, self.config, self.rules = model, config, rules
    # One compile each per run: eager op-by-op would compile every op.
    self._jit_moments = jax.jit(self._moments)
    self._jit_design = jax.jit(self._design)
    self._jit_merge = jax.jit(self._adapted)

  def _design(self, covs, projs, retains):
    return {p: inflora.design_a(covs[p], projs[p], retains[p], self.config.rank)
            for p in covs}

  def init_state(self, rng, params, num_classes) -> MethodState:
    tgts = inflora.find_targets(params, self.rules)
    dim = jax.eval_shape(self._features, params, self._probe()).shape[-1]
    arrays = {"params": params,
              "head": head_lib.init_head(rng, dim, num_classes),
              "a": {t.path: jnp.zeros((self.config.rank, t.d_in), jnp.float32)
                    for t in tgts},
              "b": inflora.zero_b(tgts, self.config.rank)}
    return MethodState(arrays, {"memory": {p: None for p in arrays["a"]}})

  def _probe(self):
    """One blank image of the shape the model's config names."""
    c = self.model.config
    return jnp.zeros((1, c.image_size, c.image_size, c.in_chans), jnp.float32)

  def _features(self, params, images):
    return self.model.apply({"params": params}, images)

  def _adapted(self, arrays):
    tgts = inflora.find_targets(arrays["params"], self.rules)
    return inflora.apply_lora(arrays["params"], tgts,
                              jax.lax.stop_gradient(arrays["a"]), arrays["b"])

  def _moments(self, params, images):
    paths = inflora.layer_paths(inflora.find_targets(params, self.rules))
    return inflora.input_moments(inflora.capture_inputs(
        lambda: self._features(params, images), paths)[1])

  def covariances(self, params, batches) -> dict[str, jax.Array]:
    """Mean input covariance of each adapted layer over ``batches``."""
    total = None
    for images, _ in batches():
      total = inflora.add_moments(total, self._jit_moments(params, images))
    return inflora.mean_covariances(total)

  def before_task(self, state, task: Task) -> MethodState:
    arrays = state.arrays
    covs = self.covariances(arrays["params"], task.train_batches)
    projs = {p: inflora.projector(m, covs[p].shape[0])
             for p, m in state.host["memory"].items()}
    a = self._jit_design(covs, {p: pr for p, (pr, _) in projs.items()},
                         {p: r for p, (_, r) in projs.items()})
    arrays = {**arrays, "a": a, "b": jax.tree.map(jnp.zeros_like, arrays["b"])}
    return dataclasses.replace(state, arrays=arrays)

  def trainable(self, task):
    del task
    return ("b", "head")

  def epochs(self, task):
    return self.config.init_epochs if task.index == 0 else self.config.epochs

  def optimizer(self, task, steps_per_epoch):
    c = self.config
    base = c.init_lr if task.index == 0 else c.lr
    if c.optim == "adam":
      return optax.adam(cosine_epoch_schedule(base, self.epochs(task),
                                              steps_per_epoch))
    def sgd(lr):
      bounds = {m * steps_per_epoch: c.lr_decay for m in c.milestones}
      return optax.sgd(optax.piecewise_constant_schedule(lr, bounds), 0.9)
    return optax.multi_transform({"b": sgd(base), "head": sgd(c.fc_lr or base)},
                                 {"b": "b", "head": "head"})

  def loss(self, arrays, images, labels, lo, hi):
    feats = self._features(self._adapted(arrays), images)
    logits = head_lib.apply_head(arrays["head"], feats)
    mask = head_lib.class_mask(lo, hi, logits.shape[-1])
    logits = head_lib.masked_logits(logits, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()

  def after_task(self, state, task: Task) -> MethodState:
    arrays = state.arrays
    params = self._jit_merge(arrays)                      # merge B·A
    covs = self.covariances(params, task.train_batches)
    c = self.config
    thresh = inflora.threshold(task.index, task.num_tasks, c.lamb, c.lame)
    paths = list(state.host["memory"])
    memory = dict(zip(paths, inflora.update_memory(
        [state.host["memory"][p] for p in paths],
        [np.asarray(covs[p]) for p in paths], thresh, dual=c.dual)))
    arrays = {**arrays, "params": params,
              "b": jax.tree.map(jnp.zeros_like, arrays["b"])}
    return MethodState(arrays, {**state.host, "memory": memory})

  def logits(self, arrays, images):
    return head_lib.apply_head(arrays["head"],
                               self._features(self._adapted(arrays), images))

  def memory_widths(self, state) -> list[tuple[int, bool]]:
    """``(directions, retain)`` per layer, for logs."""
    return [(m.basis.shape[1], m.retain)
            for m in state.host["memory"].values()]
