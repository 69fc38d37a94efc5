"""The plug-in interface of a continual-learning method.

A method is one module in this package: a `Method` subclass, its config
defaults (a frozen dataclass, the config's ``methods.<name>`` section) and one
line in the registry (``methods/__init__.py``). The task loop
(`slora_jax.runner.train`) calls only what is below, in this order per task:

    before_task → steps of ``train_step(state, batch, task)`` (built from
    ``trainable``, ``optimizer``, ``schedule`` and ``loss``) → after_task →
    evaluation of ``logits(eval_arrays(...))`` by every evaluator

A method's state is split in two: ``arrays``, a pytree the jitted step and
evaluation take (adapter factors, magnitudes, head, prototypes), and ``host``,
NumPy arrays that change only between tasks (InfLoRA's subspace memory,
whose widths depend on the data). Both are checkpointed; ``meta`` returns the
JSON that `abstract` needs to rebuild their shapes on restore.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from slora_jax import head as head_lib

__all__ = ["Run", "Task", "MethodState", "Method", "masked_cross_entropy"]

Batches = Callable[[], Iterable[dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Run:
  """What a method sees of one seed's run (fixed for the run).

  Attributes:
    exp: the validated config (`slora_jax.runner.config.Experiment`).
    settings: the method's own config section (its ``settings`` dataclass),
      or None.
    seed: the run's seed.
    model: the Linen backbone; ``model.apply({'params': p}, images)`` gives
      ``(B, width)`` features.
    model_config: its `ViTConfig` (qkv layout, image size).
    backbone_template: the backbone parameters' tree (shapes; the real
      parameters are handed to the jitted functions as arguments).
    width: the feature width.
    num_classes: classes in the whole run (the head's width).
    num_phases: training phases (tasks, or one for a single-phase method).
  """
  exp: Any
  settings: Any
  seed: int
  model: nn.Module
  model_config: Any
  backbone_template: Any
  width: int
  num_classes: int
  num_phases: int

  def features(self, params, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images)


@dataclasses.dataclass(frozen=True)
class Task:
  """One training phase as a method sees it.

  Attributes:
    index: 0-based phase number.
    lo, hi: the phase's new classes are ``[lo, hi)``.
    steps_per_epoch, total_steps: the phase's step plan.
    train_batches: a fresh pass over the phase's training batches (training
      transforms, global arrays with ``image``, ``label`` and ``mask``).
    plain_batches: the same examples with evaluation transforms.
  """
  index: int
  lo: int
  hi: int
  steps_per_epoch: int
  total_steps: int
  train_batches: Batches
  plain_batches: Batches


@flax.struct.dataclass
class MethodState:
  """``arrays``: pytree for jitted code; ``host``: NumPy arrays by name."""
  arrays: Any
  host: dict = dataclasses.field(default_factory=dict)


def masked_cross_entropy(logits: jax.Array, batch: dict, lo, hi):
  """Mean cross-entropy over the classes ``[lo, hi)`` and the rows whose
  ``mask`` is set (padding of a last partial batch), and the accuracy."""
  keep = head_lib.class_mask(lo, hi, logits.shape[-1])
  logits = head_lib.masked_logits(logits, keep)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  m = batch["mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  hits = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return jnp.sum(ce * m) / n, {"accuracy": jnp.sum(hits * m) / n}


class Method:
  """A continual-learning method. Subclasses override what they change.

  Class attributes:
    name: the config's ``method`` value.
    summary: one line for help texts and reports.
    settings: a frozen dataclass with defaults (the ``methods.<name>``
      config section), or None.
    single_phase: one training phase over all classes (the joint bound).
    rank_reduction: task ranks follow ``adapter.rank_schedule``.
    uses_semantics: the config's ``semantics`` (an SD-LoRA `Policy`) changes
      what it computes.
  """
  uses_semantics: bool = False
  name: str = ""
  summary: str = ""
  settings: type | None = None
  single_phase: bool = False
  rank_reduction: bool = False

  # --- config -------------------------------------------------------------
  def check(self, exp) -> None:
    """Raises `ConfigError` for settings this method cannot run with."""

  def policy_overrides(self) -> dict:
    """`Policy` fields this method fixes whatever the semantics."""
    return {}

  def epochs(self, exp) -> int:
    """Training epochs per phase (0: the method trains nothing)."""
    return exp.train.epochs

  # --- state ----------------------------------------------------------------
  def init(self, run: Run, backbone) -> MethodState:
    raise NotImplementedError

  def meta(self, state: MethodState) -> dict:
    """JSON the checkpoint keeps so `abstract` can rebuild the shapes."""
    del state
    return {}

  def abstract(self, run: Run, meta: dict) -> MethodState:
    """The shapes of a saved state, from its `meta`."""
    del meta
    return jax.eval_shape(lambda: self.init(run, run.backbone_template))

  # --- one task ---------------------------------------------------------------
  def before_task(self, run: Run, state: MethodState, task: Task,
                  backbone) -> MethodState:
    del run, task, backbone
    return state

  def trainable(self, arrays) -> Any:
    """The subtree the optimiser updates (gradients only for it)."""
    raise NotImplementedError

  def with_trainable(self, arrays, tree) -> Any:
    """Inverse of `trainable`: ``arrays`` with ``tree`` put back."""
    raise NotImplementedError

  def optimizer(self, run: Run, lr: jax.Array) -> optax.GradientTransformation:
    """The optimiser at rate ``lr`` (traced: built inside the jitted step;
    its state's structure must not depend on ``lr``)."""
    raise NotImplementedError

  def schedule(self, run: Run, task: Task) -> optax.Schedule:
    """The learning rate at each step of ``task`` (an optax schedule)."""
    raise NotImplementedError

  def loss(self, run: Run, arrays, backbone, batch: dict,
           task: dict) -> tuple[jax.Array, dict]:
    """``(loss, metrics)`` of a batch; ``task``: traced ``index``, ``lo``,
    ``hi``. Jit-able."""
    raise NotImplementedError

  def step_metrics(self, arrays) -> dict:
    """Device-side values the train step returns beside the loss."""
    del arrays
    return {}

  def after_task(self, run: Run, state: MethodState, task: Task,
                 backbone) -> tuple[MethodState, dict]:
    """The finished task's state and extra fields of its record."""
    del run, task, backbone
    return state, {}

  # --- evaluation and reports ---------------------------------------------------
  def eval_arrays(self, run: Run, arrays, backbone) -> Any:
    """What `logits` reads, computed once per evaluation (jitted)."""
    raise NotImplementedError

  def logits(self, run: Run, eval_arrays, images: jax.Array) -> jax.Array:
    """``(B, num_classes)``; evaluators mask the classes not seen yet."""
    raise NotImplementedError

  def scalars(self, state: MethodState) -> dict[str, float]:
    """Values logged beside the loss (e.g. the magnitudes)."""
    del state
    return {}

  def record(self, state: MethodState) -> dict:
    """Fields of each task's record in results.json."""
    del state
    return {}

  def payload(self, state: MethodState) -> dict:
    """results.json fields: ``semantics`` and ``stored_directions``."""
    del state
    return {"semantics": None, "stored_directions": 0}
