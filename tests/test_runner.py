"""End to end: the entry point, the task loop, resume, config mismatch, methods.

Runs use Split Fashion-MNIST's real IDX files when installed (CI installs the
Debian package), else generated images, with a tiny ViT and a few steps.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import split_fashion_mnist as demo
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import results as results_lib
from slora_jax.runner import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = demo.FASHION_MNIST


def small_config(cache_dir, **overrides):
  """The demo config, shrunk: tiny ViT, few samples, 3 steps per task."""
  c = demo.get_config()
  c.model.image_size = c.data.image_size = c.data.resize_size = 16
  c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 2, 2, 64
  c.model.pretrain.update(dict(steps=20, train_per_class=16, batch_size=32,
                               cache_dir=str(cache_dir)))
  c.data.max_train_per_class = 48
  c.data.max_test_per_class = 20
  c.train.batch_size = 32
  c.train.eval_batch_size = 50
  c.train.epochs = 1
  c.train.max_steps_per_task = 3
  c.checkpoint.every_steps = 2
  c.log_every_steps = 1
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def run_seed(c, seed, workdir):
  return train.run_seed(config_lib.from_config(c), seed, workdir)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("full")
  payload = run_seed(small_config(cache_dir), 1993, str(workdir))
  return workdir, payload


def test_full_run_writes_results_plot_events_checkpoints(uninterrupted):
  workdir, payload = uninterrupted
  res = results_lib.load_results(os.path.join(workdir, "results.json"))
  assert res["summary"]["num_tasks"] == 5
  R = np.array(res["acc_matrix"], dtype=float)
  assert R.shape == (5, 5)
  assert np.all(np.isnan(R[np.triu_indices(5, 1)]))
  assert np.all((R[np.tril_indices(5)] >= 0) & (R[np.tril_indices(5)] <= 100))
  assert res["summary"]["acc"] == res["curves"]["top1_sample_weighted"][-1]
  # task-IL beside class-IL: the same layout, never below it per task
  R_til = np.array(res["acc_matrix_task_il"], dtype=float)
  assert np.all(R_til[np.tril_indices(5)] >= R[np.tril_indices(5)])
  assert res["summary"]["acc_task_il"] == res["curves"][
      "task_il_top1_sample_weighted"][-1]
  assert res["cross_task"]["count"][-1] == [40] * 5   # 20 test images a class
  assert len(res["per_task"]) == 5 and all(
      p["train_images_per_s"] > 0 for p in res["per_task"])
  assert res["class_order"] == list(np.random.RandomState(1993).permutation(10))
  assert os.path.getsize(os.path.join(workdir, "results.png")) > 1000
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  assert ckpt_lib.Checkpointer(str(workdir)).read_meta()["cursor"]["task"] == 5


def test_resume_after_stops_reaches_identical_numbers(uninterrupted, tmp_path,
                                                      cache_dir):
  full_dir, full = uninterrupted
  # Stop mid-task twice (steps 5 and 11 of 15, between periodic checkpoints),
  # then finish: each restart resumes from the last checkpoint.
  for stop in (5, 6):
    with pytest.raises(SystemExit, match="stopped"):
      run_seed(small_config(cache_dir, stop_after_steps=stop), 1993,
                     str(tmp_path))
  meta = ckpt_lib.Checkpointer(str(tmp_path)).read_meta()
  assert meta["cursor"]["begun"] and 0 < meta["cursor"]["task"] < 5
  resumed = run_seed(small_config(cache_dir), 1993, str(tmp_path))
  assert resumed["acc_matrix"] == full["acc_matrix"]
  assert resumed["curves"] == full["curves"]


def test_different_config_in_workdir_is_refused(uninterrupted, cache_dir):
  workdir, _ = uninterrupted
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="method"):
    run_seed(small_config(cache_dir, method="sdlora_kd"), 1993, str(workdir))


@pytest.mark.parametrize("method", ["sdlora_rr", "sdlora_kd", "seq_lora",
                                    "linear_probe", "joint"])
def test_methods_run_end_to_end(method, tmp_path, cache_dir):
  c = small_config(cache_dir, method=method)
  c.adapter.rank_schedule = ((0, 4), (2, 3), (4, 2))
  res = run_seed(c, 1994, str(tmp_path))
  n = 1 if method == "joint" else 5
  assert res["summary"]["num_tasks"] == n
  if method == "joint":
    assert len(res["joint_group_top1"]) == 5
    # One task of every class: its task-IL is its class-IL; the groups' own
    # task-IL beside it, each at least the group's class-IL.
    assert res["acc_matrix_task_il"] == res["acc_matrix"]
    assert res["summary"]["acc_task_il"] == res["summary"]["acc"]
    assert all(t >= c for t, c in zip(res["joint_group_task_il_top1"],
                                      res["joint_group_top1"]))
    assert len(res["cross_task"]["count"]) == 1
    assert res["cross_task"]["errors"]["after_task"] == 0
  if method == "sdlora_rr":
    assert res["stored_directions"] == 5
  if method == "linear_probe":
    assert res["stored_directions"] == 0
    assert all(p["alpha_current"] == 1.0 for p in res["per_task"])


def test_cli_demo_shortened(tmp_path, cache_dir):
  """The entry point with no --config (the demo), shortened by flags."""
  workdir = tmp_path / "demo"
  args = [sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
          "--config.train.max_steps_per_task=2",
          "--config.model.pretrain.steps=10",
          f"--config.model.pretrain.cache_dir={cache_dir}",
          "--config.model.pretrain.train_per_class=8",
          "--config.data.max_test_per_class=10",
          "--config.data.max_train_per_class=40"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "Acc" in r.stdout and "AAA" in r.stdout
  # What a person sees: a short report, no library log records.
  lines = (r.stdout + r.stderr).splitlines()
  assert len(lines) <= 40, "\n".join(lines)
  assert not [l for l in lines if "INFO" in l or re.match(r"I\d{4} ", l)]
  assert f"{workdir}/config.json" in r.stdout
  assert f"{workdir}/seed_1993/results.png" in r.stdout
  assert json.load(open(workdir / "config.json"))["method"] == "sdlora"
  res = json.load(open(workdir / "seed_1993" / "results.json"))
  assert res["summary"]["num_tasks"] == 5
  src = "renditions" if os.path.isdir(FMNIST) else "synthetic"
  assert res["config"]["data"]["source"] == src


def test_inflora_runs_and_resumes_to_identical_numbers(tmp_path, cache_dir):
  """The plug-in through the runner: a stop in task 3 (two memory updates in
  the host state) resumes from its checkpoint to the uninterrupted numbers."""
  c = small_config(cache_dir, method="inflora")
  full = run_seed(c, 1993, str(tmp_path / "full"))
  assert full["method"] == "inflora" and full["summary"]["num_tasks"] == 5
  assert [len(p["memory_dims"]) for p in full["per_task"]] == [2] * 5
  assert all(0 < d < 32 for p in full["per_task"] for d in p["memory_dims"])
  with pytest.raises(SystemExit, match="stopped"):
    run_seed(small_config(cache_dir, method="inflora", stop_after_steps=9),
             1993, str(tmp_path / "stopped"))
  meta = ckpt_lib.Checkpointer(str(tmp_path / "stopped")).read_meta()
  assert meta["cursor"] == {"task": 2, "step": 2, "begun": True}
  resumed = run_seed(c, 1993, str(tmp_path / "stopped"))
  assert resumed["acc_matrix"] == full["acc_matrix"]
  assert resumed["acc_matrix_task_il"] == full["acc_matrix_task_il"]
  assert ([p["memory_dims"] for p in resumed["per_task"]] ==
          [p["memory_dims"] for p in full["per_task"]])


def test_simplecil_trains_nothing_and_scores_every_task(tmp_path, cache_dir):
  res = run_seed(small_config(cache_dir, method="simplecil"), 1993,
                 str(tmp_path))
  assert res["method"] == "simplecil"
  assert all(p["steps"] == 0 for p in res["per_task"])
  # A task's prototypes never change after it, and task-IL compares them
  # only with each other: each task-IL column is constant from its task on.
  R_til = np.array(res["acc_matrix_task_il"], dtype=float)
  for k in range(5):
    assert np.all(R_til[k:, k] == R_til[k, k]), R_til
  assert res["summary"]["forgetting_task_il"] == 0.0
  assert res["acc_matrix"][0][0] == R_til[0, 0]     # one task: the same
  assert res["summary"]["acc_task_il"] >= res["summary"]["acc"]
