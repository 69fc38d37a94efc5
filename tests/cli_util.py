"""Runs the entry point in a subprocess for the fault and bad-input tests."""

import hashlib
import json
import os
import subprocess
import sys

from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
SEED_DIR = "seed_1993"          # the tiny config's one seed


def cli_env(tmp_path_factory) -> dict:
  """The environment of every runner subprocess of a test session.

  The subprocesses share a persistent XLA compilation cache, so only the
  first one compiles the tiny model's steps.
  """
  cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop(faults.ENV, None)
  return env


def run_cli(env, workdir, *flags, kill=None, config=CONFIG):
  """``python -m experiments.run`` on ``config``; SIGKILLed at ``kill``."""
  env = dict(env, **({faults.ENV: kill} if kill else {}))
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", f"--config={config}",
       f"--workdir={workdir}", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def tail(r) -> str:
  return f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def error_line(r) -> str:
  """The run's one ``error:`` line; fails unless it exited 2 with exactly one."""
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and len(lines) == 1, tail(r)
  return lines[0]


def snapshot(directory) -> dict:
  """Every file and folder under ``directory`` with size, mtime and digest."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), directory)] = "dir"
    for f in files:
      path = os.path.join(root, f)
      st = os.stat(path)
      with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns,
                                               digest)
  return out


def outcome(workdir) -> dict:
  """What must not depend on interruptions: matrices, curves, summary."""
  with open(os.path.join(workdir, SEED_DIR, "results.json")) as f:
    res = json.load(f)
  return {k: res[k] for k in ("acc_matrix", "acc_matrix_top5", "curves",
                              "summary", "class_order", "stored_directions")}


def checkpoint_cursor(workdir) -> tuple:
  """(task, step, begun) of the latest checkpoint of the tiny run."""
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, SEED_DIR))
  try:
    c = ckpt.read_meta()["cursor"]
  finally:
    ckpt.close()
  return c["task"], c["step"], c["begun"]


def tmp_checkpoints(workdir) -> list[str]:
  """Orbax's temporary (uncommitted) checkpoint directories of the tiny run."""
  d = os.path.join(workdir, SEED_DIR, "checkpoints")
  return sorted(n for n in os.listdir(d) if "orbax-checkpoint-tmp" in n)
