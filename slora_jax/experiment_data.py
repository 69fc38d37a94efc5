"""What the task loop needs of the data, built from ``config.data``/``train``.

`prepare` opens the source, checks it against the config (one-line
`DataError` before anything compiles), fixes the class order and task split,
and hands out per-task batch iterators of this process's rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import jax
import numpy as np

from slora_jax.data import loader
from slora_jax.data import sources
from slora_jax.data import tasks
from slora_jax.data import transforms

__all__ = ["ExperimentData", "prepare"]


def _first_per_class(labels: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
  """Positions of samples whose label is in ``keep``; at most ``k`` per class."""
  idx = np.flatnonzero(np.isin(labels, keep))
  if k <= 0:
    return idx
  out = [idx[labels[idx] == c][:k] for c in np.unique(labels[idx])]
  return np.sort(np.concatenate(out)) if out else idx


@dataclasses.dataclass
class ExperimentData:
  """Class order, task split and batch iterators of one seed's run."""
  config: object
  seed: int
  split_train: sources.Split
  split_test: sources.Split
  class_order: list
  task_sizes: list
  train_tasks: list
  train_labels: np.ndarray      # remapped: position in class_order
  test_labels: np.ndarray
  train_index: np.ndarray       # split positions used (all tasks)
  test_index: np.ndarray

  @property
  def num_tasks(self) -> int:
    return len(self.task_sizes)

  @property
  def num_classes(self) -> int:
    return int(sum(self.task_sizes))

  def _task_samples(self, t: int) -> np.ndarray:
    lo, hi = self.train_tasks[t]
    lab = self.train_labels[self.train_index]
    return self.train_index[(lab >= lo) & (lab < hi)]

  def steps(self, t: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of training phase ``t``."""
    tr = self.config.train
    spe = loader.steps_per_epoch(len(self._task_samples(t)), tr.batch_size)
    total = spe * tr.epochs
    if tr.get("max_steps_per_task", 0) > 0:
      total = min(total, tr.max_steps_per_task)
    return spe, total

  def _image_shape(self):
    s = self.config.data.image_size
    return (s, s, 3)

  def _workers(self):
    d = self.config.data
    return dict(process_index=jax.process_index(),
                process_count=jax.process_count(),
                num_workers=d.get("num_workers", 4), prefetch=d.get("prefetch", 2))

  @contextlib.contextmanager
  def train_batches(self, t: int, start_step: int = 0):
    d = self.config.data
    it = loader.train_batches(
        self.split_train, self._task_samples(t), self.train_labels,
        self.config.train.batch_size,
        transforms.TrainTransform(d.image_size, d.get("normalize", "none")),
        self._image_shape(), seed=self.seed, task=t, start_step=start_step,
        num_steps=self.steps(t)[1], **self._workers())
    with it:
      yield it

  def eval_hi(self, t: int) -> int:
    """Classes seen after training phase ``t``."""
    return self.train_tasks[t][1]

  def eval_tasks(self, t: int) -> int:
    """Class groups seen after training phase ``t``."""
    hi = self.eval_hi(t)
    return int(np.searchsorted(np.cumsum(self.task_sizes), hi) + 1)

  def eval_batches(self, hi: int):
    d = self.config.data
    idx = self.test_index[self.test_labels[self.test_index] < hi]
    return loader.eval_batches(
        self.split_test, idx, self.test_labels,
        self.config.train.get("eval_batch_size", self.config.train.batch_size),
        transforms.EvalTransform(d.image_size, d.get("resize_size", d.image_size),
                                 d.get("normalize", "none")),
        self._image_shape(), **self._workers())


def prepare(config, seed: int) -> ExperimentData:
  """Opens and validates the data for ``config`` and ``seed``."""
  d = config.data
  source = sources.make_source(d)
  n_source = source.num_classes
  n = d.get("num_classes", 0) or n_source
  if n > n_source:
    raise sources.DataError(
        f"the config asks for {n} classes but the data has only {n_source}; "
        "lower --config.data.num_classes or use a data set with more classes")
  try:
    sizes = tasks.task_sizes(n, d.init_cls, d.increment)
  except ValueError as e:
    raise sources.DataError(f"{e}; fix --config.data.init_cls/increment") from None
  want_tasks = d.get("num_tasks", 0)
  if want_tasks and len(sizes) < want_tasks:
    raise sources.DataError(
        f"{want_tasks} tasks need init_cls + increment*(N-1) = "
        f"{d.init_cls + d.increment * (want_tasks - 1)} classes, but the data "
        f"has {n}; use fewer tasks or a larger data set")
  order = tasks.class_order(n_source, seed, d.get("shuffle_classes", True))
  order = order[:n] if n < n_source else order
  train, test = source.split("train"), source.split("test")
  train_labels = tasks.remap_labels(train.labels, order)
  test_labels = tasks.remap_labels(test.labels, order)
  for name, labels in (("train", train_labels), ("test", test_labels)):
    counts = np.bincount(labels[labels >= 0], minlength=n)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
      cls = source.class_names[int(order[empty[0]])]
      raise sources.DataError(
          f"class {cls!r} has no {name} samples ({len(empty)} empty classes); "
          "every class needs training and test images")
  train_index = _first_per_class(train_labels, np.arange(n),
                                 d.get("max_train_per_class", 0))
  test_index = _first_per_class(test_labels, np.arange(n),
                                d.get("max_test_per_class", 0))
  ranges = tasks.task_ranges(sizes)
  train_tasks = [(0, n)] if config.method == "joint" else ranges
  logging.info("data: %s, %d classes in %d tasks, %d train / %d test samples",
               d.source, n, len(sizes), len(train_index), len(test_index))
  return ExperimentData(config=config, seed=seed, split_train=train,
                        split_test=test, class_order=[int(c) for c in order],
                        task_sizes=sizes, train_tasks=train_tasks,
                        train_labels=train_labels, test_labels=test_labels,
                        train_index=train_index, test_index=test_index)
