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

import os
import sys
from typing import Sequence

from absl import flags

from experiments import tool
from slora_jax.models.vit import PRESETS

FLAGS = flags.FlagValues()   # its own: export's --out is another flag
flags.DEFINE_string("out", None, "output directory", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("magnitudes", None, "comma-separated α_prev[0..T-2] then "
                    "α_cur (default: the reference's initial 0.8, with a "
                    "warning)", flag_values=FLAGS)
flags.DEFINE_integer("task", None, "import the state after this 0-indexed "
                     "task (default: the last one present)", flag_values=FLAGS)
flags.DEFINE_enum("model", "vit_b16", sorted(PRESETS), "ViT preset the "
                  "adapters are for (default vit_b16, the reference's "
                  "backbone)", flag_values=FLAGS)
for _name in ("width", "depth", "num_heads", "mlp_dim", "image_size",
              "patch_size"):
  flags.DEFINE_integer(_name, 0, f"override the preset's {_name} (0: keep)",
                       flag_values=FLAGS)
flags.DEFINE_enum("qkv", "fused", ["fused", "split"], "attention parameter "
                  "layout of our ViT", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace an existing import in --out",
                  flag_values=FLAGS)


def _config():
  from slora_jax.models import vit as vit_lib
  fields = {k: FLAGS[k].value for k in ("width", "depth", "num_heads",
                                        "mlp_dim", "image_size", "patch_size")
            if FLAGS[k].value}
  return vit_lib.preset(FLAGS.model, qkv=FLAGS.qkv, **fields)


def main(argv) -> int:
  """``python -m experiments.import_reference RUN_DIR --out=DIR``."""
  run_dir, = tool.positional(argv, "RUN_DIR")
  from slora_jax import policy
  from slora_jax.runner import reference_import as ri

  magnitudes, out, overwrite = FLAGS.magnitudes, FLAGS.out, FLAGS.overwrite
  try:
    config = _config()
    mags = (ri.magnitudes_from_string(magnitudes)
            if magnitudes is not None else None)
    ri.check_out_dir(out, overwrite)     # before the slow part
    run_data = ri.read_reference_run(run_dir, FLAGS.task)
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
    info = {"source": os.path.abspath(run_dir), "task": num - 1,
            "num_tasks": num,
            "magnitudes": ([float(m) for m in mags] if mags is not None
                           else None),
            "magnitudes_source": ("given" if mags is not None else
                                  f"default {init}: not saved by the reference"),
            "files": list(run_data.a_files + run_data.b_files
                          + run_data.head_files)}
    out = ri.save_imported(out, adapters, head, config, info,
                           overwrite=overwrite)
  except (ri.ReferenceImportError, ValueError, OSError) as e:
    tool.fail(e)
  ranks = [a[0].shape[0] for a in run_data.a]
  print(f"imported tasks 0..{num - 1} from {run_dir}: {num - 1} previous "
        f"direction(s) + the current one, ranks {ranks}, "
        f"{len(adapters.spec.targets)} targets, head over "
        f"{head['bias'].shape[0]} classes -> {out}", flush=True)
  return 0


def run(args: Sequence[str]) -> int:
  """``main`` in-process on ``args`` (no program name); the exit status."""
  return tool.call(main, args, FLAGS)


if __name__ == "__main__":
  tool.run(main, FLAGS)
