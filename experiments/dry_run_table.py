"""Every paper config's dry run at full size, one at a time, and their table.

  python -m experiments.dry_run_table --workdir=/tmp/dry

For each config: synthetic image folders with its number of classes and its
data set's train images per class (`TRAIN_PER_CLASS`: the step count of the
projection depends on it), then ``python -m experiments.run`` with
``--config.dry_run=True``, a random ViT-B/16, train steps executed at
``--batch`` and ``--image_size`` (CPU), and the train step analysed at the
config's own batch (128) and 224 px. Prints a Markdown table, one row per
config, from each run's results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from experiments import tool
from experiments.make_dry_run_data import write_folders

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
_BATCH = flags.DEFINE_integer("batch", 4, "Train batch the dry runs execute.")
_IMAGE = flags.DEFINE_integer("image_size", 32, "Image size they execute at.")
_ONLY = flags.DEFINE_list("configs", [], "Configs to run (default: all).")

# config: (classes, train images per class). ImageNet-R ~24,000 and
# ImageNet-A ~6,000 train images (docs/semantics.md §6.1), CIFAR-100's
# 50,000, CUB-200-2011's official 5,994 (~30 per class); DomainNet's split is
# unknown to the reference: 120 per class here, about a tenth of the 409,832
# train images of DomainNet's own lists (Peng et al. 2019; InfLoRA's lists,
# which the paper follows, were not counted); its hours scale with them.
TRAIN_PER_CLASS = {
    "imagenet_r_5": (200, 120), "imagenet_r_10": (200, 120),
    "imagenet_r_20": (200, 120), "imagenet_a_10": (200, 30),
    "cifar100_10": (100, 500), "domainnet_5": (345, 120),
    "cub200_10": (200, 30)}
_HERE = os.path.dirname(os.path.abspath(__file__))


def _run(name: str, root: str, workdir: str) -> dict:
  config = os.path.join(_HERE, "configs", f"{name}.py")
  # The child runs beside the package (so `-m experiments.run` imports from
  # a clone): paths relative to the caller's directory are made absolute.
  root, workdir = os.path.abspath(root), os.path.abspath(workdir)
  cmd = [sys.executable, "-m", "experiments.run", f"--config={config}",
         f"--workdir={workdir}", "--config.dry_run=True",
         f"--config.dry_run_batch_size={_BATCH.value}",
         f"--config.dry_run_image_size={_IMAGE.value}",
         "--config.model.init=random", "--config.data.source=folder",
         f"--config.data.root={root}", "--config.data.num_workers=2"]
  subprocess.run(cmd, check=True, cwd=os.path.dirname(_HERE))
  seed = os.listdir(workdir)
  (seed_dir,) = [s for s in seed if s.startswith("seed_")]
  with open(os.path.join(workdir, seed_dir, "results.json")) as f:
    return json.load(f)


def _gib(x) -> str:
  return "n/a" if x is None else f"{x / (1 << 30):.1f}"


def row(name: str, d: dict) -> str:
  """One Markdown row of a dry run's results.json."""
  dr, st = d["dry_run"], d["dry_run"]["step"]
  per = st["per_device"]
  proj = dr["projection"]
  hours = " / ".join(
      f"{60 * p['hours_per_seed']:.1f}{'' if p['fits'] else ' (no fit)'}"
      for p in proj.values())
  ckpt = max(t["checkpoint_bytes"] for t in dr["tasks"]) / (1 << 20)
  sizes = d["task_sizes"]
  return (f"| `{name}` | {len(sizes)}×{sizes[0]} | "
          f"{dr['run_steps_per_seed']:,} | {st['flops'] / 1e12:.2f} | {_gib(per['1']['total'])} / "
          f"{_gib(per.get('4', {}).get('total'))} / "
          f"{_gib(per.get('8', {}).get('total'))} | {ckpt:.1f} | "
          f"{_gib(dr['peak_host_memory_bytes'])} | {hours} |")


HEADER = ("| config | tasks × classes | steps per seed | TFLOP per step | "
          "step memory per device at 1 / 4 / 8 devices (GiB) | largest "
          "checkpoint (MiB) | peak host memory (GiB) | minutes per seed: "
          "v4-8 / v5e-8 / H100 |\n|---|---|---|---|---|---|---|---|")


def main(argv):
  tool.positional(argv)
  rows, data = [], {}
  for name, (classes, train) in TRAIN_PER_CLASS.items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    root = os.path.join(_WORKDIR.value, f"data_{classes}x{train}")
    if (classes, train) not in data:
      data[(classes, train)] = write_folders(root, classes, train, 1)
    d = _run(name, root, os.path.join(_WORKDIR.value, name))
    rows.append(row(name, d))
    print("\n".join([HEADER, *rows]), flush=True)


if __name__ == "__main__":
  tool.run(main)
