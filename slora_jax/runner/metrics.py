"""Continual-learning metrics: accuracy matrix, Acc/AAA, forgetting, BWT.

Pure numpy; definitions follow the official code (docs/semantics.md §7).

Conventions:
  * Tasks are 0-indexed. ``R[t, k]`` is the top-1 accuracy (%) on the test
    images of task k's classes, measured after training task t. It is defined
    for k ≤ t and NaN above the diagonal. Columns are tasks in *numeric* order
    of their label ranges; the reference's string sort of group keys (which
    scrambles columns once labels reach 100) is never reproduced in ``R``.
    ``reference_string_sorted_forgetting`` recomputes the value the official
    logs print, for cross-checking only.
  * A "group" is a task's label range. The reference groups labels in chunks
    of ``increment`` classes, which coincides with tasks whenever
    ``init_cls == increment`` (every published setting); we always group by task.
  * Every accuracy is ``np.around(correct * 100 / total, 2)`` like the
    reference's ``accuracy``/``_evaluate``.
  * ``*_sample_weighted``: correct / samples over all seen classes; this is what
    the reference prints as ``top1`` and what the paper's Acc/AAA are built on.
    ``*_task_mean``: the unweighted mean over seen tasks of the per-task
    (rounded) accuracies. They differ when tasks have different test sizes
    (ImageNet-A: 58.66 vs 59.24 in the official log).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "percent", "class_to_task", "group_labels", "count_correct",
    "evaluate_counts", "accuracy_matrix", "forgetting", "bwt", "summarize",
    "reference_string_sorted_forgetting",
]


def percent(correct, total) -> float:
  """``np.around(correct * 100 / total, 2)`` as a float, the reference's rounding."""
  if total <= 0:
    raise ValueError(f"accuracy over {total} samples is undefined")
  return float(np.around(np.float64(correct) * 100 / total, decimals=2))


def class_to_task(task_sizes: Sequence[int]) -> np.ndarray:
  """Task index of every label 0..sum(task_sizes)-1 (labels in class-order space)."""
  sizes = [int(s) for s in task_sizes]
  if not sizes or min(sizes) <= 0:
    raise ValueError(f"task sizes must be positive, got {task_sizes}")
  return np.repeat(np.arange(len(sizes)), sizes)


def group_labels(task_sizes: Sequence[int]) -> list[str]:
  """Reference-style group keys ``"{start:02d}-{end:02d}"``, one per task."""
  labels, start = [], 0
  for size in task_sizes:
    end = start + int(size) - 1
    labels.append(f"{start:02d}-{end:02d}")
    start = end + 1
  return labels


def count_correct(labels, topk_pred, class_task, num_tasks: int):
  """Per-task correct counts of one batch (sum batches to get the test set's).

  Args:
    labels: (N,) int labels in class-order space.
    topk_pred: (N, k) int predicted labels, best first. Top-1 uses column 0,
      top-5 the first ``min(k, 5)`` columns (with fewer than 5 seen classes
      the reference's ``torch.topk(k=5)`` would fail; we count a hit among the
      available columns).
    class_task: (C,) task index of every label, e.g. ``class_to_task(sizes)``.
    num_tasks: length of the returned arrays.

  Returns:
    ``(correct_top1, correct_top5, count)``, each an int64 array (num_tasks,).
  """
  labels = np.asarray(labels).reshape(-1)
  pred = np.asarray(topk_pred)
  if pred.ndim == 1:
    pred = pred[:, None]
  if pred.shape[0] != labels.shape[0]:
    raise ValueError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
  task = np.asarray(class_task)[labels]
  hit1 = pred[:, 0] == labels
  hit5 = np.any(pred[:, :5] == labels[:, None], axis=1)
  count = np.bincount(task, minlength=num_tasks)
  c1 = np.bincount(task, weights=hit1, minlength=num_tasks)
  c5 = np.bincount(task, weights=hit5, minlength=num_tasks)
  if count.shape[0] != num_tasks:
    raise ValueError(f"labels belong to tasks beyond num_tasks={num_tasks}")
  return c1.astype(np.int64), c5.astype(np.int64), count.astype(np.int64)


def evaluate_counts(correct_top1, count, correct_top5=None) -> dict:
  """Accuracies of one evaluation (after task t) from per-task counts, k = 0..t.

  Returns a dict with:
    ``top1_per_task``: list, row t of the accuracy matrix (rounded per task);
    ``top1_sample_weighted``: the reference's ``top1``;
    ``top1_task_mean``: mean of ``top1_per_task`` (not re-rounded);
    and the same three ``top5_*`` keys (None when ``correct_top5`` is None).
  """
  c1 = np.asarray(correct_top1, dtype=np.int64).reshape(-1)
  n = np.asarray(count, dtype=np.int64).reshape(-1)
  if c1.shape != n.shape or c1.size == 0:
    raise ValueError(f"correct {c1.shape} and count {n.shape} must be equal, non-empty")
  if np.any(n <= 0):
    # An empty task test set is a data bug, not an accuracy of 0 or 100.
    raise ValueError(f"every seen task needs test samples, counts: {n.tolist()}")
  out = {}
  for name, c in (("top1", c1), ("top5", correct_top5)):
    if c is None:
      out.update({f"{name}_per_task": None, f"{name}_sample_weighted": None,
                  f"{name}_task_mean": None})
      continue
    c = np.asarray(c, dtype=np.int64).reshape(-1)
    if c.shape != n.shape or np.any(c < 0) or np.any(c > n):
      raise ValueError(f"{name} counts {c.tolist()} do not fit counts {n.tolist()}")
    per_task = [percent(ci, ni) for ci, ni in zip(c, n)]
    out[f"{name}_per_task"] = per_task
    out[f"{name}_sample_weighted"] = percent(c.sum(), n.sum())
    out[f"{name}_task_mean"] = float(np.mean(per_task))
  return out


def accuracy_matrix(rows) -> np.ndarray:
  """(T, T) float matrix from rows ``rows[t]`` holding R[t, 0..t].

  Rows may be ragged (length t+1) or full length with None/NaN above the
  diagonal. Entries above the diagonal become NaN; entries on or below it must
  be finite.
  """
  rows = [list(r) for r in rows]
  T = len(rows)
  if T == 0:
    raise ValueError("accuracy matrix needs at least one row")
  R = np.full((T, T), np.nan)
  for t, row in enumerate(rows):
    if len(row) not in (t + 1, T):
      raise ValueError(f"row {t} has {len(row)} entries; expected {t + 1} or {T}")
    vals = np.array([np.nan if v is None else v for v in row[:t + 1]], dtype=float)
    if not np.all(np.isfinite(vals)):
      raise ValueError(f"row {t} has missing values on or below the diagonal")
    R[t, :t + 1] = vals
  return R


def _as_matrix(R) -> np.ndarray:
  R = np.array(R, dtype=float)
  if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
    raise ValueError(f"accuracy matrix must be square (T, T), got {R.shape}")
  return accuracy_matrix(R.tolist())


def forgetting(R) -> float:
  """Average forgetting as the official ``trainer.py`` defines it.

  Mean over tasks k < T-1 of ``max_t R[t, k] - R[T-1, k]``, the max taken over
  all t ≥ k *including* the last task (so each term is ≥ 0). NaN when T = 1
  (nothing can have been forgotten; stored as null in JSON).
  """
  R = _as_matrix(R)
  T = R.shape[0]
  if T == 1:
    return math.nan
  drops = [np.nanmax(R[:, k]) - R[T - 1, k] for k in range(T - 1)]
  return float(np.mean(drops))


def bwt(R) -> float:
  """Backward transfer (Lopez-Paz & Ranzato 2017): mean_{k<T-1} R[T-1,k] − R[k,k].

  Negative means forgetting. NaN when T = 1.
  """
  R = _as_matrix(R)
  T = R.shape[0]
  if T == 1:
    return math.nan
  return float(np.mean([R[T - 1, k] - R[k, k] for k in range(T - 1)]))


def _curve(values, T: int, name: str) -> Optional[np.ndarray]:
  if values is None:
    return None
  c = np.asarray(values, dtype=float).reshape(-1)
  if c.shape[0] != T or not np.all(np.isfinite(c)):
    raise ValueError(f"{name} must hold {T} finite values, got {values!r}")
  return c


def summarize(R, curve_sample_weighted, curve_task_mean=None,
              curve_top5_sample_weighted=None) -> dict:
  """Headline numbers of one run.

  Args:
    R: (T, T) top-1 accuracy matrix (see module docstring).
    curve_sample_weighted: the reference's top-1 after each task (length T).
    curve_task_mean: per-task-mean top-1 after each task; default: row means
      of ``R``, which is what ``evaluate_counts`` computes.
    curve_top5_sample_weighted: optional top-5 curve.

  Returns:
    dict with ``num_tasks``; ``acc`` (final sample-weighted top-1, the paper's
    Acc) and ``aaa`` (mean of that curve, the paper's AAA); ``acc_task_mean``
    and ``aaa_task_mean`` (same on the task-mean curve); ``acc_top5`` and
    ``aaa_top5`` (NaN without a top-5 curve); ``forgetting`` (see
    ``forgetting``) and ``bwt`` (NaN when T = 1). Not rounded.
  """
  R = _as_matrix(R)
  T = R.shape[0]
  sw = _curve(curve_sample_weighted, T, "curve_sample_weighted")
  if curve_task_mean is None:
    tm = np.array([np.mean(R[t, :t + 1]) for t in range(T)])
  else:
    tm = _curve(curve_task_mean, T, "curve_task_mean")
  t5 = _curve(curve_top5_sample_weighted, T, "curve_top5_sample_weighted")
  return {
      "num_tasks": T,
      "acc": float(sw[-1]),
      "aaa": float(np.mean(sw)),
      "acc_task_mean": float(tm[-1]),
      "aaa_task_mean": float(np.mean(tm)),
      "acc_top5": math.nan if t5 is None else float(t5[-1]),
      "aaa_top5": math.nan if t5 is None else float(np.mean(t5)),
      "forgetting": forgetting(R),
      "bwt": bwt(R),
  }


def reference_string_sorted_forgetting(R, keys: Sequence[str]) -> float:
  """The forgetting the official logs *print*, string-sort bug included.

  For cross-checking logs only (docs/semantics.md §7): after each task the
  reference sorts the seen group keys (``keys``, numeric order, e.g. from
  ``group_labels``) as strings, stacks the rows zero-padded, transposes and
  applies the ``forgetting`` formula, so with ≥100 classes its "rows" mix
  groups. Equals ``forgetting(R)`` when string and numeric order agree.
  """
  R = _as_matrix(R)
  T = R.shape[0]
  if len(keys) != T:
    raise ValueError(f"{len(keys)} keys for {T} tasks")
  if T == 1:
    return math.nan
  table = np.zeros((T, T))
  for t in range(T):
    order = sorted(range(t + 1), key=lambda i: keys[i])
    table[t, :t + 1] = R[t, order]
  table = table.T  # rows: "groups" (position in the sorted list), cols: time
  return float(np.mean((table.max(axis=1) - table[:, T - 1])[:T - 1]))


def format_matrix(R, labels: Sequence[str] | None = None) -> str:
  """R[t, k] as a text table: a row per evaluation, a column per task's classes."""
  R = _as_matrix(R)
  T, K = R.shape
  labels = list(labels) if labels is not None else [str(k + 1) for k in range(K)]
  width = max(6, *(len(l) + 1 for l in labels))
  lines = ["after task".ljust(11) + "".join(l.rjust(width) for l in labels)]
  for t in range(T):
    cells = "".join(("" if np.isnan(v) else f"{v:.1f}").rjust(width)
                    for v in R[t])
    lines.append(f"{t + 1:>10} " + cells)
  return "\n".join(lines)

