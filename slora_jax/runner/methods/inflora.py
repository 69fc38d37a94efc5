"""InfLoRA (Liang & Li, CVPR 2024) as a method plug-in.

Per task: the mean covariance of every adapted layer's inputs over the
task's training batches designs A (the earlier tasks' subspace projected
out); B (k and v columns of each block's qkv kernel) and the head train under
Adam with the official per-epoch cosine (or SGD with step decay, DomainNet);
B·A is merged into the kernels after the task, and the covariance of the
merged model grows the DualGPM memory. Hyper-parameters per benchmark:
`PRESETS` (docs/methods.md); the config's ``methods.inflora`` section.

The state's arrays hold the merged backbone itself (``params``: what InfLoRA
changes), the head and the current A and B; ``host`` holds each layer's
memory, a float64 basis padded to ``(d, d)`` and stored bit-exactly as
uint32 pairs so a resumed run reaches the uninterrupted numbers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slora_jax import head as head_lib
from slora_jax.methods import inflora
from slora_jax.runner.methods import base

__all__ = ["InfLoRASettings", "PRESETS", "InfLoRA", "cosine_epoch_schedule"]


@dataclasses.dataclass(frozen=True)
class InfLoRASettings:
  """InfLoRA's hyper-parameters (names as the official JSON configs').

  Attributes:
    rank: r of A and B.
    lamb, lame: the memory threshold goes from ``lamb`` (task 0) towards
      ``lame``: ``(lame − lamb)·t/num_tasks + lamb``.
    dual: DualGPM (True) or plain GPM (the DomainNet runs).
    optim: 'adam' (cosine per epoch) or 'sgd' (momentum 0.9, step decay).
    init_lr: task 0's rate; lr: later tasks'.
    epochs: epochs per task.
    fc_lr: the head's rate under 'sgd' (0: ``lr``).
    milestones, lr_decay: 'sgd' step decay at these epochs.
  """
  rank: int = 10
  lamb: float = 0.95
  lame: float = 1.0
  dual: bool = True
  optim: str = "adam"
  init_lr: float = 5e-4
  lr: float = 5e-4
  epochs: int = 20
  fc_lr: float = 0.0
  milestones: tuple[int, ...] = ()
  lr_decay: float = 0.1


_INR = InfLoRASettings(lamb=0.98, epochs=50)
# ViT-B/16 (IN-21k) runs, batch 128, from the official configs/*.json.
PRESETS = {
    "cifar100_10": InfLoRASettings(),
    "imagenet_r_5": _INR,
    "imagenet_r_10": _INR,
    "imagenet_r_20": _INR,
    "domainnet_5": InfLoRASettings(rank=30, dual=False, optim="sgd", lr=5e-3,
                                   init_lr=5e-3, fc_lr=1e-2, epochs=5,
                                   milestones=(4,)),
}


def cosine_epoch_schedule(base_lr: float, epochs: int, steps_per_epoch: int):
  """The official CosineSchedule as it runs: epoch e ≥ 1 trains at
  ``base·cos(99π·(e−1) / (200(K−1)))``, epoch 0 at ``base``.

  Its constructor sets the epoch-0 lr and then resets its counter, so the
  first ``step()`` repeats epoch 0's lr: the cosine lags one epoch behind its
  formula. (K = 1 divides by zero there; here the lr stays ``base``.)
  """
  def lr(step):
    e = max(int(step) // steps_per_epoch - 1, 0)
    return float(base_lr * math.cos(99 * math.pi * e /
                                     (200 * max(epochs - 1, 1))))
  return lr


def _masked_moments(inputs: dict, mask: jax.Array) -> dict:
  """`inflora.input_moments` of the rows ``mask`` keeps (padding dropped)."""
  out = {}
  for path, x in inputs.items():
    tokens = x.shape[1] if x.ndim == 3 else 1
    x = x * mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    s, _ = inflora.input_moments({path: x})[path]
    out[path] = (s, jnp.sum(mask.astype(jnp.float32)) * tokens)
  return out


def _design(covs, projs, retains, rank):
  return {p: inflora.design_a(covs[p], projs[p], retains[p], rank)
          for p in covs}


def _bits(basis: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(basis, np.float64).view(np.uint32)


def _basis(bits: np.ndarray, width: int) -> np.ndarray:
  return np.asarray(bits).view(np.float64)[:, :width]


class InfLoRA(base.Method):
  """InfLoRA on the run's backbone (see the module docstring)."""
  name = "inflora"
  summary = ("InfLoRA: A designed from the inputs outside earlier tasks' "
             "subspace, B trained, merged after each task")
  settings = InfLoRASettings

  def __init__(self):
    # Compiled once per run (the backbone's model is the key), not per task.
    self._compiled = {}
    self._merge = jax.jit(self._adapted)
    self._design = jax.jit(_design, static_argnums=3)

  def check(self, exp) -> None:
    from slora_jax.runner.errors import ConfigError  # pylint: disable=g-import-not-at-top
    s = exp.methods["inflora"]
    if s.optim not in ("adam", "sgd"):
      raise ConfigError(f"methods.inflora.optim must be 'adam' or 'sgd', got "
                        f"{s.optim!r}")
    if s.rank < 1 or s.epochs < 1 or not (s.lr > 0 and s.init_lr > 0):
      raise ConfigError("methods.inflora.rank and epochs must be at least 1 "
                        "and its rates positive")

  def epochs(self, exp) -> int:
    return exp.methods["inflora"].epochs

  def _targets(self, params):
    return inflora.find_targets(params)

  # --- state ----------------------------------------------------------------
  def init(self, run, backbone):
    r = run.settings.rank
    tgts = self._targets(backbone)
    arrays = {"params": jax.tree.map(jnp.copy, backbone),
              "head": head_lib.init_head(
                  jax.random.fold_in(jax.random.key(run.seed), 10**6),
                  run.width, run.num_classes),
              "a": {t.path: jnp.zeros((r, t.d_in), jnp.float32) for t in tgts},
              "b": inflora.zero_b(tgts, r)}
    d = {t.path: t.d_in for t in tgts}
    host = {"basis": {p: _bits(np.zeros((n, n))) for p, n in d.items()},
            "width": {p: np.zeros((), np.int32) for p in d},
            "retain": {p: np.zeros((), np.int32) for p in d}}
    return base.MethodState(arrays, host)

  def _memory(self, host) -> dict:
    return {p: (inflora.Memory(_basis(host["basis"][p], int(w)),
                               bool(host["retain"][p])) if int(w) else None)
            for p, w in host["width"].items()}

  def _adapted(self, arrays):
    return inflora.apply_lora(arrays["params"], self._targets(arrays["params"]),
                              jax.lax.stop_gradient(arrays["a"]), arrays["b"])

  def covariances(self, run, params, batches) -> dict:
    """Mean input covariance of each adapted layer over ``batches``."""
    paths = inflora.layer_paths(self._targets(params))
    key = (id(run.model), paths)
    if key not in self._compiled:
      def moments(params, batch):
        _, seen = inflora.capture_inputs(
            lambda: run.features(params, batch["image"]), paths)
        return _masked_moments(seen, batch["mask"])
      self._compiled[key] = jax.jit(moments)
    moments = self._compiled[key]
    total = None
    for batch in batches():
      total = inflora.add_moments(total, moments(params, batch))
    return inflora.mean_covariances(total)

  # --- one task ---------------------------------------------------------------
  def before_task(self, run, state, task, backbone):
    del backbone
    arrays = state.arrays
    covs = self.covariances(run, arrays["params"], task.train_batches)
    memory = self._memory(state.host)
    projs = {p: inflora.projector(memory[p], covs[p].shape[0]) for p in covs}
    a = self._design(covs, {p: pr for p, (pr, _) in projs.items()},
                     {p: re for p, (_, re) in projs.items()},
                     run.settings.rank)
    arrays = {**arrays, "a": a,
              "b": jax.tree.map(jnp.zeros_like, arrays["b"])}
    return dataclasses.replace(state, arrays=arrays)

  def trainable(self, arrays):
    return {"b": arrays["b"], "head": arrays["head"]}

  def with_trainable(self, arrays, tree):
    return {**arrays, **tree}

  def optimizer(self, run, lr):
    s = run.settings
    if s.optim == "adam":
      return optax.adam(lr)
    head_lr = lr * (s.fc_lr / s.lr if s.fc_lr else 1.0)
    return optax.multi_transform(
        {"b": optax.sgd(lr, 0.9), "head": optax.sgd(head_lr, 0.9)},
        {"b": "b", "head": "head"})

  def schedule(self, run, task):
    s = run.settings
    base_lr = s.init_lr if task.index == 0 else s.lr
    if s.optim == "adam":
      return cosine_epoch_schedule(base_lr, s.epochs, task.steps_per_epoch)
    spe = task.steps_per_epoch
    return lambda step: float(base_lr * s.lr_decay ** sum(
        int(step) // spe >= m for m in s.milestones))

  def loss(self, run, arrays, backbone, batch, task):
    del backbone
    feats = run.features(self._adapted(arrays), batch["image"])
    logits = head_lib.apply_head(arrays["head"], feats)
    return base.masked_cross_entropy(logits, batch, task["lo"], task["hi"])

  def after_task(self, run, state, task, backbone):
    del backbone
    arrays = state.arrays
    params = self._merge(arrays)                                  # merge B·A
    covs = self.covariances(run, params, task.train_batches)
    s = run.settings
    thresh = inflora.threshold(task.index, run.num_phases, s.lamb, s.lame)
    memory = self._memory(state.host)
    paths = list(memory)
    grown = dict(zip(paths, inflora.update_memory(
        [memory[p] for p in paths], [np.asarray(covs[p]) for p in paths],
        thresh, dual=s.dual)))
    host = {"basis": {}, "width": {}, "retain": {}}
    for p, m in grown.items():
      d = m.basis.shape[0]
      padded = np.zeros((d, d))
      padded[:, :m.basis.shape[1]] = m.basis
      host["basis"][p] = _bits(padded)
      host["width"][p] = np.asarray(m.basis.shape[1], np.int32)
      host["retain"][p] = np.asarray(int(m.retain), np.int32)
    arrays = {**arrays, "params": params,
              "b": jax.tree.map(jnp.zeros_like, arrays["b"])}
    widths = [int(w) for w in host["width"].values()]
    return base.MethodState(arrays, host), {
        "memory_dims": widths,
        "memory_retain": [bool(v) for v in host["retain"].values()]}

  # --- evaluation and reports -------------------------------------------------
  def eval_arrays(self, run, arrays, backbone):
    del run, backbone
    return {"params": self._adapted(arrays), "head": arrays["head"]}

  def logits(self, run, eval_arrays, images):
    return head_lib.apply_head(eval_arrays["head"],
                               run.features(eval_arrays["params"], images))

  def payload(self, state):
    return {"semantics": None, "stored_directions": 0}
