"""The installable library: pyproject's dependencies are what the code
imports, `import slora_jax` is light, and the built wheel, installed into a
fresh virtual environment, runs docs/library.md's three examples with
neither TensorFlow, torch nor the runner importable.

Offline: the wheel is built with the installed setuptools
(``--no-build-isolation``) and installed with ``--no-deps --no-index`` into a
venv that sees the system's packages.
"""

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.test_library_docs import examples

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Import name -> distribution, where they differ.
DIST = {"orbax": "orbax-checkpoint", "PIL": "pillow", "absl": "absl-py",
        "tensorflow_datasets": "tensorflow-datasets",
        "jaxlib": "jax"}          # jax requires its jaxlib
HEAVY = ("tensorflow", "tensorflow_datasets", "torch", "slora_jax.runner",
         "ml_collections", "matplotlib", "PIL", "tensorboardX", "orbax")
MAX_IMPORT_SECONDS = 10.0    # measured ~1.5 s idle; the CI machine is shared


def _names(reqs) -> dict[str, Requirement]:
  return {Requirement(r).name.lower().replace("_", "-"): Requirement(r)
          for r in reqs}


def _third_party_imports(paths) -> set[str]:
  stdlib = set(sys.stdlib_module_names)
  out = set()
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        mods = [node.module]
      else:
        continue
      out.update(m.split(".")[0] for m in mods)
  out -= stdlib | {"slora_jax", "experiments", "docs", "tests"}
  return {DIST.get(m, m).lower().replace("_", "-") for m in out}


def test_core_dependencies_are_what_the_library_imports():
  library = [p for p in (ROOT / "slora_jax").rglob("*.py")
             if "runner" not in p.parts]
  core = _names(PYPROJECT["dependencies"])
  assert _third_party_imports(library) == set(core)
  for req in core.values():
    assert str(req.specifier).startswith(">="), req        # bounds, not pins
  # The runner and the entry points need nothing beyond core and extras.
  extras = PYPROJECT["optional-dependencies"]
  declared = set(core) | {n for group in extras.values() for n in _names(
      r for r in group if not r.startswith("slora-jax"))}
  runner = [*(ROOT / "slora_jax" / "runner").rglob("*.py"),
            *(ROOT / "experiments").rglob("*.py")]
  assert _third_party_imports(runner) - declared == set()
  assert {"data", "experiments", "torch", "test"} <= set(extras)


def test_requirements_pins_satisfy_the_declared_bounds():
  pins = {}
  for name in ("requirements.txt", "requirements-test.txt"):
    for line in (ROOT / name).read_text().splitlines():
      line = line.split("#")[0].strip()
      if line and not line.startswith("-"):
        req = Requirement(line)
        pins[req.name.lower().replace("_", "-")] = Version(
            str(req.specifier).lstrip("="))
  bounds = _names(PYPROJECT["dependencies"])
  for group in PYPROJECT["optional-dependencies"].values():
    bounds.update(_names(r for r in group if not r.startswith("slora-jax")))
  for name, req in bounds.items():
    assert name in pins, f"{name} is declared but not pinned"
    assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_import_is_light_and_loads_no_heavy_module():
  code = textwrap.dedent(f"""
      import sys, time
      t = time.perf_counter()
      import slora_jax
      dt = time.perf_counter() - t
      heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}
                     or m.startswith('slora_jax.runner'))
      print(dt, heavy)
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.split(" ", 1)
  assert out[1].strip() == "[]"
  assert float(out[0]) < MAX_IMPORT_SECONDS, f"import slora_jax took {out[0]} s"


_BLOCK = textwrap.dedent("""
    # TensorFlow, torch, the runner and its tools behave as if not installed.
    import importlib.abc, importlib.util, sys
    def blocked(name):
      return (name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "torch",
                                     "experiments")
              or name.startswith("slora_jax.runner"))
    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path, target=None):
        if blocked(name):
          raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
    sys.meta_path.insert(0, Block())
    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: (
        None if blocked(name) else _find_spec(name, package))
""")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> pathlib.Path:
  """A fresh venv with the wheel built from this checkout installed."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  for name in ("slora_jax", "experiments"):
    shutil.copytree(ROOT / name, src / name,
                    ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "--no-build-isolation", "--no-index", "-q", "-w",
                  str(tmp / "dist"), str(src)], check=True,
                 capture_output=True)
  wheel, = (tmp / "dist").glob("slora_jax-*.whl")
  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                 check=True)
  python = str(venv / "bin" / "python")
  # The new venv sees this interpreter's packages (jax, flax, pip) after its
  # own. `--system-site-packages` would not do: inside a venv it exposes the
  # base interpreter's site-packages, not this environment's.
  child_site = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip()
  ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  pathlib.Path(child_site, "_parent_env.pth").write_text(
      "".join(f"{p}\n" for p in sorted(ours)))
  subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index",
                  "-q", str(wheel)], check=True, capture_output=True)
  return venv


def test_wheel_in_a_fresh_venv_runs_the_documented_examples(venv, tmp_path):
  python = str(venv / "bin" / "python")
  script = tmp_path / "examples.py"
  script.write_text(_BLOCK + "\nimport slora_jax\nprint(slora_jax.__file__)\n"
                    + "\n".join(f"exec({code!r}, {{}})"
                                for code in examples().values()))
  run = subprocess.run([python, str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600,
                       env={k: v for k, v in os.environ.items()
                            if k != "PYTHONPATH"})
  assert run.returncode == 0, run.stderr[-3000:]
  first = run.stdout.splitlines()[0]
  assert first.startswith(str(venv)), first      # the installed copy ran
  assert "task 2: loss" in run.stdout
  assert sysconfig.get_paths()["purelib"] not in first


# The packaged demo config shrunk to 2 tasks of 1 step on 20 generated
# classes: it still loads the demo backbone shipped in the wheel.
_SMALL_DEMO = ("--config.data.source=synthetic", "--config.data.name=synthetic",
               "--config.data.synthetic.num_classes=20",
               "--config.data.synthetic.train_per_class=2",
               "--config.data.synthetic.test_per_class=1",
               "--config.data.num_classes=20", "--config.data.num_tasks=2",
               "--config.train.max_steps_per_task=1",
               "--config.train.batch_size=8", "--config.log.tensorboard=False")


def test_console_script_runs_packaged_configs_outside_the_repository(
    venv, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"

  def cli(*args):
    return subprocess.run([str(venv / "bin" / "slora-jax"), *args],
                          cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)

  where = subprocess.run(
      [str(venv / "bin" / "python"), "-c",
       "import experiments.cli as c; print(c.__file__)"],
      cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
  assert where.stdout.startswith(str(venv)), where.stdout   # not the clone's
  usage = cli("--help")
  assert usage.returncode == 0, usage.stderr
  from experiments import cli as cli_lib   # pylint: disable=import-outside-toplevel
  for tool in cli_lib.TOOLS:
    assert f"\n  {tool} " in usage.stdout
  for args, start in ((["nope"], "error: unknown tool 'nope'; one of: run,"),
                      (["run", "--config=nope"], "error: no config named "
                       "'nope'; pass --config=PATH")):
    bad = cli(*args)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith(start), bad.stderr
  assert "imagenet_r_10" in bad.stderr
  run = cli("run", "--config=demo", *_SMALL_DEMO, "--workdir=w")
  assert run.returncode == 0, run.stderr[-3000:]
  res = json.loads((tmp_path / "w" / "seed_1993" / "results.json").read_text())
  assert res["complete"] and len(res["acc_matrix"]) == 2
  manifest = json.loads((ROOT / "experiments/assets/demo_vit.json").read_text())
  assert res["backbone"]["checkpoint_path"].startswith(str(venv))
  assert res["backbone"]["sha256"] == manifest["sha256"]
  compare = cli("compare", "w/seed_1993/results.json")
  assert compare.returncode == 0, compare.stderr
  assert "1 run (seed 1993)" in compare.stdout and "Acc" in compare.stdout


def test_every_runnable_tool_is_a_console_script_tool():
  from experiments import cli   # pylint: disable=import-outside-toplevel
  runnable = {p.stem for p in (ROOT / "experiments").glob("*.py")
              if 'if __name__ == "__main__":' in p.read_text()}
  runnable -= {"cli", "torch_reference"}   # the benchmark's child process
  assert {m.split(".")[1] for m, _ in cli.TOOLS.values()} == runnable | {"benchmark"}
  assert set(cli.TOOLS) == {m.split(".")[1] for m, _ in cli.TOOLS.values()}


def test_config_names_resolve_to_packaged_files(tmp_path, monkeypatch):
  from experiments import cli   # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  demo = str(ROOT / "experiments" / "configs" / "demo.py")
  assert cli.resolve_config("demo") == demo
  assert cli.resolve_config("demo:arg") == demo + ":arg"
  (tmp_path / "demo").mkdir()              # a folder of that name: still ours
  assert cli._with_config_paths(["--config", "demo", "--config.seeds=(1,)"]) == [
      "--config", demo, "--config.seeds=(1,)"]
  for path in ("mine.py", "configs/demo", str(tmp_path / "x.py:arg")):
    assert cli.resolve_config(path) == path  # paths reach experiments.run
  (tmp_path / "mine").write_text("")
  assert cli.resolve_config("mine") == "mine"
  assert "base" not in cli.config_names() and "imagenet_r_10" in cli.config_names()


def test_experiments_extra_holds_what_the_tools_import():
  """`pip install 'slora-jax[experiments]'` is enough for every tool but
  import_reference and the benchmark's --torch (torch) and W&B logging."""
  extras = PYPROJECT["optional-dependencies"]
  have = set(_names(PYPROJECT["dependencies"]))
  for group in ("experiments", "data"):     # experiments pulls in [data]
    have |= set(_names(r for r in extras[group] if not r.startswith("slora-jax")))
  assert "slora-jax[data]" in extras["experiments"]
  tools = [*(ROOT / "slora_jax" / "runner").rglob("*.py"),
           *(ROOT / "experiments").rglob("*.py")]
  assert _third_party_imports(tools) - have == {"torch", "wandb"}
