"""What the task loop needs of the data, built from ``config.data``/``train``.

`prepare` opens the source, checks it against the config (a one-line
`DataError` before anything compiles), fixes the class order and the task
split as the reference does (SD-LoRA-SPEC.md §6.3-6.4) and hands out per-phase
batch iterators of this process's rows.

Config fields read (defaults in brackets):

* ``method``: 'joint' trains one phase on all classes; the other methods
  ('sdlora', 'sdlora_rr', 'sdlora_kd', 'seq_lora') one phase per task.
* ``data``: ``source`` (idx | folder | tfds | synthetic), ``name`` [''],
  ``root`` [''], ``data_dir`` [''], ``tfds_split_mode`` ['reference'],
  ``tfds_split_seed`` [0], ``synthetic`` (num_classes, train_per_class,
  test_per_class, seed), ``image_size`` [224], ``resize_size``
  [image_size * 8/7, i.e. 256 for 224], ``normalize`` ['none'],
  ``num_classes`` [0 = every class of the source], ``init_cls``,
  ``increment`` [init_cls], ``num_tasks`` [0 = no check], ``shuffle_classes``
  [True], ``max_train_per_class`` / ``max_test_per_class`` [0 = all; else the
  first k samples of each class, in the source's order], ``num_workers`` [4],
  ``prefetch`` [2].
* ``train``: ``batch_size``, ``eval_batch_size`` [batch_size], ``epochs``,
  ``max_steps_per_task`` [0 = no cap].
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator

import jax
import numpy as np

from slora_jax.runner.data import loader
from slora_jax.runner.data import sources
from slora_jax.runner.data import tasks
from slora_jax.runner.data import transforms

__all__ = ["ExperimentData", "prepare", "METHODS"]

METHODS = ("sdlora", "sdlora_rr", "sdlora_kd", "seq_lora", "joint")


def _first_per_class(labels: np.ndarray, num_classes: int, k: int) -> np.ndarray:
  """Split positions with a label in ``[0, num_classes)``; at most k per class."""
  idx = np.flatnonzero((labels >= 0) & (labels < num_classes))
  if k <= 0:
    return idx
  # Rank of each sample within its class (stable: split order).
  lab = labels[idx]
  by_class = np.argsort(lab, kind="stable")
  starts = np.searchsorted(lab[by_class], lab[by_class])
  rank = np.empty(len(idx), np.int64)
  rank[by_class] = np.arange(len(idx)) - starts
  return idx[rank < k]


def _default_resize(image_size: int) -> int:
  return int(round(image_size * 256 / 224))


@dataclasses.dataclass
class ExperimentData:
  """Class order, task split and batch iterators of one seed's run.

  Labels handed out are positions in ``class_order`` (the reference's
  remapping), so task ``t`` holds labels ``[lo, hi)`` of ``task_ranges[t]``.
  """
  config: object
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
    return self.test_index[self.test_labels[self.test_index] < hi]

  def steps(self, t: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of training phase ``t``.

    ``total = epochs * steps_per_epoch``, capped by ``max_steps_per_task``
    when that is > 0.
    """
    tr = self.config.train
    spe = loader.steps_per_epoch(len(self.train_indices(t)), tr.batch_size)
    total = spe * tr.epochs
    cap = tr.get("max_steps_per_task", 0)
    if cap and cap > 0:
      total = min(total, cap)
    return spe, total

  def _data(self, key, default=None):
    return self.config.data.get(key, default)

  def _loader_args(self) -> dict:
    return dict(process_index=self.process_index,
                process_count=self.process_count,
                num_workers=self._data("num_workers", 4),
                prefetch=self._data("prefetch", 2))

  @contextlib.contextmanager
  def train_batches(self, t: int,
                    start_step: int = 0) -> Iterator[loader.BatchIterator]:
    """Local batches of phase ``t`` for steps ``start_step .. total - 1``."""
    size = self._data("image_size", 224)
    it = loader.train_batches(
        self.split_train, self.train_indices(t), self.train_labels,
        self.config.train.batch_size,
        transforms.TrainTransform(
            size, self._data("normalize", "none"),
            scale=tuple(self._data("crop_scale", (0.05, 1.0)))),
        seed=self.seed, task=t, start_step=start_step,
        num_steps=self.steps(t)[1], **self._loader_args())
    with it:
      yield it

  def eval_hi(self, t: int) -> int:
    """Classes seen after training phase ``t`` (joint: all)."""
    return self.train_tasks[t][1]

  def eval_tasks(self, t: int) -> int:
    """Class groups seen after training phase ``t`` (joint: all)."""
    ends = np.cumsum(self.task_sizes)
    return int(np.searchsorted(ends, self.eval_hi(t)) + 1)

  def eval_batches(self, hi: int) -> loader.BatchIterator:
    """Local batches over the test samples with label < ``hi``, padded."""
    size = self._data("image_size", 224)
    resize = self._data("resize_size", 0) or _default_resize(size)
    tr = self.config.train
    return loader.eval_batches(
        self.split_test, self.test_indices(hi), self.test_labels,
        tr.get("eval_batch_size", 0) or tr.batch_size,
        transforms.EvalTransform(size, resize, self._data("normalize", "none")),
        **self._loader_args())


def _check_config(config) -> None:
  d, tr = config.data, config.train
  if config.get("method", "sdlora") not in METHODS:
    raise ValueError(f"unknown method {config.method!r}; choose from {METHODS}")
  for key in ("source", "init_cls"):
    if d.get(key, None) in (None, ""):
      raise sources.DataError(f"data.{key} is not set; set --config.data.{key}")
  if d.get("normalize", "none") not in transforms.NORMALIZATIONS:
    raise sources.DataError(
        f"unknown data.normalize {d.normalize!r}; use one of "
        f"{', '.join(transforms.NORMALIZATIONS)}")
  size = d.get("image_size", 224)
  resize = d.get("resize_size", 0) or _default_resize(size)
  if size <= 0 or resize < size:
    raise sources.DataError(f"data.resize_size ({resize}) must be >= "
                            f"data.image_size ({size}) > 0")
  if tr.batch_size <= 0 or tr.epochs <= 0:
    raise sources.DataError(f"train.batch_size ({tr.batch_size}) and "
                            f"train.epochs ({tr.epochs}) must be positive")


def prepare(config, seed: int, process_index: int | None = None,
            process_count: int | None = None) -> ExperimentData:
  """Opens and validates the data for ``config`` and ``seed``.

  Args:
    config: the experiment ConfigDict (see the module docstring).
    seed: the run's seed; it fixes the class order (as the reference's
      ``np.random.seed(seed)``), the sample order and the augmentation.
    process_index, process_count: which rows of each global batch this
      process decodes (default: JAX's).

  Returns:
    The run's `ExperimentData`.

  Raises:
    DataError: one line naming a data or config problem and its fix.
  """
  _check_config(config)
  d = config.data
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  tr = config.train
  for bs in (tr.batch_size, tr.get("eval_batch_size", 0) or tr.batch_size):
    loader.local_rows(bs, process_index, process_count)

  source = sources.make_source(d)
  n_source = source.num_classes
  n = d.get("num_classes", 0) or n_source
  init_cls = d.init_cls
  increment = d.get("increment", 0) or init_cls
  want_tasks = d.get("num_tasks", 0)
  if want_tasks:
    need = init_cls + increment * (want_tasks - 1)
    if n < need:
      raise sources.DataError(
          f"{source.description} has fewer classes ({n}) than init_cls + "
          f"increment*(N-1) = {init_cls} + {increment}*({want_tasks}-1) = "
          f"{need} for N={want_tasks} tasks; use fewer tasks or classes per "
          "task, or a data set with more classes")
  sources.validate(source, n)
  try:
    sizes = tasks.task_sizes(n, init_cls, increment)
  except ValueError as e:
    raise sources.DataError(f"{e}; fix --config.data.init_cls/increment/"
                            "num_classes") from None
  if want_tasks and len(sizes) != want_tasks:
    raise sources.DataError(
        f"{n} classes with init_cls={init_cls}, increment={increment} give "
        f"{len(sizes)} tasks, not data.num_tasks={want_tasks}; set "
        f"--config.data.num_classes={need} or change num_tasks")

  # The reference permutes all classes of the data set; with num_classes
  # below that, the first n classes of the permutation are used.
  order = tasks.class_order(n_source, seed, d.get("shuffle_classes", True))[:n]
  train, test = source.split("train"), source.split("test")
  train_labels = tasks.remap_labels(train.labels, order)
  test_labels = tasks.remap_labels(test.labels, order)
  for name, labels in (("train", train_labels), ("test", test_labels)):
    counts = np.bincount(labels[labels >= 0], minlength=n)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
      cls = source.class_names[int(order[empty[0]])]
      raise sources.DataError(
          f"class {cls!r} of {source.description} has no {name} samples "
          f"({len(empty)} classes are empty); every class needs training and "
          "test images")
  train_index = _first_per_class(train_labels, n, d.get("max_train_per_class", 0))
  test_index = _first_per_class(test_labels, n, d.get("max_test_per_class", 0))
  ranges = tasks.task_ranges(sizes)
  train_tasks = [(0, n)] if config.get("method", "sdlora") == "joint" else ranges
  logging.info("data: %s, %d classes in %d tasks %s, %d train / %d test "
               "samples, first classes of the order %s", source.description,
               n, len(sizes), sizes, len(train_index), len(test_index),
               [int(c) for c in order[:8]])
  return ExperimentData(
      config=config, seed=seed, source=source, split_train=train,
      split_test=test, class_order=[int(c) for c in order], task_sizes=sizes,
      train_tasks=train_tasks, train_labels=train_labels,
      test_labels=test_labels, train_index=train_index, test_index=test_index,
      process_index=int(process_index), process_count=int(process_count))
