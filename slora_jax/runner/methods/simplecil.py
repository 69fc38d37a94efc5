"""SimpleCIL (Zhou et al., 2023) as a method plug-in.

No training: at each task the new classes' prototypes are the means of
the frozen backbone's features over the task's training images (evaluation
transforms), and the logits are cosine similarities (docs/methods.md).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from slora_jax import head as head_lib
from slora_jax.methods import simplecil
from slora_jax.runner.methods import base

__all__ = ["SimpleCIL"]


class SimpleCIL(base.Method):
  """Class-mean prototypes on the frozen backbone, cosine classifier."""
  name = "simplecil"
  summary = ("SimpleCIL: class-mean prototypes of the frozen backbone, "
             "cosine classifier, no training")

  def __init__(self):
    self._compiled = {}

  def epochs(self, exp) -> int:
    del exp
    return 0

  def init(self, run, backbone):
    del backbone
    return base.MethodState(
        {"protos": simplecil.init_prototypes(run.num_classes, run.width)})

  def trainable(self, arrays):
    return {}

  def with_trainable(self, arrays, tree):
    del tree
    return arrays

  def optimizer(self, run, lr):
    del run, lr
    return optax.identity()

  def before_task(self, run, state, task, backbone):
    """The new classes' prototypes from the task's plain training images
    (there is no training, so the task's evaluation sees them)."""
    if id(run.model) not in self._compiled:
      def sums(params, batch):
        return simplecil.class_sums(run.features(params, batch["image"]),
                                    batch["label"], run.num_classes,
                                    batch["mask"] > 0)
      self._compiled[id(run.model)] = jax.jit(sums)
    sums = self._compiled[id(run.model)]
    total = None
    for batch in task.plain_batches():
      total = simplecil.add_class_sums(total, sums(backbone, batch))
    new = head_lib.class_mask(task.lo, task.hi, run.num_classes)
    protos = simplecil.set_prototypes(state.arrays["protos"], total, new)
    return dataclasses.replace(state, arrays={"protos": protos})

  def eval_arrays(self, run, arrays, backbone):
    del run
    return {"params": backbone, "protos": arrays["protos"]}

  def logits(self, run, eval_arrays, images):
    return simplecil.cosine_logits(run.features(eval_arrays["params"], images),
                                   eval_arrays["protos"])
