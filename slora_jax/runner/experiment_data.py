"""What the task loop needs of the data, from the data and train settings.

`prepare` opens the source, checks it against the settings (a one-line
`DataError` before anything compiles), fixes the class order and the task
split as the reference does (docs/semantics.md, class order and task sizes)
and hands out per-phase batch iterators of this process's rows.

It reads the `DataSettings` and `TrainSettings` sections of the validated
config (`slora_jax.runner.config`); their defaults live in the config files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator

import jax
import numpy as np

from slora_jax.runner import config as config_lib
from slora_jax.runner.data import loader
from slora_jax.runner.data import manifest as manifest_lib
from slora_jax.runner.data import sources
from slora_jax.runner.data import tasks
from slora_jax.runner.data import transforms

__all__ = ["ExperimentData", "prepare"]


def _rank_in_class(lab: np.ndarray) -> np.ndarray:
  """Rank of each sample within its class (stable: split order)."""
  by_class = np.argsort(lab, kind="stable")
  starts = np.searchsorted(lab[by_class], lab[by_class])
  rank = np.empty(len(lab), np.int64)
  rank[by_class] = np.arange(len(lab)) - starts
  return rank


def _first_per_class(labels: np.ndarray, num_classes: int, k: int) -> np.ndarray:
  """Split positions with a label in ``[0, num_classes)``; at most k per class."""
  idx = np.flatnonzero((labels >= 0) & (labels < num_classes))
  if k <= 0:
    return idx
  return idx[_rank_in_class(labels[idx]) < k]


@dataclasses.dataclass
class ExperimentData:
  """Class order, task split and batch iterators of one seed's run.

  Labels handed out are positions in ``class_order`` (the reference's
  remapping), so task ``t`` holds labels ``[lo, hi)`` of ``task_ranges[t]``.
  """
  data: config_lib.DataSettings
  train: config_lib.TrainSettings
  seed: int
  source: sources.Source
  split_train: sources.Split
  split_test: sources.Split
  class_order: list[int]         # original label of each remapped label
  task_sizes: list[int]          # classes per class group (task)
  train_tasks: list[tuple[int, int]]  # label range of each training phase
  train_labels: np.ndarray       # remapped label of every train sample (-1: unused)
  test_labels: np.ndarray
  train_index: np.ndarray        # train split positions used (all phases)
  test_index: np.ndarray
  process_index: int = 0
  process_count: int = 1
  manifest: dict | None = None   # what was read (`manifest_lib`)
  # >0 (dry runs): evaluate that many test images per task, spread over the
  # seen classes in turn, and never fewer than one per seen class.
  eval_limit: int = 0

  @property
  def num_tasks(self) -> int:
    """Number of class groups (tasks) in the class-incremental protocol."""
    return len(self.task_sizes)

  @property
  def num_classes(self) -> int:
    return int(sum(self.task_sizes))

  @property
  def task_ranges(self) -> list[tuple[int, int]]:
    return tasks.task_ranges(self.task_sizes)

  @property
  def class_names(self) -> list[str]:
    """Names of the classes in remapped-label order."""
    return [str(self.source.class_names[c]) for c in self.class_order]

  def train_indices(self, t: int) -> np.ndarray:
    """Train split positions of training phase ``t``."""
    lo, hi = self.train_tasks[t]
    lab = self.train_labels[self.train_index]
    return self.train_index[(lab >= lo) & (lab < hi)]

  def test_indices(self, hi: int) -> np.ndarray:
    """Test split positions of the classes ``[0, hi)``."""
    idx = self.test_index[self.test_labels[self.test_index] < hi]
    if self.eval_limit <= 0:
      return idx
    # Round-robin over classes: the k-th image of every class before any
    # class's (k+1)-th, so the first ``hi`` positions cover every class.
    turn = np.lexsort((self.test_labels[idx], _rank_in_class(
        self.test_labels[idx])))
    return np.sort(idx[turn[:max(self.eval_limit, hi)]])

  def steps(self, t: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of training phase ``t``.

    ``total = epochs * steps_per_epoch``, capped by ``max_steps_per_task``
    when that is > 0.
    """
    tr = self.train
    spe = loader.steps_per_epoch(len(self.train_indices(t)), tr.batch_size)
    total = spe * tr.epochs
    if tr.max_steps_per_task > 0:
      total = min(total, tr.max_steps_per_task)
    return spe, total

  def _loader_args(self) -> dict:
    return dict(process_index=self.process_index,
                process_count=self.process_count,
                num_workers=self.data.num_workers, prefetch=self.data.prefetch,
                worker_processes=(self.data.worker_processes
                                  if self.data.source in _FILE_SOURCES else 0))

  @contextlib.contextmanager
  def train_batches(self, t: int,
                    start_step: int = 0) -> Iterator[loader.Batches]:
    """Local batches of phase ``t`` for steps ``start_step .. total - 1``."""
    d = self.data
    it = loader.train_batches(
        self.split_train, self.train_indices(t), self.train_labels,
        self.train.batch_size,
        transforms.TrainTransform(d.image_size, d.normalize, scale=d.crop_scale),
        seed=self.seed, task=t, start_step=start_step,
        num_steps=self.steps(t)[1], **self._loader_args())
    with it:
      yield it

  def plain_train_batches(self, t: int) -> loader.Batches:
    """Local batches over phase ``t``'s training samples with the evaluation
    transforms, padded (what statistics such as prototypes are taken on)."""
    d = self.data
    return loader.eval_batches(
        self.split_train, self.train_indices(t), self.train_labels,
        self.train.eval_batch_size or self.train.batch_size,
        transforms.EvalTransform(d.image_size, d.test_resize, d.normalize),
        **self._loader_args())

  def eval_hi(self, t: int) -> int:
    """Classes seen after training phase ``t`` (joint: all)."""
    return self.train_tasks[t][1]

  def eval_tasks(self, t: int) -> int:
    """Class groups seen after training phase ``t`` (joint: all)."""
    ends = np.cumsum(self.task_sizes)
    return int(np.searchsorted(ends, self.eval_hi(t)) + 1)

  def eval_batches(self, hi: int) -> loader.Batches:
    """Local batches over the test samples with label < ``hi``, padded."""
    d = self.data
    return loader.eval_batches(
        self.split_test, self.test_indices(hi), self.test_labels,
        self.train.eval_batch_size or self.train.batch_size,
        transforms.EvalTransform(d.image_size, d.test_resize, d.normalize),
        **self._loader_args())


# Sources whose samples are decoded from files: worth worker processes.
_FILE_SOURCES = ("folder", "tfds")


def _check_settings(d: config_lib.DataSettings,
                    tr: config_lib.TrainSettings) -> None:
  for key in ("source", "init_cls"):
    if getattr(d, key) in (None, "", 0):
      raise sources.DataError(f"data.{key} is not set; set --config.data.{key}")
  if d.normalize not in transforms.NORMALIZATIONS:
    raise sources.DataError(
        f"unknown data.normalize {d.normalize!r}; use one of "
        f"{', '.join(transforms.NORMALIZATIONS)}")
  size, resize = d.image_size, d.test_resize
  if size <= 0 or resize < size:
    raise sources.DataError(f"data.resize_size ({resize}) must be >= "
                            f"data.image_size ({size}) > 0")
  if tr.batch_size <= 0 or tr.epochs <= 0:
    raise sources.DataError(f"train.batch_size ({tr.batch_size}) and "
                            f"train.epochs ({tr.epochs}) must be positive")
  if d.worker_processes < 0:
    raise sources.DataError(f"data.worker_processes ({d.worker_processes}) "
                            "must be >= 0 (0: threads in this process)")


def _task_sizes(source, d: config_lib.DataSettings) -> list[int]:
  """Classes per task; a one-line DataError when the data cannot give them."""
  n = d.num_classes or source.num_classes
  increment = d.increment or d.init_cls
  need = d.init_cls + increment * (d.num_tasks - 1)
  if d.num_tasks and n < need:
    raise sources.DataError(
        f"{source.description} has fewer classes ({n}) than init_cls + "
        f"increment*(N-1) = {d.init_cls} + {increment}*({d.num_tasks}-1) = "
        f"{need} for N={d.num_tasks} tasks; use fewer tasks or classes per "
        "task, or a data set with more classes")
  sources.validate(source, n)
  try:
    sizes = tasks.task_sizes(n, d.init_cls, increment)
  except ValueError as e:
    raise sources.DataError(f"{e}; fix --config.data.init_cls/increment/"
                            "num_classes") from None
  if d.num_tasks and len(sizes) != d.num_tasks:
    raise sources.DataError(
        f"{n} classes with init_cls={d.init_cls}, increment={increment} give "
        f"{len(sizes)} tasks, not data.num_tasks={d.num_tasks}; set "
        f"--config.data.num_classes={need} or change num_tasks")
  return sizes


def _check_nonempty(source, order, name: str, labels: np.ndarray) -> None:
  counts = np.bincount(labels[labels >= 0], minlength=len(order))
  empty = np.flatnonzero(counts == 0)
  if len(empty):
    cls = source.class_names[int(order[empty[0]])]
    raise sources.DataError(
        f"class {cls!r} of {source.description} has no {name} samples "
        f"({len(empty)} classes are empty); every class needs training and "
        "test images")


def prepare(data: config_lib.DataSettings, train: config_lib.TrainSettings,
            seed: int, *, single_phase: bool = False,
            process_index: int | None = None,
            process_count: int | None = None) -> ExperimentData:
  """Opens and validates the data of a run.

  Args:
    data, train: the config's sections.
    seed: the run's seed; it fixes the class order (as the reference's
      ``np.random.seed(seed)``), the sample order and the augmentation.
    single_phase: one training phase over all classes (the joint method)
      instead of one per task.
    process_index, process_count: which rows of each global batch this
      process decodes (default: JAX's).

  Raises:
    DataError: one line naming a data or config problem and its fix.
  """
  _check_settings(data, train)
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  for bs in (train.batch_size, train.eval_batch_size or train.batch_size):
    loader.local_rows(bs, process_index, process_count)

  source = sources.make_source(data)
  sizes = _task_sizes(source, data)
  n = int(sum(sizes))
  # The reference permutes all classes of the data set; with num_classes
  # below that, the first n classes of the permutation are used.
  order = tasks.class_order(source.num_classes, seed, data.shuffle_classes)[:n]
  split_train, split_test = source.split("train"), source.split("test")
  manifest = manifest_lib.of_source(source, (split_train, split_test),
                                    write_cache=process_index == 0)
  train_labels = tasks.remap_labels(split_train.labels, order)
  test_labels = tasks.remap_labels(split_test.labels, order)
  _check_nonempty(source, order, "train", train_labels)
  _check_nonempty(source, order, "test", test_labels)
  train_index = _first_per_class(train_labels, n, data.max_train_per_class)
  test_index = _first_per_class(test_labels, n, data.max_test_per_class)
  train_tasks = [(0, n)] if single_phase else tasks.task_ranges(sizes)
  logging.info("data: %s, %d classes in %d tasks %s, %d train / %d test "
               "samples, first classes of the order %s", source.description,
               n, len(sizes), sizes, len(train_index), len(test_index),
               [int(c) for c in order[:8]])
  return ExperimentData(
      data=data, train=train, seed=seed, source=source,
      split_train=split_train, split_test=split_test,
      class_order=[int(c) for c in order], task_sizes=sizes,
      train_tasks=train_tasks, train_labels=train_labels,
      test_labels=test_labels, train_index=train_index, test_index=test_index,
      process_index=int(process_index), process_count=int(process_count),
      manifest=manifest)
