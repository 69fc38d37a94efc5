"""SIGINT (Ctrl-C) and SIGTERM (preemption): stop after the step, saved, resume.

The real entry point in a subprocess on `tests/tiny_config.py` (three tasks of
four steps, a periodic checkpoint every two) sends itself the signal at an
exact place through ``SLORA_JAX_SIGNAL_AT`` (slora_jax/runner/faults.py). Each
interruption must print one line, exit 128 + the signal number, leave a
checkpoint whose cursor is the step reached, and the final rerun must give the
uninterrupted run's results.
"""

import re

import pytest

from cli_util import (checkpoint_cursor, cli_env, outcome, run_cli, tail,
                      tmp_checkpoints)
from slora_jax.runner import faults

RERUN = "; rerun the same command to resume"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return cli_env(tmp_path_factory)


def _interrupted(env, workdir, signals: str, code: int) -> str:
  """Runs with ``signals`` armed; returns the one ``interrupted`` line."""
  r = run_cli(dict(env, **{faults.SIGNAL_ENV: signals}), workdir)
  lines = [l for l in r.stderr.splitlines() if l.startswith("interrupted")]
  assert r.returncode == code and len(lines) == 1, f"{signals}: {tail(r)}"
  assert "Traceback" not in r.stderr, tail(r)
  return lines[0]



def test_sigint_and_sigterm_save_the_step_reached_and_resume_identically(
    reference, env, tmp_path):
  # Ctrl-C in task 1's third step, and again while its checkpoint is written
  # (the second checkpoint write: the first is the periodic one at step 2).
  line = _interrupted(env, tmp_path, "train_step:3:SIGINT,"
                      "checkpoint_write:2:SIGINT", 130)
  assert line == "interrupted (SIGINT) at task 1/3, step 3/4; checkpoint " \
                 "saved" + RERUN
  assert checkpoint_cursor(tmp_path) == (0, 3, True) and not tmp_checkpoints(tmp_path)

  # A signal during start-up (restoring) stops at once; nothing changes.
  line = _interrupted(env, tmp_path, "restore:1:SIGTERM", 143)
  assert line == ("interrupted (SIGTERM) at start-up (before training); "
                  "nothing new to save since the last checkpoint" + RERUN)
  assert checkpoint_cursor(tmp_path) == (0, 3, True)

  # Preemption in task 2's third step (the run resumed at task 1 step 3: its
  # fourth train step here), then during task 2's evaluation.
  line = _interrupted(env, tmp_path, "train_step:4:SIGTERM", 143)
  assert line == "interrupted (SIGTERM) at task 2/3, step 3/4; checkpoint " \
                 "saved" + RERUN
  assert checkpoint_cursor(tmp_path) == (1, 3, True)
  line = _interrupted(env, tmp_path, "eval_step:1:SIGTERM", 143)
  assert re.fullmatch(r"interrupted \(SIGTERM\) at task 2/3, evaluation; "
                      r"checkpoint saved" + RERUN, line), line
  assert checkpoint_cursor(tmp_path) == (1, 4, True)      # trained, evaluation pending

  r = run_cli(env, tmp_path)
  assert r.returncode == 0, tail(r)
  assert "resuming at task 2/3, step 4/4 from" in r.stderr
  assert outcome(tmp_path) == reference
