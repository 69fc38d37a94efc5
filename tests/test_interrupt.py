"""SIGINT (Ctrl-C) and SIGTERM (preemption): stop after the step, saved, resume.

The real entry point in a subprocess on `tests/tiny_config.py` (three tasks of
four steps, a periodic checkpoint every two) sends itself the signal at an
exact place through ``SLORA_JAX_SIGNAL_AT`` (slora_jax/runner/faults.py). Each
interruption must print one line, exit 128 + the signal number, leave a
checkpoint whose cursor is the step reached, and the final rerun must give the
uninterrupted run's results.
"""

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cli_util import (CONFIG, ROOT, checkpoint_cursor, cli_env, outcome,
                      run_cli, tail, tmp_checkpoints)
from slora_jax.runner import faults
from slora_jax.runner import interrupt

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


def _half_written(workdir) -> list[str]:
  """Temporary files and checkpoint folders, and JSON files that do not parse."""
  bad = []
  for root, dirs, files in os.walk(workdir):
    bad += [os.path.join(root, n) for n in dirs + files
            if n.startswith(".tmp-") or "orbax-checkpoint-tmp" in n]
    for n in files:
      if n.endswith(".json"):
        try:
          with open(os.path.join(root, n)) as f:
            json.load(f)
        except ValueError:
          bad.append(os.path.join(root, n))
  return bad


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.0])
def test_ctrl_c_at_any_moment_of_start_up_stops_with_one_line(
    reference, env, tmp_path, delay):
  # Imports, flag parsing, data, compilation, the first steps: Python's own
  # KeyboardInterrupt used to be dropped by JAX's GC callback (exit 0, the run
  # went on) or printed as a trace; whichever phase the signal meets, the run
  # stops with exit 130 and one line.
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"--config={CONFIG}",
       f"--workdir={tmp_path}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  lines = err.splitlines()
  assert proc.returncode == 130, f"{delay} s: rc={proc.returncode}\n{err}"
  assert len(lines) == 1 and re.fullmatch(
      r"interrupted \(SIGINT\) at (start-up \(before training\); nothing new "
      r"to save since the last checkpoint|task 1/3, step [1-3]/4; checkpoint "
      r"saved)" + RERUN, lines[0]), f"{delay} s: {err}"
  assert not _half_written(tmp_path), _half_written(tmp_path)


def test_a_signal_met_inside_a_gc_callback_is_not_dropped():
  # JAX registers a GC callback; an exception raised there is printed as
  # "Exception ignored" and lost, so the handler delivers it again after.
  fired = []

  def callback(phase, info):  # pylint: disable=unused-argument
    if phase == "start" and not fired:
      fired.append(True)
      os.kill(os.getpid(), signal.SIGINT)   # handled inside this callback
      fired.append(len(fired))

  with interrupt.handling_signals():
    gc.callbacks.append(callback)
    try:
      with pytest.raises(interrupt.Interrupted, match="start-up"):
        gc.collect()
        assert fired == [True, 1]           # the callback itself went on
        time.sleep(2)                       # the delivery comes back here
    finally:
      gc.callbacks.remove(callback)
