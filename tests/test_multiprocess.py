"""Two JAX processes on this machine give the one-process run's results.

The real entry point runs as 2 processes (``jax.distributed`` with a localhost
coordinator, gloo CPU collectives, 2 CPU devices each) and as 1 process with 4
devices, on `tests/tiny_config.py` (Split Fashion-MNIST from the IDX files
when installed, else its generated data). A driver wraps the loader and the
writers to record, per process, the sample indices it decoded and the files it
wrote: each process must decode exactly its half of every global batch, only
process 0 writes results, plot, config and TensorBoard, and the results must
equal the 1-process run's. Then both processes are SIGKILLed mid-task,
restarted, SIGTERMed (process 1 only: both must stop at the same step) and
restarted again, to the same results.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from cli_util import (CONFIG, ROOT, SEED_DIR, checkpoint_cursor, cli_env,
                      outcome)
from slora_jax.runner import faults
from slora_jax.runner import parallel

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DATA = (["--config.data.source=idx", "--config.data.name=fashion_mnist",
         f"--config.data.root={FASHION_MNIST}", "--config.data.num_classes=6",
         "--config.data.max_train_per_class=16",
         "--config.data.max_test_per_class=8"]
        if os.path.isdir(FASHION_MNIST) else [])
BATCH = 8            # tiny_config's train batch; its evaluation batch: 16

# Records what a process decodes and writes, then runs the entry point.
_DRIVER = textwrap.dedent("""
    import json, os, runpy, sys
    import tensorboardX
    from slora_jax.runner import results
    from slora_jax.runner.data import loader
    log = open(os.environ["TRACE"], "a", buffering=1)

    def record(*event):
      log.write(json.dumps(event) + "\\n")

    assemble = loader._Producer._assemble
    def traced_assemble(self, indices, key):
      record("rows", [int(i) for i in indices])
      return assemble(self, indices, key)
    loader._Producer._assemble = traced_assemble

    def traced(name, f):
      def call(*args, **kwargs):
        record("write", name)
        return f(*args, **kwargs)
      return call
    for name in ("write_results", "plot_results", "write_json"):
      setattr(results, name, traced(name, getattr(results, name)))
    tensorboardX.SummaryWriter.__init__ = traced(
        "tensorboard", tensorboardX.SummaryWriter.__init__)
    sys.argv = ["experiments.run", *sys.argv[1:]]
    runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(env, workdir, processes: int, devices: int, extra=None):
  """Runs the entry point as ``processes`` processes; [(rc, output, trace)]."""
  port, procs = _free_port(), []
  for p in range(processes):
    trace = f"{workdir}.trace{p}"
    penv = dict(env, JAX_NUM_CPU_DEVICES=str(devices), TRACE=trace,
                **(extra or [{}] * processes)[p])
    flags = [f"--config={CONFIG}", f"--workdir={workdir}", *DATA]
    if processes > 1:
      penv.update({"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                   parallel.PROCESS_COUNT_ENV: str(processes),
                   parallel.PROCESS_ID_ENV: str(p)})
      flags.append("--config.distributed=True")
    out = open(f"{workdir}.out{p}", "w+")
    procs.append((subprocess.Popen(
        [sys.executable, "-c", _DRIVER, *flags], cwd=ROOT, env=penv,
        stdout=out, stderr=subprocess.STDOUT), out, trace))
  results = []
  for proc, out, trace in procs:
    rc = proc.wait(timeout=300)
    out.seek(0)
    events = []
    if os.path.exists(trace):
      with open(trace) as f:
        events = [json.loads(l) for l in f]
      os.remove(trace)
    results.append((rc, out.read(), events))
    out.close()
  return results


def _ok(runs):
  for rc, output, _ in runs:
    assert rc == 0, output[-4000:]


def _rows(events):
  return [e[1] for e in events if e[0] == "rows"]


def _writes(events):
  return sorted({e[1] for e in events if e[0] == "write"})


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, SEED_DIR, "checkpoints")))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = cli_env(tmp_path_factory)
  e.pop("XLA_FLAGS", None)
  return e


@pytest.fixture(scope="module")
def single(env, tmp_path_factory):
  """One process with 4 devices: the same mesh size as 2 processes x 2."""
  workdir = str(tmp_path_factory.mktemp("single") / "run")
  [run] = launch(env, workdir, 1, 4)
  _ok([run])
  return workdir, outcome(workdir), _rows(run[2])


def _halves(batches, p):
  """Process ``p``'s contiguous half of every global batch (train: 8 rows,
  evaluation: 16)."""
  return [b[p * len(b) // 2:(p + 1) * len(b) // 2] for b in batches]


def test_two_processes_equal_one(env, single, tmp_path):
  ref_dir, ref, ref_rows = single
  workdir = str(tmp_path / "run")
  runs = launch(env, workdir, 2, 2)
  _ok(runs)
  assert outcome(workdir) == ref                # identical, not just close
  for p, (_, _, events) in enumerate(runs):
    assert _rows(events) == _halves(ref_rows, p), p   # only its own rows
  assert {len(b) for b in ref_rows} == {BATCH, 2 * BATCH}
  assert _writes(runs[0][2]) == ["plot_results", "tensorboard", "write_json",
                                 "write_results"]
  assert _writes(runs[1][2]) == []
  assert _steps(workdir) == _steps(ref_dir)     # one checkpoint per save


def test_kill_both_then_sigterm_one_then_resume(env, single, tmp_path):
  _, ref, ref_rows = single
  workdir = str(tmp_path / "run")
  kill = {faults.ENV: "train_step:3"}
  runs = launch(env, workdir, 2, 2, [kill, kill])
  assert [r[0] for r in runs] == [-9, -9], runs[0][1][-3000:]
  assert checkpoint_cursor(workdir) == (0, 2, True)
  # SIGTERM reaches process 1 only, at its third step (task 2, step 1): both
  # agree, save that step and stop with the line and code 143.
  runs = launch(env, workdir, 2, 2,
                [{}, {faults.SIGNAL_ENV: "train_step:3:SIGTERM"}])
  for rc, output, _ in runs:
    assert rc == 143, output[-3000:]
    assert ("interrupted (SIGTERM) at task 2/3, step 1/4; checkpoint saved; "
            "rerun the same command to resume") in output
  assert checkpoint_cursor(workdir) == (1, 1, True)
  runs = launch(env, workdir, 2, 2)
  _ok(runs)
  assert all("resuming at task 2/3, step 1/4 from" in r[1] for r in runs)
  assert outcome(workdir) == ref
  # The resumed part decoded the tail of the global batches, halved.
  for p, (_, _, events) in enumerate(runs):
    rows = _rows(events)
    assert rows == _halves(ref_rows[-len(rows):], p), p
