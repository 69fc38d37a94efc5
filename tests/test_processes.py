"""The loader's process backend (grain workers) against its thread backend."""

import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from experiments.configs import base
from slora_jax.runner import config as config_lib
from slora_jax.runner import experiment_data
from slora_jax.runner.data import loader, processes, sources, transforms

pytest.importorskip("grain")


def _folder(root, classes=3, per_class=5, corrupt=None):
  """JPEG and PNG images of assorted sizes; ``corrupt``: a truncated file."""
  rng = np.random.default_rng(0)
  for c in range(classes):
    folder = os.path.join(root, "train", f"c{c}")
    os.makedirs(folder)
    for i in range(per_class):
      h, w = (int(v) for v in rng.integers(20, 48, 2))
      img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      img.save(os.path.join(folder, f"{i}.{'png' if i % 2 else 'jpg'}"))
  if corrupt is not None:
    with open(os.path.join(root, "train", "c1", "0.jpg"), "r+b") as f:
      f.truncate(40)
  return sources.ImageFolderSource(root).split("train")


def _train(split, processes, **kw):
  args = dict(seed=3, task=1, num_steps=9, num_workers=2)
  args.update(kw)
  return loader.train_batches(split, np.arange(len(split)), split.labels, 4,
                              transforms.TrainTransform(16), **args,
                              worker_processes=processes)


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype, k


def test_processes_give_the_thread_batches_resumed_and_sliced(tmp_path):
  split = _folder(str(tmp_path))
  # 15 samples, batch 4: 4 steps per epoch; step 2 is mid-epoch and the run
  # crosses two epoch boundaries (a padded last batch in each epoch).
  kw = dict(start_step=2, process_index=1, process_count=2)
  with _train(split, 0, **kw) as it:
    threads = list(it)
  assert len(threads) == 7 and threads[1]["mask"].sum() < 2
  for k in (1, 2):
    with _train(split, k, **kw) as it:
      assert len(it) == 7
      _assert_same(threads, list(it))
  # Evaluation order too (no augmentation), the whole batch on one host.
  ev = [loader.eval_batches(split, np.arange(len(split)), split.labels, 4,
                            transforms.EvalTransform(16), worker_processes=p)
        for p in (0, 2)]
  with ev[0] as a, ev[1] as b:
    _assert_same(list(a), list(b))


def test_worker_error_surfaces_with_its_message(tmp_path):
  split = _folder(str(tmp_path), corrupt=True)
  with pytest.raises(sources.DataError) as in_thread:
    with _train(split, 0) as it:
      list(it)
  with pytest.raises(sources.DataError) as in_process:
    with _train(split, 1) as it:
      list(it)
  assert "unreadable or truncated image" in str(in_process.value)
  assert str(in_process.value) == str(in_thread.value)


def test_leaving_mid_iteration_stops_every_worker(tmp_path):
  split = _folder(str(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    with _train(split, 2, prefetch=1) as it:
      next(it)
      workers = multiprocessing.active_children()
      assert len(workers) == 2
      raise KeyboardInterrupt  # what the runner's interrupt handler raises
  assert not any(p.is_alive() for p in workers)
  assert not multiprocessing.active_children()


def _prepare(**data):
  c = base.base()
  c.data.update(dict(init_cls=2, increment=1, image_size=16, resize_size=16,
                     **data))
  c.train.update(dict(batch_size=4, epochs=1))
  exp = config_lib.from_config(c)
  return experiment_data.prepare(exp.data, exp.train, 0, single_phase=False,
                                 process_index=0, process_count=1)


def test_config_chooses_processes_for_file_sources_only(tmp_path):
  _folder(str(tmp_path))
  os.rename(tmp_path / "train", tmp_path / "test")
  _folder(str(tmp_path))
  with _prepare(source="folder", root=str(tmp_path),
                worker_processes=1).train_batches(0) as it:
    assert isinstance(it, processes.ProcessBatchIterator)
    assert next(it)["image"].shape == (4, 16, 16, 3)
  synthetic = _prepare(source="synthetic", name="synthetic",
                       worker_processes=2)
  with synthetic.train_batches(0) as it:
    assert isinstance(it, loader.BatchIterator)
  with pytest.raises(sources.DataError, match="worker_processes"):
    _prepare(source="synthetic", name="synthetic", worker_processes=-1)


_KILLED_PARENT = """
import multiprocessing, sys, time
import numpy as np
from slora_jax.runner.data import loader, sources, transforms
if __name__ == "__main__":
  split = sources.ImageFolderSource(sys.argv[1]).split("train")
  it = loader.train_batches(split, np.arange(len(split)), split.labels, 4,
                            transforms.TrainTransform(16), seed=0, task=0,
                            num_steps=50, worker_processes=2, prefetch=1)
  next(it)
  print(*[p.pid for p in multiprocessing.active_children()], flush=True)
  time.sleep(60)
"""


def _running(pid: int) -> bool:
  """Alive and not a zombie (a reaped or zombie worker is gone)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_workers_exit_when_their_parent_is_killed(tmp_path):
  _folder(str(tmp_path))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The killed parent's resource tracker reports the shared memory it
  # cleans up on that stderr: kept out of the test output, shown on failure.
  with open(tmp_path / "stderr", "w+", encoding="utf-8") as err:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT,
                             str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=err, text=True, cwd=root)
    try:
      pids = [int(p) for p in proc.stdout.readline().split()]
      err.seek(0)
      assert len(pids) == 2 and all(_running(p) for p in pids), err.read()
    finally:
      proc.kill()
      proc.wait()
      proc.stdout.close()
  deadline = time.monotonic() + 15
  while any(_running(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(_running(p) for p in pids)
