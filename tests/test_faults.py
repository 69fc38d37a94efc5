"""Faults: SIGKILL at ten places and resume, a diverging loss, determinism.

Every run here is the real entry point in a subprocess (``python -m
experiments.run``) on `tests/tiny_config.py`; kills come from the
``SLORA_JAX_KILL_AT`` hook (slora_jax/runner/faults.py), so each lands at an exact
place. The subprocesses share a persistent XLA compilation cache: only the
first one compiles.
"""

import re
import signal

import pytest

from cli_util import (cli_env, error_line, outcome, run_cli, snapshot, tail,
                      tmp_checkpoints)


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
  m = re.search(r"resuming at task (\d+) step (\d+)", r.stderr)
  return (int(m.group(1)), int(m.group(2))) if m else None


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
