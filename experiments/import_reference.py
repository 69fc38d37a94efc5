r"""Imports a run of the official PyTorch SD-LoRA code for our evaluation.

Usage:
  python -m experiments.import_reference RUN_DIR --out=DIR \
      [--magnitudes=1.80,1.33,1.18,1.08,1.47] [--task=T] [--model=vit_b16]

RUN_DIR is the reference's ``filepath`` holding ``lora_w_a_{t}.pt``,
``lora_w_b_{t}.pt``, ``CLs_weight{t}.pt`` and ``CLs_bias{t}.pt``. The state
after the last task (or ``--task``) is written to DIR with
`slora_jax.save_adapters` (the head as its extra arrays);
`slora_jax.runner.reference_import.load_imported` restores it for
`slora_jax.merge` and the eval step. The reference never saves
its learned magnitudes: pass them (α_prev[0..T-2] then α_cur, e.g. from its
log) or the reference's initial 0.8 is used, with a warning.

Needs PyTorch (``pip install torch``) to read the pickles, which are loaded
with torch's weights-only unpickler: only ``torch.nn.Linear`` and tensors.
Exit status 2 with a one-line error for anything that cannot be imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from slora_jax.models.vit import PRESETS


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.import_reference",
      description="Import a PyTorch SD-LoRA reference run as an adapter "
      "checkpoint.")
  p.add_argument("run_dir", metavar="RUN_DIR",
                 help="the reference's output directory (its 'filepath')")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--magnitudes", default=None,
                 help="comma-separated α_prev[0..T-2] then α_cur (default: "
                 "the reference's initial 0.8, with a warning)")
  p.add_argument("--task", type=int, default=None,
                 help="import the state after this 0-indexed task (default: "
                 "the last one present)")
  p.add_argument("--model", default="vit_b16", choices=sorted(PRESETS),
                 help="ViT preset the adapters are for (default vit_b16, the "
                 "reference's backbone)")
  for name in ("width", "depth", "num_heads", "mlp_dim", "image_size",
               "patch_size"):
    p.add_argument(f"--{name}", type=int, default=0,
                   help=f"override the preset's {name} (0: keep)")
  p.add_argument("--qkv", default="fused", choices=("fused", "split"),
                 help="attention parameter layout of our ViT")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing import in --out")
  return p


def _config(args):
  from slora_jax.models import vit as vit_lib
  fields = {k: getattr(args, k) for k in ("width", "depth", "num_heads",
                                          "mlp_dim", "image_size", "patch_size")
            if getattr(args, k)}
  return vit_lib.preset(args.model, qkv=args.qkv, **fields)


def run(argv: Sequence[str]) -> int:
  """Runs the import; returns the exit status (0, or 2 after an error line)."""
  args = _parser().parse_args(argv)
  from slora_jax import policy
  from slora_jax.runner import reference_import as ri

  try:
    config = _config(args)
    mags = (ri.magnitudes_from_string(args.magnitudes)
            if args.magnitudes is not None else None)
    ri.check_out_dir(args.out, args.overwrite)     # before the slow part
    run_data = ri.read_reference_run(args.run_dir, args.task)
    num = run_data.num_tasks
    init = policy.reference().magnitude_init       # the reference's 0.8
    adapters, head = ri.build_state(config, run_data,
                                    mags if mags is not None else [init] * num)
    if mags is None:
      print(f"warning: the reference does not save its learned magnitudes "
            f"(docs/semantics.md §3.3); using its initial value {init} for all "
            f"{num}. Pass --magnitudes with {num} value(s) ("
            f"{f'α_prev[0..{num - 2}] then ' if num > 1 else ''}α_cur, e.g. "
            f"from its log) to import the trained function.",
            file=sys.stderr, flush=True)
    info = {"source": os.path.abspath(args.run_dir), "task": num - 1,
            "num_tasks": num,
            "magnitudes": ([float(m) for m in mags] if mags is not None
                           else None),
            "magnitudes_source": ("given" if mags is not None else
                                  f"default {init}: not saved by the reference"),
            "files": list(run_data.a_files + run_data.b_files
                          + run_data.head_files)}
    out = ri.save_imported(args.out, adapters, head, config, info,
                           overwrite=args.overwrite)
  except (ri.ReferenceImportError, ValueError, OSError) as e:
    print(f"import_reference: error: {e}", file=sys.stderr, flush=True)
    return 2
  ranks = [a[0].shape[0] for a in run_data.a]
  print(f"imported tasks 0..{num - 1} from {args.run_dir}: {num - 1} previous "
        f"direction(s) + the current one, ranks {ranks}, "
        f"{len(adapters.spec.targets)} targets, head over "
        f"{head['bias'].shape[0]} classes -> {out}", flush=True)
  return 0


def main() -> None:
  sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
  main()
