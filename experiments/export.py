"""Export a run's merged ViT and head for PyTorch/timm.

    python -m experiments.export WORKDIR --out=DIR [--seed=1993] [--step=N]

Reads the run's config (``WORKDIR/seed_<seed>/results.json``, else
``WORKDIR/config.json``) and one of its checkpoints (the latest, or number
``--step``; a finished task's or one taken mid-task), rebuilds the backbone
as the run did, merges the adapters into it and writes to ``DIR``:

* ``model.safetensors``: the merged ViT in timm's layout plus ``head.weight``
  and ``head.bias`` for the classes trained so far (rows in the run's label
  order: row i is dataset class ``class_order[i]``);
* ``config.json``: the timm architecture and its arguments, the input
  preprocessing, the classes and where the weights came from, so that
  ``timm.create_model(c["architecture"], num_classes=c["num_classes"],
  **c["model_args"])`` followed by ``load_state_dict`` runs the model;
* ``adapters/``: the adapter state alone (`slora_jax.save_adapters`).

Nothing in WORKDIR is written: the checkpoints are opened read-only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import jax
import numpy as np
import safetensors.numpy

import slora_jax as sl
from slora_jax.models import convert
from slora_jax.runner import backbone as backbone_lib
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner.data import transforms

__all__ = ["load_run", "export", "main"]

# timm names of the sizes we know; any other size uses the nearest name with
# explicit model_args (timm.create_model accepts them as overrides).
_TIMM_NAMES = {(192, 3): "vit_tiny", (384, 6): "vit_small", (768, 12): "vit_base",
               (1024, 16): "vit_large"}


def _seed_dir(workdir: str, seed: int | None) -> str:
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    return workdir
  pattern = f"seed_{seed}" if seed is not None else "seed_*"
  found = sorted(glob.glob(os.path.join(workdir, pattern)))
  if not found:
    raise FileNotFoundError(f"{workdir} holds no run ({pattern}/ with "
                            "checkpoints); pass the --workdir of a run")
  if len(found) > 1:
    raise ValueError(f"{workdir} holds runs of several seeds "
                     f"({', '.join(os.path.basename(f) for f in found)}); "
                     "pick one with --seed")
  return found[0]


def _config(seed_dir: str) -> dict:
  for path in (os.path.join(seed_dir, "results.json"),
               os.path.join(os.path.dirname(seed_dir), "config.json")):
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        doc = json.load(f)
      return doc["config"] if path.endswith("results.json") else doc
  raise FileNotFoundError(f"no results.json in {seed_dir} and no config.json "
                          "beside it: the run's config is unknown")


def _restore(seed_dir: str, step: int | None, state: bool = True):
  """(state or None, meta, step) of checkpoint ``step`` (default: the newest
  intact one; a corrupt one is named on stderr and skipped, not moved)."""
  ckpt = ckpt_lib.Checkpointer(seed_dir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"no checkpoint in {ckpt.directory} yet: the run stopped before its "
          "first save; rerun it to train, then export")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint {step} in {ckpt.directory} "
                              f"(there are: {', '.join(map(str, steps))})")
    if step is None and state:
      # No target: the arrays come back as saved, adapters and head included.
      found = ckpt.restore_intact(lambda meta: None)
      if found is None:
        raise ckpt_lib.CorruptCheckpointError(
            f"every checkpoint in {ckpt.directory} is corrupt")
      step, tree, meta = found
      return tree, meta, step
    step = steps[-1] if step is None else step
    try:
      if state:
        tree, meta = ckpt.restore(None, step=step)
        return tree, meta, step
      return None, ckpt.read_meta(step), step
    except ckpt_lib.CorruptCheckpointError as e:
      raise ckpt_lib.CorruptCheckpointError(
          f"checkpoint {step} in {ckpt.directory} is corrupt ({e})") from None
  finally:
    ckpt.close()


def checkpoint_metas(workdir: str, seed: int | None = None
                     ) -> list[tuple[int, dict | None]]:
  """(step, meta, or None if corrupt) of every checkpoint of a run, oldest
  first, without their arrays."""
  ckpt = ckpt_lib.Checkpointer(_seed_dir(workdir, seed), read_only=True)
  out = []
  try:
    for step in ckpt.all_steps():
      try:
        out.append((step, ckpt.read_meta(step)))
      except ckpt_lib.CorruptCheckpointError:
        out.append((step, None))
  finally:
    ckpt.close()
  return out


def checkpoint_cursor(workdir: str, seed: int | None = None,
                      step: int | None = None) -> tuple[int, dict]:
  """(step, task-loop cursor) of a run's checkpoint, without its arrays."""
  _, meta, step = _restore(_seed_dir(workdir, seed), step, state=False)
  return step, meta["cursor"]


def _rules(exp: config_lib.Experiment, model_cfg):
  # The run's target rules, as slora_jax.runner.session builds them.
  if exp.adapter.targets == "qv":
    return sl.vit_qv_rules(model_cfg.qkv)
  return tuple(sl.kernel(p) for p in exp.adapter.targets.split(","))


def load_run(workdir: str, seed: int | None = None, step: int | None = None):
  """A run's backbone, adapters and head at one checkpoint.

  Returns:
    ``dict(exp, vit_config, model, params, adapters, head, meta, step,
    num_trained_classes, seed_dir)``; ``head`` has every class of the run,
    the first ``num_trained_classes`` of them trained.
  """
  seed_dir = _seed_dir(workdir, seed)
  # The checkpoint first: a run without one gets that answer, not a
  # complaint about the config it left behind.
  state, meta, step = _restore(seed_dir, step)
  exp = config_lib.from_config(_config(seed_dir))
  model_cfg, model, params, _ = backbone_lib.build(exp.model, exp.data)
  previous = state["frozen"]["previous"]
  first = next(iter(previous.values()))["A"]
  spec = sl.AdapterSpec(sl.find_targets(params, _rules(exp, model_cfg)),
                        capacity=first.shape[0], max_rank=first.shape[1],
                        policy=exp.policy())
  to_jax = lambda tree: jax.tree.map(jax.numpy.asarray, tree)
  adapters = sl.AdapterState(to_jax(state["trainable"]),
                             to_jax(state["frozen"]), spec)
  cursor, sizes = meta["cursor"], meta["fingerprint"]["task_sizes"]
  tasks_done = cursor["task"] + (1 if cursor["begun"] else 0)
  trained = (sum(sizes) if exp.method.single_phase
             else sum(sizes[:tasks_done]))
  return dict(exp=exp, vit_config=model_cfg, model=model, params=params,
              adapters=adapters, head=to_jax(state["head"]), meta=meta,
              step=step, num_trained_classes=trained, seed_dir=seed_dir)


def timm_config(cfg, num_classes: int, normalize: str) -> dict:
  """timm's name and arguments for ViT ``cfg`` (class token, no fc_norm)."""
  name = _TIMM_NAMES.get((cfg.width, cfg.num_heads), "vit_base")
  mean_std = transforms.NORMALIZATIONS[normalize]
  return {
      "architecture": f"{name}_patch{cfg.patch_size}_{cfg.image_size}",
      "num_classes": num_classes,
      "model_args": {"img_size": cfg.image_size, "patch_size": cfg.patch_size,
                     "in_chans": cfg.in_chans, "embed_dim": cfg.width,
                     "depth": cfg.depth, "num_heads": cfg.num_heads,
                     "mlp_ratio": cfg.mlp_dim / cfg.width, "qkv_bias": True,
                     "class_token": True, "global_pool": "token"},
      "input": {"size": [cfg.in_chans, cfg.image_size, cfg.image_size],
                "layout": "NCHW in PyTorch (NHWC in slora_jax)",
                "pixels": "RGB in [0, 1]",
                "mean": list(mean_std[0]) if mean_std else [0.0, 0.0, 0.0],
                "std": list(mean_std[1]) if mean_std else [1.0, 1.0, 1.0]},
  }


def _make_out(out: str) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out} is a file, not a directory; pass a "
                     "directory (it is created if missing)")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create --out {out} ({e.strerror or e}); pass "
                     "a writable directory") from None


def export(workdir: str, out: str, seed: int | None = None,
           step: int | None = None) -> dict:
  """Writes ``model.safetensors``, ``config.json`` and ``adapters/`` to
  ``out``; returns the config written."""
  if os.path.exists(out) and not os.path.isdir(out):
    _make_out(out)                      # the one-line error, before the work
  run = load_run(workdir, seed, step)
  n = run["num_trained_classes"]
  if n == 0:
    raise ValueError(f"checkpoint {run['step']} of {run['seed_dir']} is taken "
                     "before any task was trained: nothing to export")
  cfg = run["vit_config"]
  _make_out(out)
  weights = os.path.join(out, "model.safetensors")
  convert.save_timm_safetensors(sl.merge(run["params"], run["adapters"]),
                                weights, cfg)
  flat = safetensors.numpy.load_file(weights)
  head = jax.tree.map(np.asarray, run["head"])
  flat["head.weight"] = np.ascontiguousarray(head["kernel"][:, :n].T)
  flat["head.bias"] = np.ascontiguousarray(head["bias"][:n])
  safetensors.numpy.save_file(flat, weights, metadata={"format": "pt"})
  fp = run["meta"]["fingerprint"]
  doc = timm_config(cfg, n, run["exp"].data.normalize) | {
      "class_order": fp["class_order"][:n],
      "source": {"workdir": os.path.abspath(run["seed_dir"]),
                 "checkpoint": run["step"], "cursor": run["meta"]["cursor"],
                 "method": fp["method"], "semantics": fp["semantics"],
                 "seed": fp["seed"]},
  }
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)
  sl.save_adapters(os.path.join(out, "adapters"), run["adapters"],
                   extra={"head": run["head"]}, metadata=doc["source"],
                   overwrite=True)
  return doc


def add_run_arguments(parser: argparse.ArgumentParser,
                      step_default: str = "the latest") -> None:
  """The arguments that pick one run and checkpoint (see `load_run`)."""
  parser.add_argument("workdir", help="the run's --workdir (or a seed_* dir)")
  parser.add_argument("--seed", type=int, default=None,
                      help="which seed_<seed> run (needed if several)")
  parser.add_argument("--step", type=int, default=None,
                      help=f"checkpoint number (default: {step_default})")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.export",
                                   description=__doc__.split("\n\n")[0])
  add_run_arguments(parser)
  parser.add_argument("--out", required=True, help="output directory")
  args = parser.parse_args(argv)
  try:
    doc = export(args.workdir, args.out, args.seed, args.step)
  except (OSError, ValueError) as e:  # FileNotFoundError included
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"{doc['architecture']} ({doc['num_classes']} classes, checkpoint "
        f"{doc['source']['checkpoint']}) -> {args.out}/model.safetensors, "
        f"config.json, adapters/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
