"""Deterministic, resumable, parallel batch iterators over a `Split`.

A batch is ``{'image': float32 (b, H, W, 3), 'label': int32 (b,), 'mask':
float32 (b,)}`` holding this process's rows of the global batch. The last
partial batch of an epoch is padded (``mask`` 0) so every step has the same
shapes and the step compiles once; the padded rows add nothing to the loss,
which matches the reference's ``drop_last=False``.

The order of step ``s`` is a pure function of (seed, task, epoch), and each
sample's augmentation of (seed, task, epoch, sample index), so a run resumed at
step ``s`` sees exactly the batches an uninterrupted run sees. Samples are
decoded by a thread pool (PIL and numpy release the GIL) and ``prefetch``
batches are in flight ahead of the consumer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from slora_jax.data import sources
from slora_jax.data import transforms

__all__ = ["BatchIterator", "train_batches", "eval_batches", "steps_per_epoch",
           "epoch_order", "measure_throughput"]


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
  return max(1, math.ceil(num_samples / batch_size))


def epoch_order(num_samples: int, seed: int, task: int, epoch: int) -> np.ndarray:
  """The shuffled sample positions of one epoch."""
  return transforms.sample_rng(seed, task, epoch).permutation(num_samples)


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if batch_size % process_count:
    raise ValueError(f"the global batch size {batch_size} must be divisible by "
                     f"the number of processes {process_count}")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


class BatchIterator:
  """Iterates over planned batches; closes its threads on exit or ``close()``.

  Args:
    split: the data.
    plan: an iterable of (sample indices, rng keys) per batch; index -1 is a
      padded row; a key of None means no randomness (evaluation).
    labels: the label of every sample of ``split`` (already remapped).
    transform: ``(uint8 image, rng or None) -> float32 image``.
    image_shape: (H, W, C) of a transformed image (for padded rows).
    num_workers: decoding threads.
    prefetch: batches decoded ahead.
  """

  def __init__(self, split: sources.Split, plan, labels: np.ndarray,
               transform: Callable, image_shape: Sequence[int],
               num_workers: int = 4, prefetch: int = 2):
    self._split, self._labels, self._transform = split, labels, transform
    self._shape = tuple(image_shape)
    self._plan = iter(plan)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, num_workers), thread_name_prefix="slora-data")
    self._queue = collections.deque()
    self._prefetch = max(1, prefetch)
    self._closed = False
    for _ in range(self._prefetch):
      self._submit()

  def _load(self, index: int, key) -> np.ndarray:
    if index < 0:
      return np.zeros(self._shape, np.float32)
    rng = None if key is None else transforms.sample_rng(*key)
    return self._transform(self._split.read(index), rng)

  def _submit(self) -> None:
    spec = next(self._plan, None)
    if spec is None:
      return
    indices, keys = spec
    futures = [self._pool.submit(self._load, int(i), None if keys is None else k)
               for i, k in zip(indices, keys if keys is not None
                               else [None] * len(indices))]
    self._queue.append((np.asarray(indices), futures))

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if self._closed or not self._queue:
      self.close()
      raise StopIteration
    indices, futures = self._queue.popleft()
    self._submit()
    images = np.stack([f.result() for f in futures])
    valid = indices >= 0
    labels = np.where(valid, self._labels[np.maximum(indices, 0)], 0)
    return {"image": images, "label": labels.astype(np.int32),
            "mask": valid.astype(np.float32)}

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._queue.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def train_batches(split: sources.Split, indices: np.ndarray, labels: np.ndarray,
                  batch_size: int, transform: Callable, image_shape, *, seed: int,
                  task: int, start_step: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 4, prefetch: int = 2) -> BatchIterator:
  """Training batches for global steps ``start_step .. num_steps - 1``.

  ``indices`` are the split positions of this task's samples; epochs reshuffle
  them with `epoch_order`.
  """
  indices = np.asarray(indices)
  rows = _local_rows(batch_size, process_index, process_count)
  spe = steps_per_epoch(len(indices), batch_size)

  def plan():
    order, cached_epoch = None, -1
    for step in range(start_step, num_steps):
      epoch, j = divmod(step, spe)
      if epoch != cached_epoch:
        order, cached_epoch = indices[epoch_order(len(indices), seed, task, epoch)], epoch
      chosen = order[j * batch_size:(j + 1) * batch_size]
      chosen = np.concatenate([chosen, -np.ones(batch_size - len(chosen), int)])
      local = chosen[rows]
      yield local, [(seed, task, epoch, int(i)) for i in local]

  return BatchIterator(split, plan(), labels, transform, image_shape,
                       num_workers, prefetch)


def eval_batches(split: sources.Split, indices: np.ndarray, labels: np.ndarray,
                 batch_size: int, transform: Callable, image_shape, *,
                 process_index: int = 0, process_count: int = 1,
                 num_workers: int = 4, prefetch: int = 2) -> BatchIterator:
  """Every sample of ``indices`` once, in order; the last batch padded."""
  indices = np.asarray(indices)
  rows = _local_rows(batch_size, process_index, process_count)

  def plan():
    for j in range(steps_per_epoch(len(indices), batch_size)):
      chosen = indices[j * batch_size:(j + 1) * batch_size]
      chosen = np.concatenate([chosen, -np.ones(batch_size - len(chosen), int)])
      yield chosen[rows], None

  return BatchIterator(split, plan(), labels, transform, image_shape,
                       num_workers, prefetch)


def measure_throughput(iterator, num_batches: int, warmup: int = 1) -> float:
  """Images per second delivered by ``iterator`` (real rows only)."""
  with iterator:
    for _ in range(warmup):
      next(iterator)
    t0, n = time.perf_counter(), 0
    for _ in range(num_batches):
      n += int(next(iterator)["mask"].sum())
    return n / (time.perf_counter() - t0)
