"""The registry of continual-learning methods the runner knows.

A `Method` says what the task loop does differently, as properties, so no
code below the config boundary compares method names.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Method", "METHODS", "get_method"]


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method uses the adapters across tasks.

  Attributes:
    name: the config's ``method`` value.
    summary: one line for help texts and reports.
    direction_per_task: each task trains a new direction and stores the
      finished one (`begin_task` / `end_task` at every task); otherwise one
      LoRA pair is carried on from task to task.
    trains_magnitudes: the magnitudes α are trained (SD-LoRA); otherwise they
      stay at 1 and the adapter is plain LoRA.
    knowledge_distillation: `end_task` may fold a new direction into the
      earlier ones' magnitudes (SD-LoRA-KD).
    rank_reduction: later tasks use the smaller ranks of
      ``adapter.rank_schedule`` (SD-LoRA-RR).
    single_phase: one training phase over all classes (the joint upper bound).
    trains_adapters: the LoRA factors train; otherwise they stay at their
      initial B = 0 (no change to the backbone) and only the head trains.
  """
  name: str
  summary: str
  direction_per_task: bool = True
  trains_magnitudes: bool = True
  knowledge_distillation: bool = False
  rank_reduction: bool = False
  single_phase: bool = False
  trains_adapters: bool = True

  def policy_overrides(self) -> dict:
    """`Policy` fields this method fixes whatever the semantics."""
    if self.trains_magnitudes:
      return {}
    # Plain LoRA: one direction whose magnitude stays 1 (not trained).
    return {"magnitude_init": 1.0, "reset_magnitudes": False}

  def capacity(self, requested: int, phases: int) -> int:
    """Stored-direction slots: one per phase, or ``requested`` if set."""
    if not self.direction_per_task:
      return 1
    return int(requested or phases)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sdlora", "SD-LoRA: a new direction per task, magnitudes trained"),
    Method("sdlora_rr", "SD-LoRA-RR: SD-LoRA with ranks shrinking over tasks",
           rank_reduction=True),
    Method("sdlora_kd", "SD-LoRA-KD: SD-LoRA folding spanned directions into "
           "the magnitudes", knowledge_distillation=True),
    Method("seq_lora", "one LoRA fine-tuned on every task in turn",
           direction_per_task=False, trains_magnitudes=False),
    Method("linear_probe", "the frozen backbone: only the growing head trains",
           direction_per_task=False, trains_magnitudes=False,
           trains_adapters=False),
    Method("joint", "one LoRA on all classes at once (the upper bound)",
           direction_per_task=False, trains_magnitudes=False,
           single_phase=True),
)}


def get_method(name: str) -> Method:
  """The registered method ``name``; ValueError lists the choices."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of "
                     f"{', '.join(METHODS)}")
  return METHODS[name]
