"""A method plug-in through one task, as the runner's loop drives it.

The loop (slora_jax/runner/train.py) adds checkpoints, signals and metrics
around the same calls: `before_task`, the generic jitted step over the
method's schedule, `after_task`.
"""

import dataclasses

import jax
import numpy as np

from slora_jax.runner import steps
from slora_jax.runner.methods import base


def run(method, settings=None, *, model, model_config, width, num_classes,
        num_phases, seed=0) -> base.Run:
  """A `Run` without a config (the plug-ins read ``settings``)."""
  return base.Run(exp=None, settings=settings, seed=seed, model=model,
                  model_config=model_config, backbone_template=None,
                  width=width, num_classes=num_classes, num_phases=num_phases)


def as_batches(pairs):
  """``(images, labels)`` pairs as the loop's batch dicts (no padding)."""
  return [{"image": x, "label": y, "mask": np.ones(len(y), np.float32)}
          for x, y in pairs]


def task(index, lo, hi, train_pairs, plain_pairs=None, epochs=1) -> base.Task:
  train = as_batches(train_pairs)
  plain = as_batches(plain_pairs if plain_pairs is not None else train_pairs)
  return base.Task(index, lo, hi, len(train), len(train) * epochs,
                   lambda: iter(train), lambda: iter(plain))


def run_task(method, r: base.Run, state: base.MethodState, t: base.Task,
             backbone):
  """One task; returns (state, the step losses, after_task's record)."""
  state = method.before_task(r, state, t, backbone)
  losses = []
  if t.total_steps:
    step = steps.make_train_step(method, r)
    schedule = method.schedule(r, t)
    ts = steps.TrainState(state.arrays,
                          steps.init_opt_state(method, r, state.arrays))
    batches = [b for _ in range(t.total_steps // t.steps_per_epoch)
               for b in t.train_batches()]
    for i, batch in enumerate(batches):
      ts, m = step(ts, batch, steps.task_args(t.index, t.lo, t.hi,
                                              schedule(i)), backbone)
      losses.append(float(m["loss"]))
    state = dataclasses.replace(state, arrays=ts.arrays)
  state, record = method.after_task(r, state, t, backbone)
  return state, losses, record


def tree_copy(tree):
  return jax.tree.map(np.array, tree)
