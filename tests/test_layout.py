"""The layering README's Layout section promises, checked on the source tree."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = [p for p in (ROOT / "slora_jax").rglob("*.py")
           if "runner" not in p.relative_to(ROOT / "slora_jax").parts]
MAX_FUNCTION_LINES = 80


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_library_modules_never_import_the_runner():
  assert len(LIBRARY) >= 8
  offenders = {str(p.relative_to(ROOT)): sorted(
      n for n in _imports(p) if n.startswith("slora_jax.runner"))
               for p in LIBRARY}
  assert not {k: v for k, v in offenders.items() if v}


def test_importing_the_library_loads_no_runner_tensorflow_or_torch():
  code = ("import sys, slora_jax, slora_jax.models; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'torch', 'tensorflow_datasets') or "
          "m.startswith('slora_jax.runner')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"


def _long_functions(paths):
  for path in paths:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)"


def test_no_function_in_the_package_or_experiments_is_over_80_lines():
  paths = [*(ROOT / "slora_jax").rglob("*.py"),
           *(ROOT / "experiments").rglob("*.py")]
  assert list(_long_functions(paths)) == []


def test_code_cites_the_repositorys_own_semantics_doc():
  outside = "SD-LoRA" + "-SPEC"          # the spec lives outside the repository
  paths = [ROOT / "README.md", *(ROOT / "slora_jax").rglob("*.py"),
           *(ROOT / "experiments").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
  assert [str(p) for p in paths if outside in p.read_text(encoding="utf-8")] == []
  assert (ROOT / "docs" / "semantics.md").is_file()


# Files a run reads or writes go through slora_jax/runner/paths.py, which
# takes gs:// as well as local paths. Exempt: that module itself; the runner's
# own JSON package data; reference_import, a tool that converts a local
# PyTorch run directory (torch.load); and lines marked ``# path-ok``.
_PATH_MODULE_EXEMPT = {"slora_jax/runner/paths.py",
                       "slora_jax/runner/reference_numbers.py",
                       "slora_jax/runner/reference_import.py"}
_FILE_OS_CALLS = {"makedirs", "mkdir", "listdir", "scandir", "walk", "replace",
                  "rename", "remove", "unlink"}


def _direct_path_uses(path: pathlib.Path):
  lines = path.read_text(encoding="utf-8").splitlines()
  for node in ast.walk(ast.parse("\n".join(lines))):
    what = None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
        and node.func.id == "open":
      what = "open()"
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
        and node.value.id == "os" and (node.attr == "path"
                                       or node.attr in _FILE_OS_CALLS):
      what = f"os.{node.attr}"
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""])
      hits = [n for n in names if n.split(".")[0] in ("pathlib", "shutil", "glob")]
      what = hits[0] if hits else None
    if what and "# path-ok" not in lines[node.lineno - 1]:
      yield f"{path.relative_to(ROOT)}:{node.lineno} {what}"


def test_runner_files_go_through_the_path_module():
  files = [ROOT / "experiments" / "run.py",
           *(p for p in (ROOT / "slora_jax" / "runner").rglob("*.py")
             if str(p.relative_to(ROOT)) not in _PATH_MODULE_EXEMPT)]
  assert len(files) > 20
  # The check finds what it bans (paths.py itself uses os.path and open()).
  assert list(_direct_path_uses(ROOT / "slora_jax/runner/paths.py"))
  assert [u for f in files for u in _direct_path_uses(f)] == []
