"""Two runs on one workdir: the second is refused; a killed run leaves no lock.

Run A (the real entry point, `tests/tiny_config.py`) stops itself with
SIGSTOP after its first train step, holding the workdir; run B on the same
workdir must then print one ``error:`` line, exit 2 and leave the workdir
exactly as it was. After A is SIGKILLed, run C takes the workdir and finishes.
"""

import os
import signal
import subprocess
import sys

import pytest

from cli_util import CONFIG, ROOT, cli_env, error_line, run_cli, snapshot, tail
from slora_jax.runner import faults
from slora_jax.runner import lock


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return cli_env(tmp_path_factory)


def test_second_run_is_refused_and_a_killed_run_leaves_no_lock(env, tmp_path):
  workdir = tmp_path / "run"
  with open(tmp_path / "a.out", "w") as out:
    a = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", f"--config={CONFIG}",
         f"--workdir={workdir}"], cwd=ROOT, stdout=out, stderr=out,
        env=dict(env, **{faults.SIGNAL_ENV: "train_step:1:SIGSTOP"}))
  try:
    _, status = os.waitpid(a.pid, os.WUNTRACED)   # A stopped, holding the lock
    assert os.WIFSTOPPED(status), (tmp_path / "a.out").read_text()
    before = snapshot(workdir)
    line = error_line(run_cli(env, workdir))
    assert line == (f"error: the workdir {workdir} is in use by another run "
                    f"(process {a.pid}); wait for it to end (or stop it: it "
                    "resumes later), or pass another --workdir")
    assert snapshot(workdir) == before
  finally:
    a.send_signal(signal.SIGKILL)
    a.wait()
  r = run_cli(env, workdir)                         # the kernel freed the lock
  assert r.returncode == 0, tail(r)


def test_lock_in_process(tmp_path):
  """A second holder is refused, also in one process; released on exit."""
  with lock.hold(str(tmp_path)):
    with pytest.raises(lock.WorkdirInUseError, match=f"process {os.getpid()}"):
      with lock.hold(str(tmp_path)):
        pass
  with lock.hold(str(tmp_path)):
    pass
  assert os.listdir(tmp_path) == []                 # the lock writes nothing
