"""experiments.tool: every tool's bad input is one line ``error: ...``, exit 2."""

import ast
import json
import os
import subprocess
import sys

from absl import app
from absl import flags
import pytest

from experiments import cli
from experiments import tool
from slora_jax.runner import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "output", required=True, flag_values=fv)
  flags.DEFINE_integer("step", None, "a step", flag_values=fv)
  return fv


def _call(capsys, main, *args, user_errors=()):
  """(exit code, stderr lines) of ``main`` run through the layer."""
  code = tool.call(main, args, _flags(), user_errors)
  return code, capsys.readouterr().err.splitlines()


def _workdir(argv):
  workdir, = tool.positional(argv, "WORKDIR")
  return 0 if workdir else 1


@pytest.mark.parametrize("args, line", [
    (["w", "--out=o", "--nope"],
     "error: Unknown command line flag 'nope'; see --helpfull"),
    (["w", "--out=o", "--step=x"], "error: flag --step=x: invalid literal "
     "for int() with base 10: 'x'; see --helpfull"),
    (["w"], "error: give --out (a required flag); see --help"),
    (["--out=o"], "error: give WORKDIR (see --help)"),
    (["w", "v", "--out=o"], "error: unexpected arguments: v"),
])
def test_bad_flags_and_arguments_are_one_line_and_exit_2(capsys, args, line):
  assert _call(capsys, _workdir, *args) == (2, [line])
  assert _call(capsys, _workdir, "w", "--out=o") == (0, [])


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  def raises(error):
    def main(argv):
      del argv
      raise error
    return main

  config = config_lib.ConfigError("bad\n  value")        # USER_ERRORS
  assert _call(capsys, raises(config), "--out=o") == (2, ["error: bad value"])
  missing = FileNotFoundError(2, "No such file or directory", "x.json")
  assert _call(capsys, raises(missing), "--out=o") == (
      2, ["error: [Errno 2] No such file or directory: 'x.json'"])
  usage = app.UsageError("pass --root=FOLDER")
  assert _call(capsys, raises(usage), "--out=o") == (
      2, ["error: pass --root=FOLDER"])
  own = KeyError("k")                                  # the tool's own kind
  assert _call(capsys, raises(own), "--out=o", user_errors=(KeyError,)) == (
      2, ["error: 'k'"])
  with pytest.raises(KeyError):                        # not declared: a bug
    _call(capsys, raises(own), "--out=o")
  with pytest.raises(ZeroDivisionError):
    _call(capsys, raises(ZeroDivisionError()), "--out=o")


def _tool_files() -> dict:
  """Tool -> its __main__ file."""
  out = {}
  for name, (module, _) in cli.TOOLS.items():
    path = os.path.join(ROOT, *module.split("."))
    out[name] = (os.path.join(path, "__main__.py") if os.path.isdir(path)
                 else path + ".py")
  return out


def test_every_tool_runs_through_the_layer():
  for name, path in _tool_files().items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    mains = [n for n in tree.body if isinstance(n, ast.If)
             and "__main__" in ast.unparse(n.test)]
    assert len(mains) == 1, name
    calls = [ast.unparse(c.func) for c in ast.walk(mains[0])
             if isinstance(c, ast.Call)]
    assert calls == ["tool.run"], (name, calls)
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names}
    assert "argparse" not in imports, name


# Per tool: arguments that lack a required one (or add one no tool takes)
# and the start of the one line they must give.
MISSING = {
    "run": (["stray"], "error: unexpected arguments: stray"),
    "compare": ([], "error: give at least one results.json"),
    "export": (["w"], "error: give --out (a required flag)"),
    "head_share": ([], "error: give WORKDIR"),
    "prepare_data": (["--out=o"], "error: give one benchmark ("),
    "dry_run_table": ([], "error: give --workdir (a required flag)"),
    "make_dry_run_data": ([], "error: pass --root=FOLDER"),
    "import_reference": (["--out=o"], "error: give RUN_DIR"),
    "make_demo_backbone": (["stray"], "error: unexpected arguments: stray"),
    "benchmark": (["stray"], "error: unexpected arguments: stray"),
    "benchmark_pipeline": (["stray"], "error: unexpected arguments: stray"),
}

# One process imports the heavy libraries once, then forks a child per
# command that runs the tool as `python -m` does (the tool module itself is
# imported in the child only: its flags are defined there).
_CHILD = r"""
import json, os, runpy, signal, sys
import jax, flax.linen, ml_collections.config_flags, PIL.Image
import slora_jax.runner.errors, slora_jax.runner.sweep
commands = json.loads(sys.argv[1])
out = []
for i, (module, args) in enumerate(commands):
  err = f"err{i}.txt"
  pid = os.fork()
  if pid == 0:
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    code = 1
    signal.alarm(60)       # a tool that ignores bad input and runs: killed
    try:
      sys.argv = [module, *args]
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:
      import traceback
      traceback.print_exc()
    finally:
      sys.stderr.flush()
      os._exit(code)
  _, status = os.waitpid(pid, 0)
  with open(err) as f:
    out.append([os.waitstatus_to_exitcode(status), f.read()])
print(json.dumps(out))
"""


def test_every_tool_gives_one_line_and_exit_2_for_bad_input(tmp_path):
  assert set(MISSING) == set(cli.TOOLS)
  cases = [(cli.TOOLS[name][0], args, start) for name, (args, start)
           in MISSING.items()]
  cases += [(module, ["--no_such_flag"], "error: Unknown command line flag "
             "'no_such_flag'; see --helpfull") for module, _ in
            cli.TOOLS.values()]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD,
       json.dumps([(module, args) for module, args, _ in cases])],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.splitlines()[-1])
  for (module, args, start), (code, err) in zip(cases, results):
    assert code == 2 and len(err.splitlines()) == 1, (module, args, err)
    assert err.startswith(start), (module, args, err)
  # Refused before doing anything: no tool wrote a file (runs/, --out).
  assert all(n.startswith("err") for n in os.listdir(tmp_path))


_LOGGING_TOOL = """
import logging
from absl import logging as absl_logging
from experiments import tool

def main(argv):
  del argv
  # What a library says on the way (Orbax's INFO lines, a note), then the
  # user's error.
  absl_logging.info("restoring checkpoint 3")
  logging.getLogger("orbax").info("read 4 MiB")
  raise FileNotFoundError("no results.json in runs/x")

tool.run(main)
"""


@pytest.mark.parametrize("verbosity,lines", [([], 1), (["--verbosity=1"], 3)])
def test_library_logs_stay_quiet_unless_asked(verbosity, lines):
  """A user's error is all stderr shows: library INFO logs are off unless
  --verbosity=1 (then they come before the error line)."""
  proc = subprocess.run([sys.executable, "-c", _LOGGING_TOOL, *verbosity],
                        cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == lines, err
  assert err[-1] == "error: no results.json in runs/x"
