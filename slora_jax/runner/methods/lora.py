"""SD-LoRA (±RR, ±KD) and the LoRA baselines: the methods built on `AdapterState`.

One class, `AdapterMethod`, covers them all; its fields say what the task
loop does differently, so no code compares method names:
``direction_per_task`` (`begin_task`/`end_task` at every task, or one pair
carried on), ``trains_magnitudes``, ``knowledge_distillation``,
``rank_reduction``, ``single_phase``, ``trains_adapters``; ``adapter_form``
says how the loss applies the adapters. The state's arrays
are ``{'adapters': AdapterState, 'head': head}``; the backbone stays frozen
and evaluation merges the adapters into it (`slora_jax.merge`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

import slora_jax as sl
from slora_jax import activation
from slora_jax import optim
from slora_jax.runner.methods import base

__all__ = ["AdapterMethod", "FAMILY"]


@dataclasses.dataclass(frozen=True)
class AdapterMethod(base.Method):
  """A method of the SD-LoRA family (see the module docstring)."""
  name: str = ""
  summary: str = ""
  direction_per_task: bool = True
  trains_magnitudes: bool = True
  knowledge_distillation: bool = False
  rank_reduction: bool = False
  single_phase: bool = False
  trains_adapters: bool = True
  # 'activation' (`slora_jax.apply_with_adapters`: no adapted-kernel
  # gradients, the faster) or 'weight' (`slora_jax.apply_adapters` on the
  # kernels; any model). The same function and gradients.
  adapter_form: str = "activation"
  uses_semantics: ClassVar[bool] = True

  def __post_init__(self):
    if self.adapter_form not in ("activation", "weight"):
      raise ValueError("adapter_form must be 'activation' or 'weight', got "
                       f"{self.adapter_form!r}")

  # --- config -------------------------------------------------------------
  def policy_overrides(self) -> dict:
    if self.trains_magnitudes:
      return {}
    # Plain LoRA: one direction whose magnitude stays 1 (not trained).
    return {"magnitude_init": 1.0, "reset_magnitudes": False}

  def capacity(self, requested: int, phases: int) -> int:
    """Stored-direction slots: one per phase, or ``requested`` if set."""
    if not self.direction_per_task:
      return 1
    return int(requested or phases)

  # --- state ----------------------------------------------------------------
  def init(self, run: base.Run, backbone) -> base.MethodState:
    exp = run.exp
    adapters = sl.init_adapters(
        backbone, exp.adapter.rules(run.model_config.qkv),
        capacity=self.capacity(exp.adapter.capacity, run.num_phases),
        max_rank=max(exp.rank(t) for t in range(run.num_phases)),
        policy=exp.policy())
    head = sl.init_head(jax.random.fold_in(jax.random.key(run.seed), 10**6),
                        run.width, run.num_classes)
    return base.MethodState({"adapters": adapters, "head": head})

  def before_task(self, run, state, task, backbone):
    """A new direction (or, after task 0, the carried-on LoRA)."""
    del backbone
    ad = state.arrays["adapters"]
    if self.direction_per_task or task.index == 0:
      ad = sl.begin_task(ad, jax.random.fold_in(jax.random.key(run.seed),
                                                task.index),
                         run.exp.rank(task.index))
    return dataclasses.replace(state, arrays={**state.arrays, "adapters": ad})

  def trainable(self, arrays):
    tree = optim.trainable_params(arrays["adapters"], arrays["head"])
    if not self.trains_adapters:
      del tree["adapters"]
    elif not self.trains_magnitudes:
      tree["adapters"] = {"current": tree["adapters"]["current"]}
    return tree

  def with_trainable(self, arrays, tree):
    ad = arrays["adapters"]
    if "adapters" in tree:
      ad = ad.replace(trainable={**ad.trainable, **tree["adapters"]})
    return {"adapters": ad, "head": tree["head"]}

  def optimizer(self, run, lr):
    return optim.optimizer(lr, momentum=run.exp.train.momentum)

  def schedule(self, run, task):
    """The config's step decay at epoch milestones (task 0 has its own):
    `TrainSettings.learning_rate` at each step's epoch."""
    train, spe = run.exp.train, task.steps_per_epoch
    return lambda step: train.learning_rate(task.index, step // spe)

  def loss(self, run, arrays, backbone, batch, task):
    """Cross-entropy over the task's classes ``[lo, hi)`` (the reference's
    ``logits[:, known:]``, docs/semantics.md §4); adapters on the
    activations or on the kernels (``adapter_form``)."""
    ad = arrays["adapters"]
    if self.adapter_form == "weight":
      feats = run.features(sl.apply_adapters(backbone, ad), batch["image"])
    else:
      feats = activation.apply_with_adapters(run.features, backbone, ad,
                                             batch["image"])
    logits = sl.apply_head(arrays["head"], feats)
    return base.masked_cross_entropy(logits, batch, task["lo"], task["hi"])

  def after_task(self, run, state, task, backbone):
    """Freezes the task's direction (SD-LoRA) and keeps the KD outcome."""
    del run, task, backbone
    if not self.direction_per_task:
      return state, {}
    ad, info = sl.end_task(state.arrays["adapters"],
                           knowledge_distillation=self.knowledge_distillation)
    state = dataclasses.replace(state, arrays={**state.arrays, "adapters": ad})
    return state, {"kd_absorbed": bool(info["absorbed"])}

  # --- evaluation and reports -------------------------------------------------
  def eval_arrays(self, run, arrays, backbone):
    del run
    return {"params": sl.merge(backbone, arrays["adapters"]),
            "head": arrays["head"]}

  def logits(self, run, eval_arrays, images):
    return sl.apply_head(eval_arrays["head"],
                         run.features(eval_arrays["params"], images))

  def scalars(self, state):
    """``alpha/task<i>``: each trained direction's magnitude (1-based)."""
    ad = state.arrays["adapters"]
    mags = ad.trainable["magnitudes"]
    n = int(sl.num_stored(ad))
    out = {f"alpha/task{i + 1}": float(a)
           for i, a in enumerate(np.asarray(mags["previous"])[:n])}
    out[f"alpha/task{n + 1}"] = float(mags["current"])
    return out

  def record(self, state):
    mags = state.arrays["adapters"].trainable["magnitudes"]
    return {"alpha_current": float(mags["current"])}

  def payload(self, state):
    ad = state.arrays["adapters"]
    return {"semantics": dataclasses.asdict(ad.spec.policy),
            "stored_directions": int(sl.num_stored(ad))}

  def step_metrics(self, arrays) -> dict:
    """Device-side values the step returns beside the loss."""
    return {"alpha_current":
            arrays["adapters"].trainable["magnitudes"]["current"]}


FAMILY = (
    AdapterMethod("sdlora", "SD-LoRA: a new direction per task, magnitudes "
                  "trained"),
    AdapterMethod("sdlora_rr", "SD-LoRA-RR: SD-LoRA with ranks shrinking over "
                  "tasks", rank_reduction=True),
    AdapterMethod("sdlora_kd", "SD-LoRA-KD: SD-LoRA folding spanned directions "
                  "into the magnitudes", knowledge_distillation=True),
    AdapterMethod("seq_lora", "one LoRA fine-tuned on every task in turn",
                  direction_per_task=False, trains_magnitudes=False),
    AdapterMethod("linear_probe", "the frozen backbone: only the growing head "
                  "trains", direction_per_task=False, trains_magnitudes=False,
                  trains_adapters=False),
    AdapterMethod("joint", "one LoRA on all classes at once (the upper bound)",
                  direction_per_task=False, trains_magnitudes=False,
                  single_phase=True),
)
