"""The plug-in interface a continual-learning method implements (issue #24).

A method is one module with a class satisfying `MethodPlugin` and its config
defaults; the task loop calls only what is below (docs/methods.md, "Wiring
into the loop"). Not yet wired into `slora_jax.runner.train`: `run_task` is
the minimal loop the plug-ins are tested with, and the contract the runner's
loop is to follow.

A method's state is split in two: ``arrays``, a pytree that jitted functions
take (backbone parameters, adapter factors, head, prototypes), and ``host``,
what lives on the host between tasks (e.g. InfLoRA's subspace memory, whose
widths depend on the data).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Protocol

import jax
import numpy as np
import optax

__all__ = ["Task", "MethodState", "MethodPlugin", "run_task"]

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Task:
  """One task as a method sees it.

  Attributes:
    index: 0-based task number.
    num_tasks: tasks in the run.
    lo, hi: the task's new classes are ``[lo, hi)``.
    num_classes: classes in the whole run (the head's width).
    train_batches: a fresh pass over the task's training ``(images, labels)``
      with training transforms.
    plain_batches: the same examples with evaluation transforms (what
      statistics such as prototypes are computed on).
  """
  index: int
  num_tasks: int
  lo: int
  hi: int
  num_classes: int
  train_batches: Batches
  plain_batches: Batches


@dataclasses.dataclass
class MethodState:
  """``arrays``: pytree for jitted code; ``host``: Python/NumPy state."""
  arrays: dict
  host: dict = dataclasses.field(default_factory=dict)


class MethodPlugin(Protocol):
  """What the loop calls, in this order per task.

  ``before_task`` → ``epochs(task)`` passes of ``train_batches`` with a
  gradient step on ``loss`` for the leaves named by ``trainable`` (none: no
  training) under ``optimizer`` → ``after_task`` → ``logits`` for evaluation.
  ``loss`` and ``logits`` must be jit-able in their array arguments.
  """
  name: str

  def init_state(self, rng: jax.Array, params: Any,
                 num_classes: int) -> MethodState: ...

  def before_task(self, state: MethodState, task: Task) -> MethodState: ...

  def trainable(self, task: Task) -> tuple[str, ...]:
    """Keys of ``state.arrays`` the optimiser updates during ``task``."""

  def epochs(self, task: Task) -> int: ...

  def optimizer(self, task: Task,
                steps_per_epoch: int) -> optax.GradientTransformation: ...

  def loss(self, arrays: dict, images: jax.Array, labels: jax.Array,
           lo: jax.Array, hi: jax.Array) -> jax.Array: ...

  def after_task(self, state: MethodState, task: Task) -> MethodState: ...

  def logits(self, arrays: dict, images: jax.Array) -> jax.Array:
    """``(B, num_classes)``; the loop masks the classes not seen yet."""


def _train_step(method, keys, tx):
  def step(arrays, opt_state, images, labels, lo, hi):
    def loss_fn(train):
      return method.loss({**arrays, **train}, images, labels, lo, hi)
    train = {k: arrays[k] for k in keys}
    loss, grads = jax.value_and_grad(loss_fn)(train)
    updates, opt_state = tx.update(grads, opt_state, train)
    return {**arrays, **optax.apply_updates(train, updates)}, opt_state, loss
  return jax.jit(step)


def run_task(method: MethodPlugin, state: MethodState,
             task: Task) -> tuple[MethodState, list[float]]:
  """One task through the plug-in contract; returns the state, step losses."""
  state = method.before_task(state, task)
  keys, epochs = method.trainable(task), method.epochs(task)
  losses = []
  if keys and epochs:
    steps_per_epoch = sum(1 for _ in task.train_batches())
    tx = method.optimizer(task, steps_per_epoch)
    step = _train_step(method, keys, tx)
    arrays = state.arrays
    opt_state = tx.init({k: arrays[k] for k in keys})
    for _ in range(epochs):
      for images, labels in task.train_batches():
        arrays, opt_state, loss = step(arrays, opt_state, images, labels,
                                       task.lo, task.hi)
        losses.append(float(loss))
    state = dataclasses.replace(state, arrays=arrays)
  return method.after_task(state, task), losses
