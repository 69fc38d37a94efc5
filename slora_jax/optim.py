"""Optimisers that update only what SD-LoRA trains."""

from __future__ import annotations

from typing import Any

import optax

from slora_jax.adapters import AdapterState

__all__ = ["trainable_params", "with_trainable_params", "optimizer"]


def trainable_params(adapters: AdapterState, head: Any = None) -> dict:
  """The tree to differentiate and optimise: current factors, magnitudes, head.

  Frozen slots are left out on purpose, so neither gradients nor optimiser
  state are ever computed for them.
  """
  tree = {"adapters": adapters.trainable}
  if head is not None:
    tree["head"] = head
  return tree


def with_trainable_params(adapters: AdapterState, tree: dict):
  """Inverse of `trainable_params`: returns ``(adapters, head)``."""
  return adapters.replace(trainable=tree["adapters"]), tree.get("head")


def optimizer(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The reference optimiser: SGD with momentum 0.9 and no weight decay.

  Weight decay is available but off: with it, head columns of earlier tasks
  (which get exactly zero gradient) would drift (docs/semantics.md §11.4).
  """
  tx = optax.sgd(learning_rate, momentum=momentum)
  if weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  return tx
