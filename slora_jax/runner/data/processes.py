"""The process backend of the loader: batches assembled in grain workers.

Threads scale while PIL and numpy release the GIL; the Python around each
sample (the crop parameters, the generator, the split's reader) does not, so
a JPEG pipeline feeding an accelerator needs processes. grain's
``MapDataset.range(n).map(batch_at).to_iter_dataset().mp_prefetch(k)`` hands
batch position ``p`` to worker ``p % k`` and interleaves the workers' outputs
back in position order, so the stream is the plan's, whatever ``k`` or the
buffer sizes. Each batch is a pure function of its position (`_BatchAt`), so
the batches equal the thread backend's.

Workers are started with ``spawn`` (grain's choice: forking a process that
runs JAX's threads can deadlock) and get the dataset by cloudpickle: the
split's reader must survive pickling (file paths; TFDS's random-access
reader, whose lock each copy recreates). Each worker assembles its batches
one at a time in one thread, so a worker is one busy core. ``close()`` (also
on leaving ``with``, an exception or Ctrl-C in the consumer) stops and joins
the workers; workers ignore Ctrl-C themselves and exit when their parent dies
(`_worker_init`).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import threading

from absl import flags
import numpy as np

from slora_jax.runner.data import loader

__all__ = ["ProcessBatchIterator"]


class _BatchAt:
  """Batch position -> the batch dict; runs in a worker process."""

  def __init__(self, split, plan, labels, transform, shape):
    self.split, self.plan, self.labels = split, plan, labels
    self.transform, self.shape = transform, shape

  def __call__(self, pos) -> dict:
    indices, key = self.plan[int(pos)]
    indices = np.asarray(indices, np.int64)
    images = np.zeros((len(indices),) + self.shape, np.float32)
    for row, i in enumerate(indices):
      if i >= 0:
        images[row] = loader.sample(self.split, self.transform, self.shape,
                                    int(i), key)
    return loader.batch_dict(images, indices, self.labels)


def _worker_init(index: int, count: int) -> None:
  """Runs first in each worker: Ctrl-C and a dead parent end it cleanly.

  Ctrl-C reaches the whole terminal process group; the parent decides (the
  runner finishes its step and saves) and closes the workers, so they ignore
  it rather than die with a traceback each. A parent killed outright (SIGKILL,
  OOM) cannot close them: a watcher thread exits the worker when the parent's
  sentinel closes, so no orphan is left blocked on a full queue.
  """
  del index, count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = multiprocessing.parent_process()
  if parent is not None:
    def watch():
      parent.join()
      os._exit(0)  # pylint: disable=protected-access
    threading.Thread(target=watch, name="slora-parent-watch",
                     daemon=True).start()


def _absl_flags_ready() -> None:
  """Lets grain read its absl flags outside an absl main (tests, notebooks).

  grain 0.2 reads ``--grain_*`` flags with ``.value`` when it starts workers,
  which raises before the flags are parsed; parsing no arguments gives every
  flag its default (what an absl main would do).
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


class ProcessBatchIterator(loader.Batches):
  """`loader.Batches` over grain worker processes.

  Args:
    split, plan, labels, transform, image_shape: as `loader.BatchIterator`
      (``plan`` random access: ``len`` and ``plan[p]``).
    worker_processes: the number of worker processes (>= 1).
    prefetch: batches each worker assembles ahead.
  """

  def __init__(self, split, plan, labels, transform, image_shape,
               worker_processes: int, prefetch: int = 2):
    import grain  # pylint: disable=import-outside-toplevel
    _absl_flags_ready()
    super().__init__(split, labels, len(plan))
    batch_at = _BatchAt(split, plan, self._labels, transform,
                        tuple(int(s) for s in image_shape))
    # num_threads=0: no reader threads inside a worker (one core each).
    ds = (grain.MapDataset.range(self._num_batches).map(batch_at)
          .to_iter_dataset(grain.ReadOptions(num_threads=0)))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(worker_processes),
        per_worker_buffer_size=max(1, int(prefetch))), _worker_init)
    self._closed = False
    self._it = iter(ds)

  def __next__(self) -> dict:
    if self._closed:
      raise StopIteration
    try:
      batch = next(self._it)
    except BaseException:
      # The end, a worker's error (re-raised here as it was raised there) or
      # an interrupt: the workers stop either way.
      self.close()
      raise
    # With several workers grain hands arrays over in shared memory, freed
    # when the last reference to them dies. A plain copy frees it now: a
    # view would live on in whatever keeps it (a CPU jax.Array may alias
    # it) and be freed, with a warning, only at interpreter exit.
    return {k: np.array(v) for k, v in batch.items()}

  def close(self) -> None:
    """Stops and joins the worker processes. Safe to call twice."""
    if self._closed:
      return
    self._closed = True
    it, self._it = self._it, None
    it.close()
    del it
    # grain's iterators hold their last shared-memory arrays in reference
    # cycles; collecting now frees those blocks (else they are only freed,
    # with a resource_tracker warning, at interpreter exit).
    gc.collect()

  def __del__(self):
    if getattr(self, "_it", None) is not None:
      self.close()
