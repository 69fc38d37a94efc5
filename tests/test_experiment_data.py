"""`experiment_data.prepare`: the data layer the task loop uses."""

import os

import numpy as np
import pytest
from PIL import Image

from experiments.configs import base
from slora_jax.runner import config as config_lib
from slora_jax.runner import experiment_data
from slora_jax.runner.data import sources
from slora_jax.runner.data.sources import DataError


def synthetic_config(method="sdlora", **data):
  c = base.base()
  c.method = method
  c.data.update(dict(
      source="synthetic", name="synthetic", root="", data_dir="",
      image_size=12, resize_size=14, normalize="none", num_classes=0,
      init_cls=2, increment=2, num_tasks=0, shuffle_classes=True,
      max_train_per_class=0, max_test_per_class=0, num_workers=2, prefetch=2,
      tfds_split_mode="reference",
      synthetic=dict(num_classes=6, train_per_class=7, test_per_class=3,
                     seed=0)))
  c.data.update(data)
  c.train.update(dict(batch_size=4, eval_batch_size=4, epochs=3,
                      max_steps_per_task=0))
  return c


def prepare(c, seed, process_index, process_count):
  """The runner's call: the config read once, then its sections."""
  exp = config_lib.from_config(c)
  return experiment_data.prepare(
      exp.data, exp.train, seed, single_phase=exp.method.single_phase,
      process_index=process_index, process_count=process_count)


def _all(it):
  return list(it)


def test_prepare_synthetic_task_protocol():
  d = prepare(synthetic_config(), 1993, 0, 1)
  assert d.num_tasks == 3 and d.task_sizes == [2, 2, 2] and d.num_classes == 6
  assert d.class_order == np.random.RandomState(1993).permutation(6).tolist()
  assert d.train_tasks == [(0, 2), (2, 4), (4, 6)]
  assert d.steps(0) == (4, 12)                 # ceil(14 / 4) steps, 3 epochs
  assert [d.eval_hi(t) for t in range(3)] == [2, 4, 6]
  assert [d.eval_tasks(t) for t in range(3)] == [1, 2, 3]
  source_labels = d.split_train.labels
  for t, (lo, hi) in enumerate(d.train_tasks):
    with d.train_batches(t) as it:
      batches = _all(it)
    assert len(batches) == 12
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert labels.min() >= lo and labels.max() < hi
    assert len(labels) == 3 * 14               # every sample once per epoch
    # Remapped label p is original class order[p].
    idx = d.train_indices(t)
    assert set(source_labels[idx]) == {d.class_order[p] for p in range(lo, hi)}
  for hi, n in ((2, 6), (6, 18)):
    batches = _all(d.eval_batches(hi))
    assert len(batches) == -(-n // 4)
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert len(labels) == n and labels.max() < hi
    assert batches[0]["image"].shape == (4, 12, 12, 3)


def test_prepare_resume_and_step_cap():
  c = synthetic_config()
  c.train.max_steps_per_task = 5
  d = prepare(c, 7, 0, 1)
  assert d.steps(1) == (4, 5)
  with d.train_batches(1) as it:
    full = _all(it)
  with d.train_batches(1, start_step=3) as it:
    rest = _all(it)
  assert len(full) == 5 and len(rest) == 2
  for a, b in zip(full[3:], rest):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_prepare_joint_method():
  d = prepare(synthetic_config("joint"), 1993, 0, 1)
  assert d.num_tasks == 3 and d.train_tasks == [(0, 6)]
  assert d.eval_hi(0) == 6 and d.eval_tasks(0) == 3
  assert d.steps(0) == (11, 33)                # ceil(42 / 4), 3 epochs
  with d.train_batches(0) as it:
    first = next(it)
  assert first["image"].shape == (4, 12, 12, 3)


def test_max_per_class_takes_the_first_samples():
  d = prepare(
      synthetic_config(max_train_per_class=2, max_test_per_class=1), 5, 0, 1)
  # SyntheticSource stores class c's samples at c*7 .. c*7+6 (train).
  assert d.train_index.tolist() == [c * 7 + k for c in range(6) for k in (0, 1)]
  assert d.test_index.tolist() == [c * 3 for c in range(6)]
  assert sum(b["mask"].sum() for b in d.eval_batches(6)) == 6


def test_process_rows_and_subset_of_classes():
  c = synthetic_config(num_classes=4)
  d = prepare(c, 3, 1, 2)
  assert d.num_classes == 4 and d.class_order == (
      np.random.RandomState(3).permutation(6)[:4].tolist())
  with d.train_batches(0) as it:
    assert next(it)["image"].shape == (2, 12, 12, 3)
  c.train.eval_batch_size = 5
  with pytest.raises(DataError, match="not divisible by the 2 processes"):
    prepare(c, 3, 0, 2)


def test_prepare_validation_errors(tmp_path):
  with pytest.raises(DataError) as e:
    prepare(synthetic_config(num_tasks=4), 1, 0, 1)
  msg = str(e.value)
  assert "fewer classes (6) than init_cls + increment*(N-1)" in msg
  assert "= 8" in msg and "\n" not in msg
  with pytest.raises(DataError, match="give 3 tasks, not data.num_tasks=2"):
    prepare(synthetic_config(num_tasks=2), 1, 0, 1)
  with pytest.raises(DataError, match="has 6 classes but the config needs 9"):
    prepare(synthetic_config(num_classes=9), 1, 0, 1)
  with pytest.raises(DataError, match="does not exist"):
    prepare(synthetic_config(
        source="folder", root=str(tmp_path / "nope")), 1, 0, 1)
  with pytest.raises(DataError, match="unknown data.source"):
    prepare(synthetic_config(source="hdf5"), 1, 0, 1)
  with pytest.raises(DataError, match="init_cls 8 exceeds"):
    prepare(synthetic_config(init_cls=8), 1, 0, 1)


def test_prepare_image_folders(tmp_path):
  root = tmp_path / "folders"
  for split, n in (("train", 3), ("test", 2)):
    for ci, cls in enumerate(("c0", "c1", "c2", "c3")):
      os.makedirs(root / split / cls)
      for k in range(n):
        Image.new("RGB", (20 + k, 16), (40 * ci, 9 * k, 5)).save(
            root / split / cls / f"{k}.jpg")
  c = synthetic_config(source="folder", root=str(root), init_cls=2,
                       increment=1, num_tasks=3)
  d = prepare(c, 11, 0, 1)
  assert d.task_sizes == [2, 1, 1]
  assert d.class_names == [f"c{k}" for k in d.class_order]
  total = sum(b["mask"].sum() for b in d.eval_batches(4))
  assert total == 8
  os.makedirs(root / "test" / "c4")
  os.makedirs(root / "train" / "c4")
  with pytest.raises(DataError, match="c4: class folder has no images"):
    prepare(c, 11, 0, 1)
  os.rmdir(root / "train" / "c4")
  os.rename(root / "test", root / "val")
  with pytest.raises(DataError, match="no test/ folder"):
    prepare(c, 11, 0, 1)


def test_error_type_is_the_projects_user_error():
  from slora_jax.runner import errors
  assert issubclass(sources.DataError, errors.USER_ERRORS)
