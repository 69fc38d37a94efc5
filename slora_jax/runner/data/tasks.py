"""Class order and task splits, exactly as the reference's DataManager.

docs/semantics.md §6.3-6.4: ``np.random.seed(seed); np.random.permutation(n)``,
labels remapped to their position in that order, tasks of ``init_cls`` then
``increment`` classes with any remainder as a last task.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["class_order", "task_sizes", "task_ranges", "remap_labels"]


def class_order(num_classes: int, seed: int, shuffle: bool = True) -> np.ndarray:
  """Original labels in training order.

  Equal to ``np.random.seed(seed); np.random.permutation(num_classes)`` (the
  legacy MT19937 stream, stable across numpy versions) without touching
  numpy's global state.

  Args:
    num_classes: classes of the data set.
    seed: the run's seed.
    shuffle: False keeps the natural order ``0..num_classes-1``.

  Returns:
    int64 array; position p holds the original label that becomes label p.
  """
  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  if not shuffle:
    return np.arange(num_classes, dtype=np.int64)
  return np.random.RandomState(seed).permutation(num_classes).astype(np.int64)


def task_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
  """``[init_cls, increment, ..., remainder]`` summing to ``num_classes``.

  The reference appends ``increment`` while the running sum plus
  ``increment`` stays below ``num_classes``, then any remainder as a last
  (smaller or equal) task.
  """
  if init_cls <= 0 or increment <= 0:
    raise ValueError(f"init_cls ({init_cls}) and increment ({increment}) must "
                     "be positive")
  if init_cls > num_classes:
    raise ValueError(f"init_cls {init_cls} exceeds the {num_classes} classes")
  sizes = [init_cls]
  while sum(sizes) + increment < num_classes:
    sizes.append(increment)
  if sum(sizes) < num_classes:
    sizes.append(num_classes - sum(sizes))
  return sizes


def task_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
  """Half-open label ranges ``[lo, hi)`` of each task."""
  edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def remap_labels(labels, order) -> np.ndarray:
  """Maps original labels to their position in ``order``.

  The reference's ``order.index(y)``. Labels absent from ``order`` (classes
  left out of the experiment) map to -1.
  """
  order = np.asarray(order, np.int64)
  labels = np.asarray(labels, np.int64)
  if np.any(labels < 0) or np.any(order < 0):
    raise ValueError("labels and class order must be non-negative")
  if len(np.unique(order)) != len(order):
    raise ValueError("the class order repeats a class")
  size = max(int(order.max(initial=-1)), int(labels.max(initial=-1))) + 1
  lookup = np.full(size, -1, np.int64)
  lookup[order] = np.arange(len(order))
  return lookup[labels]
