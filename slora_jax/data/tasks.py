"""Class order and task splits, exactly as the reference's DataManager.

SD-LoRA-SPEC.md §6.3-6.4: ``np.random.seed(seed); np.random.permutation(n)``,
labels remapped to their position in that order, tasks of ``init_cls`` then
``increment`` classes with any remainder as a last task.
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_order", "task_sizes", "task_ranges", "remap_labels"]


def class_order(num_classes: int, seed: int, shuffle: bool = True) -> np.ndarray:
  """Original labels in training order (legacy MT19937: stable across numpy)."""
  if not shuffle:
    return np.arange(num_classes)
  return np.random.RandomState(seed).permutation(num_classes)


def task_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
  """``[init_cls, increment, ..., remainder]`` summing to ``num_classes``."""
  if init_cls <= 0 or increment <= 0:
    raise ValueError(f"init_cls ({init_cls}) and increment ({increment}) must be > 0")
  if init_cls > num_classes:
    raise ValueError(f"init_cls {init_cls} exceeds the {num_classes} classes")
  sizes = [init_cls]
  while sum(sizes) + increment < num_classes:
    sizes.append(increment)
  if sum(sizes) < num_classes:
    sizes.append(num_classes - sum(sizes))
  return sizes


def task_ranges(sizes) -> list[tuple[int, int]]:
  """Half-open label ranges ``[lo, hi)`` of each task."""
  edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def remap_labels(labels, order) -> np.ndarray:
  """Maps original labels to their position in ``order`` (-1 if absent)."""
  order = np.asarray(order)
  lookup = np.full(max(int(np.max(order)), int(np.max(labels, initial=0))) + 1,
                   -1, np.int64)
  lookup[order] = np.arange(len(order))
  return lookup[np.asarray(labels)]
