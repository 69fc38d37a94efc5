"""The one entry point: runs a class-incremental experiment from a config.

  python -m experiments.run                       # the embedded offline demo
  python -m experiments.run --config.method=all   # every method, one table
  python -m experiments.run --config=experiments/configs/imagenet_r_10.py \
      --config.model.checkpoint=/path/model.safetensors --workdir=runs/inr10

Rerunning with the same ``--workdir`` resumes from the latest checkpoint.
Problems a user can fix (a missing or broken config file, bad flags, config
keys or values, data, workdir, weights) end the run with one line
``error: ...`` on stderr and exit code 2. Library logs stay at WARNING unless
``--verbosity=1``.

SIGINT (Ctrl-C) and SIGTERM (preemption) stop the run after its current step
with a checkpoint at that step, one line ``interrupted (SIGINT) at task 3/10,
step 120/400; checkpoint saved; rerun the same command to resume`` on stderr
and exit code 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM, the
codes shells and schedulers already read as "stopped by that signal".
"""

import os
import signal
import sys


def _stop_during_imports(signum, frame):  # pylint: disable=unused-argument
  """Ctrl-C before the runner's own handlers: nothing is written yet (the
  imports and flag parsing only read), so the process stops at once."""
  sys.stdout.flush()
  print(f"interrupted ({signal.Signals(signum).name}) at start-up (before "
        "training); nothing new to save since the last checkpoint; rerun the "
        "same command to resume", file=sys.stderr, flush=True)
  os._exit(128 + signum)  # no exception for an import or a GC hook to eat


# First, before the slow imports: Python's own KeyboardInterrupt would land
# in whatever runs (JAX's GC callback ignores it, an import prints a trace).
for _signal in (signal.SIGINT, signal.SIGTERM):
  signal.signal(_signal, _stop_during_imports)

# pylint: disable=wrong-import-position
import difflib
import importlib.util

from absl import flags
from ml_collections import config_flags

from experiments import tool

# Config files are Python modules that importlib loads: always local, so they
# are exempt (path-ok) from the runner's path module; runs/ is the local default.
_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)),  # path-ok
                     "configs", "demo.py")

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (checkpoints, results.json, plots, "
    "TensorBoard events). Default: runs/<config name>.")


def default_workdir(config_path: str) -> str:
  file = config_path.split(":")[0]
  return os.path.join("runs", os.path.splitext(os.path.basename(file))[0])  # path-ok


def _config_file(argv) -> str:
  path = _DEMO
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _config_keys(node, prefix=""):
  """Every dotted key of a config (sections and leaves)."""
  for k in node.keys():
    yield prefix + k
    child = node[k]
    if hasattr(child, "keys"):
      yield from _config_keys(child, f"{prefix}{k}.")


def _unknown_key_message(argv) -> str | None:
  """Names the first ``--config.KEY`` the config lacks and the nearest key."""
  path = _config_file(argv)
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_slora_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  keys = list(_config_keys(config))
  for a in argv[1:]:
    if not a.startswith(("--config.", "--noconfig.")):
      continue
    key = a.split("=", 1)[0].split("config.", 1)[1]
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        hint = (f"did you mean --config.{near[0]}?" if near
                else "no key is close to it")
        return (f"unknown config key {key!r} (in {a}); {hint} (the valid "
                f"keys are those of {file})")
      node = node[part]
  return None


def _bad_override(e: Exception, argv):
  try:
    message = _unknown_key_message(argv)
  except Exception:  # pylint: disable=broad-except
    message = None   # e.g. the config file itself fails: keep the first text
  tool.fail(message or f"bad config override: {e.args[0] if e.args else e}")


def _check_config_file(argv) -> None:
  """One line and exit 2 for a --config file that is missing or not a config."""
  path = _config_file(argv)
  file = path.partition(":")[0]
  if not os.path.isfile(file):  # path-ok
    # Relative in a clone; the installed package's folder is named whole.
    here = os.path.dirname(_DEMO)  # path-ok
    if not os.path.relpath(here).startswith(os.pardir):  # path-ok
      here = os.path.relpath(here)  # path-ok
    names = sorted(n[:-3] for n in os.listdir(here)  # path-ok
                   if n.endswith(".py") and n not in ("__init__.py", "base.py"))
    tool.fail(f"config file {file!r} does not exist; pass --config=PATH to "
              f"an ml_collections config file, e.g. one of {here}/: "
              f"{', '.join(names)}")
  spec = importlib.util.spec_from_file_location("_slora_config_check", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    tool.fail(f"config file {file!r} could not be loaded: "
              f"{type(e).__name__}: {e}")
  if not callable(getattr(module, "get_config", None)):
    tool.fail(f"config file {file!r} defines no get_config(); a config file "
              "must define get_config() returning an ml_collections."
              "ConfigDict (see experiments/configs/base.py)")


def _parse_flags(argv):
  """absl's parsing; a bad flag or config key is one line and exit code 2."""
  _check_config_file(argv)
  try:
    return tool.parse_flags(argv)
  except (KeyError, AttributeError) as e:
    # ml_collections refuses a key that the (locked) config does not have.
    _bad_override(e, argv)


try:
  # With the default config file, ml_collections applies the overrides in
  # sys.argv already here, so an unknown key is refused at definition time.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEMO, "Experiment config file (default: the offline demo).",
      lock_config=True)
except (KeyError, AttributeError) as err:
  _bad_override(err, sys.argv)


def _run() -> None:
  from slora_jax.runner import sweep

  config_file = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or default_workdir(config_file)
  # A user's error (errors.USER_ERRORS) is tool.run's one line and exit 2.
  sweep.run(_CONFIG.value, workdir, config_file)


def main(argv):
  tool.positional(argv)
  from slora_jax.runner import interrupt
  # From here a signal raises `Interrupted` (deferred to the end of a step
  # while the task loop runs), so a file being written is finished or removed.
  interrupt.install()
  try:
    _run()
  except interrupt.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(interrupt.exit_code(e))


if __name__ == "__main__":
  tool.run(main, flags_parser=_parse_flags)
