"""Faults: SIGKILL at ten places and resume, a diverging loss, determinism.

Every run here is the real entry point in a subprocess (``python -m
experiments.run``) on `tests/tiny_config.py`; kills come from the
``SLORA_JAX_KILL_AT`` hook (slora_jax/runner/faults.py), so each lands at an exact
place. The subprocesses share a persistent XLA compilation cache: only the
first one compiles.
"""

import json
import os
import re
import signal

import pytest

from cli_util import (SEED_DIR, cli_env, error_line, outcome, run_cli,
                      snapshot, tail,
                      tmp_checkpoints)
from test_checkpoint import _corrupt


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return cli_env(tmp_path_factory)


# (kill point, where the tiny run is then, where the next start resumes).
# Three tasks of 4 steps; checkpoints at step 2, after step 4 (evaluation
# pending) and after each task. None: no checkpoint yet, a fresh start.
KILLS = [
    ("train_step:1", "first step, just compiled, nothing saved", None),
    ("train_step:3", "task 1 mid-step 3, after the step-2 checkpoint", (0, 2)),
    ("checkpoint_write:1", "Orbax tmp dir of 'task 1 trained' written, not "
     "committed", (0, 2)),
    ("eval_step:1", "evaluating task 1", (0, 4)),
    ("results_written:1", "results.json of task 1 written, end-of-task "
     "checkpoint not yet", (0, 4)),
    ("between_tasks:1", "between tasks 1 and 2", (1, 0)),
    ("restore:1", "right after restoring the checkpoint", (1, 0)),
    ("checkpoint_write:2", "Orbax tmp dir of 'task 2 trained' written, not "
     "committed", (1, 2)),
    ("eval_step:2", "second evaluation batch of task 2", (1, 4)),
    ("final:1", "final results.json and plot written, before exit", (3, 0)),
]


def _resumed_at(r):
  """(0-based task, step) of the ``resuming`` line (tasks there count from 1)."""
  m = re.search(r"resuming at task (\d+)/3, step (\d+)/4 from", r.stderr)
  if m:
    return int(m.group(1)) - 1, int(m.group(2))
  m = re.search(r"resuming after task (\d+)/3 from", r.stderr)
  return (int(m.group(1)), 0) if m else None


def test_sigkill_at_ten_points_then_resume_gives_identical_results(
    reference, env, tmp_path):
  resumed = None                      # the first start is fresh
  for kill, where, next_resume in KILLS:
    r = run_cli(env, tmp_path, kill=kill)
    assert r.returncode == -signal.SIGKILL, f"{kill} ({where}): {tail(r)}"
    assert _resumed_at(r) == resumed, (kill, _resumed_at(r), resumed)
    if kill.startswith("checkpoint_write"):
      # The half-written checkpoint is on disk and must not block the resume.
      assert tmp_checkpoints(tmp_path), kill
    resumed = next_resume
  r = run_cli(env, tmp_path)
  assert r.returncode == 0, tail(r)
  assert _resumed_at(r) == resumed
  assert not tmp_checkpoints(tmp_path)        # cleaned up on a later start
  assert outcome(tmp_path) == reference


def test_two_fresh_runs_are_identical(reference, env, tmp_path):
  r = run_cli(env, tmp_path)
  assert r.returncode == 0, tail(r)
  assert outcome(tmp_path) == reference


def test_diverging_loss_stops_and_advises_a_fresh_workdir(env, tmp_path):
  # Task 1 trains normally, then a huge rate for tasks >= 2 diverges.
  workdir = tmp_path / "run"
  r = run_cli(env, workdir, "--config.train.lr=1e30")
  line = error_line(r)
  assert re.search(r"became (nan|inf|-inf|NaN or infinite) at task 2/3, step "
                   r"[1-4](/4)?; lower the learning rate \(--config.train.lr\) "
                   r"or check the data, then rerun with another --workdir "
                   r"\(the checkpoints in \S+ were written at this rate and "
                   r"refuse another\)$", line), line
  # A lower rate in this workdir is refused (its run could mix two rates in
  # one result), the workdir untouched; a fresh one is test_two_fresh_runs.
  before = snapshot(workdir)
  line = error_line(run_cli(env, workdir))
  assert line == (
      "error: the checkpoint in this workdir was written with train.lr=1e+30, "
      "but the config says train.lr=0.05; use another --workdir, or the "
      "original config to resume")
  assert snapshot(workdir) == before


def _complete(workdir):
  with open(os.path.join(workdir, SEED_DIR, "results.json")) as f:
    res = json.load(f)
  return res["complete"], len(res["acc_matrix"])


def test_corrupt_checkpoints_are_set_aside_and_the_run_resumes_before_them(
    reference, env, tmp_path):
  # Killed between tasks 2 and 3 with five checkpoints kept: 2 (task 1
  # trained, evaluation pending) to 6 (task 2 finished). The four newest are
  # damaged, one way each: the rerun names each in one line, moves it aside
  # and resumes from checkpoint 2.
  r = run_cli(env, tmp_path, "--config.checkpoint.keep=5",
              kill="between_tasks:2")
  assert r.returncode == -signal.SIGKILL, tail(r)
  assert _complete(tmp_path) == (False, 2)   # results.json says: not final
  ckpts = tmp_path / SEED_DIR / "checkpoints"
  assert sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) == [
      2, 3, 4, 5, 6]
  kinds = {6: "truncated", 5: "flipped", 4: "meta_cut", 3: "metadata_emptied"}
  for step, kind in kinds.items():
    _corrupt(ckpts / str(step), kind)
  r = run_cli(env, tmp_path, "--config.checkpoint.keep=5")
  assert r.returncode == 0, tail(r)
  assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
  lines = [l for l in r.stderr.splitlines() if " is corrupt " in l]
  assert len(lines) == 4, tail(r)
  for line, step in zip(lines, kinds):
    aside = tmp_path / SEED_DIR / "checkpoints_corrupt" / str(step)
    assert line.startswith(f"warning: checkpoint {step} in {ckpts} is "
                           "corrupt (its "), line
    assert line.endswith(f"; moved to {aside}; resuming from checkpoint 2")
    assert os.listdir(aside)                           # kept, not deleted
  assert _resumed_at(r) == (0, 4)
  assert outcome(tmp_path) == reference
  assert _complete(tmp_path) == (True, 3)
