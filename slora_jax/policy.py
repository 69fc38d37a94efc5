"""Named SD-LoRA semantics.

The official PyTorch code and the paper disagree on several points
(docs/semantics.md §3, §10). Each point is a field here, and two presets bundle
them: ``reference()`` (what the released code does; our default because the
published logs and LibContinual's reruns were produced by it) and ``paper()``
(what the ICLR paper writes).
"""

from __future__ import annotations

import dataclasses

__all__ = ["Policy", "reference", "paper", "get_policy", "rank_schedule"]


@dataclasses.dataclass(frozen=True)
class Policy:
  """How magnitudes and directions are initialised, normalised and kept.

  Attributes:
    name: a label stored with results.
    magnitude_init: initial value of every magnitude (code 0.8, paper 1.0).
    reset_magnitudes: re-create all magnitudes at ``magnitude_init`` at the
      start of every task (code) instead of carrying the learned values (paper).
    direction_norm: how a finished direction B·A is normalised:
      ``'factor_norms'`` divides by ‖B‖_F·‖A‖_F (code), ``'product_norm'`` by
      ‖B·A‖_F (paper Eq. 3).
    normalize_current: whether the direction being trained is normalised too
      (paper Eq. 4) or enters raw as α·B·A (code).
    current_norm_floor: the current direction is divided by
      max(‖B·A‖_F, floor): B starts at 0, where B·A/‖B·A‖ is 0/0, so the paper's
      formula needs a floor to be defined; above it the normalisation is exact.
    kd_threshold: SD-LoRA-KD absorbs a new direction when the joint
      least-squares residual is at most this (paper τ = 9e-4).
    kd_residual: ``'norm'`` compares the Frobenius norm of the residual with τ
      (paper Algorithm 1), ``'squared'`` its square (LibContinual).
    kd_offset: what is added to the earlier magnitudes on absorption:
      ``'unit'`` adds the least-squares coefficients as the paper writes
      (α_k += Δα_k); ``'magnitude'`` adds α_t·Δα_k, which keeps the function
      the new direction computed at the end of its task.
  """
  name: str = "reference"
  magnitude_init: float = 0.8
  reset_magnitudes: bool = True
  direction_norm: str = "factor_norms"
  normalize_current: bool = False
  current_norm_floor: float = 1e-3
  kd_threshold: float = 9e-4
  kd_residual: str = "norm"
  kd_offset: str = "magnitude"

  def __post_init__(self):
    if self.direction_norm not in ("factor_norms", "product_norm"):
      raise ValueError(f"direction_norm must be 'factor_norms' or "
                       f"'product_norm', got {self.direction_norm!r}")
    if self.kd_residual not in ("norm", "squared"):
      raise ValueError(f"kd_residual must be 'norm' or 'squared', got "
                       f"{self.kd_residual!r}")
    if self.kd_offset not in ("unit", "magnitude"):
      raise ValueError(f"kd_offset must be 'unit' or 'magnitude', got "
                       f"{self.kd_offset!r}")
    if self.current_norm_floor <= 0:
      raise ValueError("current_norm_floor must be positive")


def reference(**overrides) -> Policy:
  """The released PyTorch code's semantics (docs/semantics.md §3)."""
  return dataclasses.replace(Policy(name="reference"), **overrides)


def paper(**overrides) -> Policy:
  """The paper's semantics: α init 1, carried; ‖BA‖ normalisation everywhere."""
  base = Policy(name="paper", magnitude_init=1.0, reset_magnitudes=False,
                direction_norm="product_norm", normalize_current=True)
  return dataclasses.replace(base, **overrides)


def get_policy(name: str, **overrides) -> Policy:
  """Looks a preset up by name ('reference' or 'paper')."""
  presets = {"reference": reference, "paper": paper}
  if name not in presets:
    raise ValueError(f"unknown semantics {name!r}; choose one of {sorted(presets)}")
  return presets[name](**overrides)


def rank_schedule(task: int, schedule=((0, 10), (4, 8), (8, 6))) -> int:
  """SD-LoRA-RR rank for 0-indexed ``task``: the last (start, rank) with start ≤ task.

  The default is the code comment's schedule (docs/semantics.md §9.1): rank 10
  for tasks 0-3, 8 for 4-7 and 6 afterwards.
  """
  rank = None
  for start, r in sorted(schedule):
    if task >= start:
      rank = r
  if rank is None:
    raise ValueError(f"rank schedule {schedule} does not cover task {task}")
  return rank
