"""``slora-jax TOOL [FLAGS]``: every experiments tool from an installed copy.

  slora-jax run --config=imagenet_r_10 --config.data.root=/data/imagenet-r \
      --config.model.checkpoint=/data/model.safetensors --workdir=runs/inr10
  slora-jax compare runs/inr10/seed_*/results.json
  slora-jax TOOL --help                # that tool's flags

The wheel's console script (pyproject's ``[project.scripts]``). Each tool runs
exactly as ``python -m experiments.TOOL`` from a clone does: same flags,
output and exit codes. ``--config=NAME`` (optionally ``NAME:ARG``) names a
config shipped in experiments/configs/; a path to a config file works as
before. Imports nothing heavy, so ``--help`` and a typo answer at once.
"""

from __future__ import annotations

import os
import runpy
import sys

# Tool -> (module run as __main__, one line for --help). Not listed:
# experiments.torch_reference, the benchmark's child process.
TOOLS = {
    "run": ("experiments.run",
            "train and evaluate a config (default: the offline demo)"),
    "compare": ("experiments.compare",
                "results.json files beside the paper's and logs' numbers"),
    "export": ("experiments.export",
               "a run's merged ViT and head for timm/PyTorch"),
    "head_share": ("experiments.head_share",
                   "how much of a run's task-agnostic error is its head's"),
    "prepare_data": ("experiments.prepare_data",
                     "the paper's image folders from the public archives"),
    "dry_run_table": ("experiments.dry_run_table",
                      "every paper config's dry run at full size, one table"),
    "make_dry_run_data": ("experiments.make_dry_run_data",
                          "synthetic image folders for dry runs"),
    "import_reference": ("experiments.import_reference",
                         "a run of the official PyTorch code, for our eval"),
    "make_demo_backbone": ("experiments.make_demo_backbone",
                           "trains the demo's backbone ViT"),
    "benchmark": ("experiments.benchmark",
                  "speed of the train step, merged evaluation and input"),
    "benchmark_pipeline": ("experiments.benchmark_pipeline",
                           "input-pipeline scaling over worker processes"),
}
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_names() -> list[str]:
  """The packaged configs, by the name ``--config=NAME`` takes."""
  return sorted(n[:-3] for n in os.listdir(CONFIGS)
                if n.endswith(".py") and n not in ("__init__.py", "base.py"))


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def resolve_config(value: str) -> str:
  """A packaged config's path for a bare name; anything else unchanged."""
  file, sep, arg = value.partition(":")
  if os.path.isfile(file) or os.sep in file or file.endswith(".py"):
    return value          # a path: experiments.run checks it
  if file not in config_names():
    _fail(f"no config named {file!r}; pass --config=PATH to a config file or "
          f"the name of a packaged one: {', '.join(config_names())}")
  return os.path.join(CONFIGS, f"{file}.py") + sep + arg


def _with_config_paths(args: list[str]) -> list[str]:
  """``--config=NAME`` and ``--config NAME`` with NAME made a file path."""
  out = list(args)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config(a.split("=", 1)[1])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def usage() -> str:
  width = max(map(len, TOOLS)) + 2
  tools = "".join(f"  {name:<{width}}{text}\n"
                  for name, (_, text) in TOOLS.items())
  return ("usage: slora-jax TOOL [FLAGS]   (a tool's flags: slora-jax TOOL "
          f"--help)\n\ntools:\n{tools}\nconfigs for run --config=NAME: "
          f"{', '.join(config_names())}\n")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage(), end="", file=sys.stdout if argv else sys.stderr)
    sys.exit(0 if argv else 2)
  tool = argv[0].replace("-", "_")
  if tool not in TOOLS:
    _fail(f"unknown tool {argv[0]!r}; one of: {', '.join(TOOLS)} "
          "(slora-jax --help)")
  args = _with_config_paths(argv[1:]) if tool == "run" else argv[1:]
  # As `python -m`: the module is __main__ (sys.modules and sys.argv[0]
  # included, so absl's help and spawned worker processes see the same).
  sys.argv = [f"slora-jax {tool}", *args]
  runpy.run_module(TOOLS[tool][0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
