"""SimpleCIL as a `method_api.MethodPlugin` (not yet wired into the loop).

No training: after each task the new classes' prototypes are the means of
the frozen backbone's features over the task's training images (evaluation
transforms), and logits are cosine similarities (docs/methods.md).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from slora_jax import head as head_lib
from slora_jax.methods import simplecil
from slora_jax.runner.method_api import MethodState, Task

__all__ = ["SimpleCIL"]


class SimpleCIL:
  """SimpleCIL on a Linen backbone ``model`` returning ``(B, d)`` features."""
  name = "simplecil"

  def __init__(self, model: nn.Module):
    self.model = model
    self._jit_sums = jax.jit(self._sums, static_argnums=3)  # once per run

  def _sums(self, params, images, labels, num_classes):
    return simplecil.class_sums(self._features(params, images), labels,
                                num_classes)

  def _features(self, params, images):
    return self.model.apply({"params": params}, images)

  def init_state(self, rng, params, num_classes) -> MethodState:
    del rng
    c = self.model.config
    probe = jnp.zeros((1, c.image_size, c.image_size, c.in_chans), jnp.float32)
    dim = jax.eval_shape(self._features, params, probe).shape[-1]
    return MethodState({"params": params,
                        "protos": simplecil.init_prototypes(num_classes, dim)})

  def before_task(self, state, task: Task) -> MethodState:
    del task
    return state

  def trainable(self, task):
    del task
    return ()

  def epochs(self, task):
    del task
    return 0

  def optimizer(self, task, steps_per_epoch):
    del task, steps_per_epoch
    return optax.identity()

  def loss(self, arrays, images, labels, lo, hi):
    raise NotImplementedError("SimpleCIL trains nothing")

  def after_task(self, state, task: Task) -> MethodState:
    arrays = state.arrays
    total = None
    for images, labels in task.plain_batches():
      total = simplecil.add_class_sums(total, self._jit_sums(
          arrays["params"], images, labels, task.num_classes))
    new = head_lib.class_mask(task.lo, task.hi, task.num_classes)
    protos = simplecil.set_prototypes(arrays["protos"], total, new)
    return dataclasses.replace(state, arrays={**arrays, "protos": protos})

  def logits(self, arrays, images):
    return simplecil.cosine_logits(self._features(arrays["params"], images),
                                   arrays["protos"])
