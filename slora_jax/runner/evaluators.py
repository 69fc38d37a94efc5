"""Evaluators: what one evaluation measures, as named plug-ins.

An `Evaluator` turns a batch's logits into per-task sums (traced; the class
range ``[0, hi)`` seen so far is a traced scalar, so one compiled step serves
every task), and the sums over the test set into named metrics of the task's
record. `make_eval_step` runs a set of them in one jitted step; `task_record`
and `scalars` read the sums they returned. Registered (`EVALUATORS`):

  class_il    the task-agnostic accuracy: argmax over every class seen so far,
              top-1 and top-5 (the reference's ``top1``; the paper's Acc).
  task_il     each image scored against its own task's classes only.
  cross_task  where class-IL errors go: per task the images predicted into an
              earlier or a later task, and on the evaluation of every task
              the (label, predicted class) counts of those cross-task errors
              (what ``experiments.head_share`` reads).

Adding one is an `Evaluator` in `EVALUATORS`; the task loop is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax import head as head_lib
from slora_jax.runner import metrics

__all__ = ["Classes", "Evaluator", "EVALUATORS", "DEFAULT", "make_eval_step",
           "add", "task_record", "scalars"]

LogitsFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Classes:
  """The class layout an evaluator needs: labels are head rows, task ``k``
  owns rows ``[lo[k], lo[k + 1])``."""
  num_classes: int
  task_sizes: tuple[int, ...]

  @property
  def num_tasks(self) -> int:
    return len(self.task_sizes)

  def task_of_class(self) -> jax.Array:
    return jnp.asarray(metrics.class_to_task(self.task_sizes))

  def bounds(self) -> jax.Array:
    """(num_tasks + 1,) first row of each task, then the end."""
    return jnp.asarray(np.cumsum([0, *self.task_sizes]))


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """``sums(logits, batch, hi, classes)`` -> dict of arrays (traced, summed
  over batches); ``record(sums, n)`` -> the record's metrics for the ``n``
  tasks evaluated (host, numpy sums); ``scalars(record)`` -> logged floats."""
  name: str
  sums: Callable[..., dict]
  record: Callable[[dict, int], dict]
  scalars: Callable[[dict], dict]


def _onehot_task(batch, classes: Classes) -> jax.Array:
  """(B, num_tasks): the task of each real row (padding rows are zero)."""
  task = classes.task_of_class()[batch["label"]]
  return jax.nn.one_hot(task, classes.num_tasks) * batch["mask"][:, None]


def _class_il_top(logits, hi, classes: Classes) -> jax.Array:
  """(B, min(5, C)) best classes of ``[0, hi)``, best first."""
  logits = head_lib.masked_logits(
      logits, head_lib.class_mask(0, hi, classes.num_classes))
  return jax.lax.top_k(logits, min(5, classes.num_classes))[1]


def _ints(x) -> np.ndarray:
  return np.asarray(x).round().astype(np.int64)


# class_il ---------------------------------------------------------------------

def _class_il_sums(logits, batch, hi, classes):
  top = _class_il_top(logits, hi, classes)
  label = batch["label"]
  onehot = _onehot_task(batch, classes)
  top1 = top[:, 0] == label
  top5 = jnp.any(top == label[:, None], axis=-1)
  return {"top1": top1.astype(jnp.float32) @ onehot,
          "top5": top5.astype(jnp.float32) @ onehot,
          "count": jnp.sum(onehot, axis=0)}


def _class_il_record(sums, n):
  c1, c5, count = (_ints(sums[k])[:n] for k in ("top1", "top5", "count"))
  ev = metrics.evaluate_counts(c1, count, c5)
  return {"top1_per_task": ev["top1_per_task"],
          "top5_per_task": ev["top5_per_task"],
          "top1_sample_weighted": ev["top1_sample_weighted"],
          "top1_task_mean": ev["top1_task_mean"],
          "top5_sample_weighted": ev["top5_sample_weighted"],
          "counts": {"count": count.tolist(), "top1": c1.tolist(),
                     "top5": c5.tolist()}}


def _class_il_scalars(r):
  return {"eval/top1": r["top1_sample_weighted"],
          "eval/top1_task_mean": r["top1_task_mean"],
          "eval/top5": r["top5_sample_weighted"],
          **{f"eval/top1_task{k + 1}": v
             for k, v in enumerate(r["top1_per_task"])}}


# task_il ----------------------------------------------------------------------

def _task_il_sums(logits, batch, hi, classes):
  del hi   # an image's own task is seen whenever the image is evaluated
  label = batch["label"]
  task = classes.task_of_class()[label]
  bounds = classes.bounds()
  c = jnp.arange(classes.num_classes)
  own = (c >= bounds[task][:, None]) & (c < bounds[task + 1][:, None])
  pred = jnp.argmax(head_lib.masked_logits(logits, own), axis=-1)
  onehot = _onehot_task(batch, classes)
  return {"top1": (pred == label).astype(jnp.float32) @ onehot,
          "count": jnp.sum(onehot, axis=0)}


def _task_il_record(sums, n):
  c1, count = _ints(sums["top1"])[:n], _ints(sums["count"])[:n]
  ev = metrics.evaluate_counts(c1, count)
  return {"task_il_top1_per_task": ev["top1_per_task"],
          "task_il_top1_sample_weighted": ev["top1_sample_weighted"],
          "task_il_top1_task_mean": ev["top1_task_mean"],
          "counts": {"task_il_top1": c1.tolist()}}


def _task_il_scalars(r):
  return {"eval/task_il_top1": r["task_il_top1_sample_weighted"],
          "eval/task_il_top1_task_mean": r["task_il_top1_task_mean"]}


# cross_task -------------------------------------------------------------------

def _cross_task_sums(logits, batch, hi, classes):
  pred = _class_il_top(logits, hi, classes)[:, 0]
  label = batch["label"]
  task_of = classes.task_of_class()
  task, ptask = task_of[label], task_of[pred]
  onehot = _onehot_task(batch, classes)
  cross = ((ptask != task) * batch["mask"]).astype(jnp.float32)
  # (label, predicted class) counts of the cross-task errors: C x C floats,
  # exact while a cell stays below 2**24.
  pairs = (jax.nn.one_hot(label, classes.num_classes) * cross[:, None]).T @ (
      jax.nn.one_hot(pred, classes.num_classes))
  return {"to_earlier": (ptask < task).astype(jnp.float32) @ onehot,
          "to_later": (ptask > task).astype(jnp.float32) @ onehot,
          "pairs": pairs}


def _cross_task_record(sums, n):
  out = {"counts": {"to_earlier": _ints(sums["to_earlier"])[:n].tolist(),
                    "to_later": _ints(sums["to_later"])[:n].tolist()}}
  pairs = _ints(sums["pairs"])
  if n == len(sums["to_earlier"]):
    # Only once every task is evaluated: the checkpoint keeps every record.
    label, pred = np.nonzero(pairs)
    out["cross_task_errors"] = np.stack(
        [label, pred, pairs[label, pred]], axis=1).tolist()
  return out


def _cross_task_scalars(r):
  c = r["counts"]
  total = sum(c["count"])
  return {"eval/to_earlier_task": 100.0 * sum(c["to_earlier"]) / total,
          "eval/to_later_task": 100.0 * sum(c["to_later"]) / total}


EVALUATORS = {e.name: e for e in (
    Evaluator("class_il", _class_il_sums, _class_il_record, _class_il_scalars),
    Evaluator("task_il", _task_il_sums, _task_il_record, _task_il_scalars),
    Evaluator("cross_task", _cross_task_sums, _cross_task_record,
              _cross_task_scalars),
)}
DEFAULT = ("class_il", "task_il", "cross_task")


def make_eval_step(logits_fn: LogitsFn, num_classes: int,
                   task_sizes: Sequence[int], evaluators=DEFAULT):
  """Builds the jitted ``eval_step(eval_arrays, batch, hi) -> sums``.

  ``logits_fn(eval_arrays, images)`` -> (B, num_classes) raw logits (e.g. the
  merged backbone and the head); ``batch`` is ``{"image", "label", "mask"}``
  with padding rows masked 0; ``hi``: classes seen so far (traced). Returns
  ``{evaluator name: its sums}``; sum batches with `add`.
  """
  classes = Classes(int(num_classes), tuple(int(s) for s in task_sizes))
  chosen = [EVALUATORS[n] for n in evaluators]
  if "class_il" not in evaluators:
    raise ValueError("the task record needs the class_il evaluator")

  def eval_step(eval_arrays, batch, hi):
    logits = logits_fn(eval_arrays, batch["image"])
    return {e.name: e.sums(logits, batch, hi, classes) for e in chosen}

  return jax.jit(eval_step)


def add(a, b):
  """Sums two sums trees (``a`` may be None: the first batch)."""
  return b if a is None else jax.tree.map(jnp.add, a, b)


def task_record(sums, num_eval_tasks: int) -> dict:
  """The metrics of one evaluation over tasks ``0 .. num_eval_tasks - 1``:
  each evaluator's keys, and their integer ``counts`` merged."""
  out, counts = {}, {}
  for name, s in sums.items():
    r = EVALUATORS[name].record(s, num_eval_tasks)
    counts.update(r.pop("counts", {}))
    out.update(r)
  return {**out, "counts": counts}


def scalars(record: dict) -> dict[str, float]:
  """The record's metrics for the TensorBoard/W&B writer."""
  out = {}
  for e in EVALUATORS.values():
    try:
      out.update(e.scalars(record))
    except KeyError:   # the evaluator did not run
      pass
  return out
