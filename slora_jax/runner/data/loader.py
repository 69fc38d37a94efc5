"""Deterministic, resumable, parallel batch iterators over a `Split`.

A batch is ``{'image': float32 (b, H, W, 3), 'label': int32 (b,), 'mask':
float32 (b,)}``: this process's ``b = batch_size / process_count`` rows of the
global batch. The last partial batch of an epoch is padded with zero images
(``mask`` 0) so every step has the same shapes and compiles once. The reference
trains with ``drop_last=False`` (docs/semantics.md §4) and averages the loss over
the real samples of each batch; with the mask the same samples are seen and
the padded rows add nothing.

Training step ``s`` belongs to epoch ``s // steps_per_epoch``; an epoch's
sample order is a permutation drawn from ``SeedSequence([seed, task, epoch])``
and each sample's augmentation from a child of it keyed by the sample's index
(`transforms.sample_rng`). So a batch is a pure function of (seed, task, step):
a run resumed at step ``s`` sees exactly the batches of an uninterrupted run,
whatever the number of threads. With several processes every process draws
the same global batch and decodes only its own contiguous slice of it.

Samples are decoded and transformed by a thread pool (PIL and numpy release
the GIL); a background thread assembles up to ``prefetch`` batches ahead.
Iterators are context managers: leaving the ``with`` block (or ``close()``,
or reaching the end) stops the threads.

With ``worker_processes > 0`` the batches are assembled in that many worker
processes instead (grain, `slora_jax.runner.data.processes`): the plan is
random access (`_TrainPlan`, `_EvalPlan`), so batch ``p`` is assembled by
worker ``p % k`` from the same plan and the same sample keys, and grain
returns them in order: the batches are those of the threads.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from slora_jax.runner.data import sources
from slora_jax.runner.data import transforms

__all__ = ["Batches", "BatchIterator", "train_batches", "eval_batches", "steps_per_epoch",
           "epoch_order", "local_rows", "measure_throughput"]

_PAD = -1


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
  """``ceil(num_samples / batch_size)``: the last partial batch is kept."""
  if num_samples <= 0 or batch_size <= 0:
    raise ValueError(f"need samples and a positive batch size, got "
                     f"{num_samples} samples and batch size {batch_size}")
  return math.ceil(num_samples / batch_size)


def epoch_order(num_samples: int, seed: int, task: int, epoch: int) -> np.ndarray:
  """The shuffled sample positions of one epoch."""
  return transforms.epoch_rng(seed, task, epoch).permutation(num_samples)


def local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's contiguous slice of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} outside 0..{process_count - 1}")
  if batch_size % process_count:
    raise sources.DataError(
        f"the global batch size {batch_size} is not divisible by the "
        f"{process_count} processes; set --config.train.batch_size and "
        "eval_batch_size to multiples of the process count")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def _padded(chosen: np.ndarray, batch_size: int) -> np.ndarray:
  out = np.full(batch_size, _PAD, np.int64)
  out[:len(chosen)] = chosen
  return out


def sample(split, transform, shape: tuple, index: int, key) -> np.ndarray:
  """Sample ``index`` transformed with its own generator (``key`` + index)."""
  rng = None if key is None else transforms.sample_rng(*key, index)
  x = transform(split.read(index), rng)
  if x.shape != shape:
    raise ValueError(f"{split.describe(index)}: the transform gave "
                     f"shape {x.shape}, expected {shape}")
  return x


def batch_dict(images: np.ndarray, indices: np.ndarray, labels) -> dict:
  """The batch of decoded ``images`` of ``indices`` (-1: a padded row)."""
  valid = indices != _PAD
  chosen = np.where(valid, labels[np.where(valid, indices, 0)], 0)
  return {"image": images, "label": chosen.astype(np.int32),
          "mask": valid.astype(np.float32)}


class _TrainPlan:
  """Batch position -> (this process's sample indices, epoch key).

  Random access (the worker processes each assemble every k-th batch); one
  epoch's order is cached as one tuple, so concurrent readers see a
  consistent (epoch, order) pair.
  """

  def __init__(self, indices, batch_size, rows, seed, task, start_step,
               num_steps, shuffle):
    self.indices, self.batch_size, self.rows = indices, batch_size, rows
    self.seed, self.task, self.shuffle = seed, task, shuffle
    self.start, self.stop = start_step, num_steps
    self.spe = steps_per_epoch(len(indices), batch_size)
    self._cached = (-1, None)

  def __len__(self) -> int:
    return max(0, self.stop - self.start)

  def _order(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._cached
    if cached_epoch != epoch:
      order = (self.indices[epoch_order(len(self.indices), self.seed,
                                        self.task, epoch)]
               if self.shuffle else self.indices)
      self._cached = (epoch, order)
    return order

  def __getitem__(self, pos: int):
    if not 0 <= pos < len(self):
      raise IndexError(pos)
    epoch, j = divmod(self.start + pos, self.spe)
    b = self.batch_size
    chosen = _padded(self._order(epoch)[j * b:(j + 1) * b], b)
    return chosen[self.rows], (self.seed, self.task, epoch)


class _EvalPlan:
  """Batch position -> (this process's sample indices, None): in order."""

  def __init__(self, indices, batch_size, rows):
    self.indices, self.batch_size, self.rows = indices, batch_size, rows
    self.n = steps_per_epoch(len(indices), batch_size) if len(indices) else 0

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, pos: int):
    if not 0 <= pos < self.n:
      raise IndexError(pos)
    b = self.batch_size
    return _padded(self.indices[pos * b:(pos + 1) * b], b)[self.rows], None


def _iterator(split, plan, labels, transform, shape, num_workers, prefetch,
              worker_processes):
  """The thread backend, or the process backend for ``worker_processes > 0``."""
  if worker_processes < 0:
    raise ValueError(f"worker_processes must be >= 0, got {worker_processes}")
  if worker_processes == 0:
    return BatchIterator(split, plan, labels, transform, shape, len(plan),
                         num_workers, prefetch)
  from slora_jax.runner.data import processes  # grain only when asked for
  return processes.ProcessBatchIterator(split, plan, labels, transform, shape,
                                        worker_processes, prefetch)


class _Producer:
  """The background side of a `BatchIterator` (holds no reference to it, so
  an abandoned iterator is garbage collected and its threads stopped)."""

  def __init__(self, split, labels, transform, image_shape, num_workers,
               prefetch):
    self.split, self.labels, self.transform = split, labels, transform
    self.shape = image_shape
    self.stop = threading.Event()
    self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
    self.pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, int(num_workers)), thread_name_prefix="slora-decode")

  def _load(self, images: np.ndarray, row: int, index: int, key) -> None:
    if not self.stop.is_set():
      images[row] = sample(self.split, self.transform, self.shape, index, key)

  def _assemble(self, indices: np.ndarray, key) -> dict:
    indices = np.asarray(indices, np.int64)
    images = np.zeros((len(indices),) + self.shape, np.float32)
    futures = [self.pool.submit(self._load, images, row, int(i), key)
               for row, i in enumerate(indices) if i != _PAD]
    try:
      for f in futures:
        f.result()
    except BaseException:
      for f in futures:
        f.cancel()
      raise
    return batch_dict(images, indices, self.labels)

  def _put(self, item) -> bool:
    while not self.stop.is_set():
      try:
        self.queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def run(self, plan: Iterator) -> None:
    try:
      for indices, key in plan:
        if self.stop.is_set():
          return
        if not self._put(("batch", self._assemble(indices, key))):
          return
      self._put(("end", None))
    except BaseException as e:  # pylint: disable=broad-except
      if not self.stop.is_set():
        self._put(("error", e))

  def shutdown(self, thread: threading.Thread | None) -> None:
    self.stop.set()
    self.pool.shutdown(wait=False, cancel_futures=True)
    while True:  # unblock a producer waiting on a full queue
      try:
        self.queue.get_nowait()
      except queue.Empty:
        break
    if thread is not None and thread is not threading.current_thread():
      thread.join(timeout=30)
      if thread.is_alive():
        logging.warning("the data prefetch thread did not stop within 30 s")
        return
    # Samples being decoded finish (the others were cancelled); then no
    # thread of this iterator is left.
    self.pool.shutdown(wait=True)


class Batches:
  """What both backends give: ``len()``, iteration, ``close()`` and ``with``.

  Subclasses implement ``__next__`` and ``close`` (safe to call twice).
  """

  def __init__(self, split: sources.Split, labels, num_batches: int):
    self._labels = np.asarray(labels)
    if len(self._labels) != len(split):
      raise ValueError(f"{len(self._labels)} labels for {len(split)} samples")
    self._num_batches = int(num_batches)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    raise NotImplementedError

  def close(self) -> None:
    raise NotImplementedError

  def __enter__(self) -> "Batches":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class BatchIterator(Batches):
  """Decodes planned batches in background threads; yields them in order.

  Args:
    split: the data.
    plan: iterable of ``(sample indices, epoch key)`` per batch. Index -1 is a
      padded row. The epoch key ``(seed, task, epoch)`` seeds each sample's
      augmentation with `transforms.sample_rng`; None means no randomness
      (evaluation).
    labels: the label of every sample of ``split`` (already remapped).
    transform: ``(uint8 image, rng or None) -> float32 image_shape``.
    image_shape: (H, W, C) of a transformed image.
    num_batches: how many batches ``plan`` yields (``len()`` of the iterator).
    num_workers: decoding threads.
    prefetch: batches assembled ahead of the consumer.
  """

  def __init__(self, split: sources.Split,
               plan: Iterable[tuple[np.ndarray, tuple[int, int, int] | None]],
               labels: np.ndarray, transform: Callable,
               image_shape: Sequence[int], num_batches: int,
               num_workers: int = 4, prefetch: int = 2):
    super().__init__(split, labels, num_batches)
    self._closed, self._thread = False, None
    self._producer = _Producer(split, self._labels, transform,
                               tuple(int(s) for s in image_shape), num_workers,
                               prefetch)
    self._thread = threading.Thread(target=self._producer.run,
                                    args=(iter(plan),), name="slora-prefetch",
                                    daemon=True)
    self._thread.start()

  def __next__(self) -> dict:
    if self._closed:
      raise StopIteration
    while True:
      try:
        kind, payload = self._producer.queue.get(timeout=0.5)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._producer.queue.empty():
          self.close()
          raise RuntimeError("the data loading thread stopped unexpectedly")
    if kind == "batch":
      return payload
    self.close()
    if kind == "error":
      raise payload
    raise StopIteration

  def close(self) -> None:
    """Stops the threads; pending batches are dropped. Safe to call twice."""
    if self._closed:
      return
    self._closed = True
    self._producer.shutdown(self._thread)

  def __del__(self):
    if getattr(self, "_producer", None) is not None:
      self.close()


def _image_shape(transform, image_shape):
  if image_shape is not None:
    return tuple(image_shape)
  return (transform.size, transform.size, 3)


def train_batches(split: sources.Split, indices: np.ndarray, labels: np.ndarray,
                  batch_size: int, transform: Callable,
                  image_shape: Sequence[int] | None = None, *, seed: int,
                  task: int, start_step: int = 0, num_steps: int,
                  shuffle: bool = True, process_index: int = 0,
                  process_count: int = 1, num_workers: int = 4,
                  prefetch: int = 2, worker_processes: int = 0):
  """Training batches for global steps ``start_step .. num_steps - 1``.

  Args:
    split: the training split.
    indices: the split positions of this phase's samples (e.g. one task's).
    labels: the (remapped) label of every sample of ``split``.
    batch_size: the global batch size.
    transform: e.g. `transforms.TrainTransform`.
    image_shape: (H, W, C) of a transformed image (default from
      ``transform.size``).
    seed, task: with the epoch, fix the order and the augmentation.
    start_step: the first step to yield (resume).
    num_steps: the end step (exclusive); may span several epochs.
    shuffle: reshuffle every epoch (False: ``indices`` order every epoch).
    process_index, process_count: which rows of each global batch to decode.
    num_workers: decoding threads (thread backend).
    prefetch: batches assembled ahead (per worker process).
    worker_processes: > 0: assemble batches in this many processes (grain)
      instead of threads; the batches are the same.

  Returns:
    A `BatchIterator` (or `processes.ProcessBatchIterator`) of
    ``num_steps - start_step`` local batches.
  """
  indices = np.asarray(indices, np.int64)
  rows = local_rows(batch_size, process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  plan = _TrainPlan(indices, batch_size, rows, seed, task, start_step,
                    num_steps, shuffle)
  return _iterator(split, plan, labels, transform,
                   _image_shape(transform, image_shape), num_workers, prefetch,
                   worker_processes)


def eval_batches(split: sources.Split, indices: np.ndarray, labels: np.ndarray,
                 batch_size: int, transform: Callable,
                 image_shape: Sequence[int] | None = None, *,
                 process_index: int = 0, process_count: int = 1,
                 num_workers: int = 4, prefetch: int = 2,
                 worker_processes: int = 0):
  """Every sample of ``indices`` once, in order; the last batch padded.

  Every process yields the same number of batches (its slice of each global
  batch), so collective evaluation steps stay in lockstep. Arguments as
  `train_batches`.
  """
  indices = np.asarray(indices, np.int64)
  rows = local_rows(batch_size, process_index, process_count)
  return _iterator(split, _EvalPlan(indices, batch_size, rows), labels,
                   transform, _image_shape(transform, image_shape),
                   num_workers, prefetch, worker_processes)


def measure_throughput(iterator, num_batches: int,
                       warmup: int = 1) -> float:
  """Images per second (real rows only) that ``iterator`` delivers.

  Consumes ``warmup`` batches untimed, then times ``num_batches``; closes the
  iterator.
  """
  with iterator:
    for _ in range(warmup):
      next(iterator)
    t0, n = time.perf_counter(), 0
    for _ in range(num_batches):
      n += int(next(iterator)["mask"].sum())
    return n / (time.perf_counter() - t0)
