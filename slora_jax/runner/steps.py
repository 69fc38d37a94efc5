"""The jitted train step, built from a method plug-in.

``step(state, batch, task)``: ``state`` is the train-state pytree (the
method's arrays and the optimiser state), ``batch`` a global batch
(``image``, ``label``, ``mask``), ``task`` traced scalars (``index``, ``lo``,
``hi``, ``lr``), so one compiled step serves every task and every rate. The
step knows nothing of a method's internals: it differentiates the method's
loss with respect to its `trainable` subtree and applies its optimiser built
at the step's rate.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from slora_jax.runner.methods import base

__all__ = ["TrainState", "task_args", "init_opt_state", "make_train_step"]


@flax.struct.dataclass
class TrainState:
  """What a step changes: the method's arrays and the optimiser state."""
  arrays: Any
  opt_state: Any


def task_args(index: int, lo: int, hi: int, lr: float) -> dict:
  """The traced per-step task values the step and the loss read."""
  return {"index": jnp.asarray(index, jnp.int32),
          "lo": jnp.asarray(lo, jnp.int32), "hi": jnp.asarray(hi, jnp.int32),
          "lr": jnp.asarray(lr, jnp.float32)}


def init_opt_state(method: base.Method, run: base.Run, arrays) -> Any:
  """A fresh optimiser state for ``arrays``' trainable leaves."""
  return method.optimizer(run, jnp.zeros((), jnp.float32)).init(
      method.trainable(arrays))


def make_train_step(method: base.Method, run: base.Run):
  """The jitted ``step(state, batch, task, backbone) -> (state, metrics)``.

  ``backbone``: the frozen parameters (an argument, not a constant of the
  compiled step). Metrics: ``loss``, the method's (``accuracy``, ...) and
  ``grad_norm``, device-side (reading them is the caller's sync).
  """

  def step(state: TrainState, batch: dict, task: dict, backbone):
    def loss_fn(tree):
      arrays = method.with_trainable(state.arrays, tree)
      return method.loss(run, arrays, backbone, batch, task)

    tree = method.trainable(state.arrays)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree)
    tx = method.optimizer(run, task["lr"])
    updates, opt_state = tx.update(grads, state.opt_state, tree)
    arrays = method.with_trainable(state.arrays,
                                   optax.apply_updates(tree, updates))
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads),
               "lr": task["lr"],
               **method.step_metrics(arrays)}
    return TrainState(arrays, opt_state), metrics

  return jax.jit(step, donate_argnums=(0,))
