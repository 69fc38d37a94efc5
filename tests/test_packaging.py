"""The installable library: pyproject's dependencies are what the code
imports, `import slora_jax` is light, and the built wheel, installed into a
fresh virtual environment, runs docs/library.md's three examples with
neither TensorFlow, torch nor the runner importable.

Offline: the wheel is built with the installed setuptools
(``--no-build-isolation``) and installed with ``--no-deps --no-index`` into a
venv that sees the system's packages.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib

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
    # TensorFlow, torch and the runner behave as if not installed.
    import importlib.abc, importlib.util, sys
    def blocked(name):
      return (name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "torch")
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


def test_wheel_in_a_fresh_venv_runs_the_documented_examples(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "slora_jax", src / "slora_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "--no-build-isolation", "--no-index", "-q", "-w",
                  str(tmp_path / "dist"), str(src)], check=True,
                 capture_output=True)
  wheel, = (tmp_path / "dist").glob("slora_jax-*.whl")
  venv = tmp_path / "venv"
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
