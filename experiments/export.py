"""Export a run's merged ViT and head for PyTorch/timm.

    python -m experiments.export WORKDIR --out=DIR [--seed=1993] [--step=N]

Reads the run's config (``WORKDIR/seed_<seed>/results.json``, else
``WORKDIR/config.json``) and one of its checkpoints (default: the model the
run last evaluated, whose numbers results.json reports; or number
``--step``, a finished task's or one taken mid-task), rebuilds the backbone
as the run did and writes to ``DIR``:

* ``model.safetensors`` + ``config.json``: the merged ViT in timm's layout
  with ``head.weight``/``head.bias`` for the classes trained so far (row i is
  dataset class ``class_order[i]``), loadable as
  ``timm.create_model("local-dir:DIR", pretrained=True)``; ``config.json``
  also holds the input preprocessing, the classes and the source run;
* ``backbone/``: the same for the frozen ViT (no adapters), with the head;
* ``peft/``: the adapters as one PEFT LoRA of timm's ViT, head included
  (`slora_jax.interop.peft`): ``PeftModel.from_pretrained(backbone, DIR/peft)``;
* ``adapters/``: the SD-LoRA state itself, per task and with its magnitudes
  (`slora_jax.save_adapters`: safetensors + JSON).

Nothing in WORKDIR is written: the checkpoints are opened read-only.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from absl import flags
import jax
import numpy as np
import safetensors.numpy

import slora_jax as sl
from experiments import tool
from slora_jax.interop import peft
from slora_jax.models import convert
from slora_jax.runner import backbone as backbone_lib
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner.data import transforms

__all__ = ["load_run", "export", "main"]

# timm's names of the sizes we know; another size takes vit_base's name, and
# model_args (which timm applies over the name's own) give the real one.
_TIMM_NAMES = {(192, 3): "vit_tiny", (384, 6): "vit_small", (768, 12): "vit_base",
               (1024, 16): "vit_large"}
# Architectures timm registers (timm 1.0; tests/test_export.py checks them).
TIMM_REGISTERED = frozenset(
    f"{n}_patch{p}_{s}" for n in _TIMM_NAMES.values()
    for p, s in ((16, 224), (16, 384))) | {
        "vit_base_patch8_224", "vit_base_patch32_224", "vit_base_patch32_384",
        "vit_small_patch8_224", "vit_small_patch32_224",
        "vit_small_patch32_384", "vit_large_patch32_384"}


def find_run_dir(workdir: str, seed: int | None, holds: str = "checkpoints",
                 what: str = "checkpoints") -> str:
  """The run folder of ``workdir``: itself when it holds ``holds``, else its
  one ``seed_<seed>`` folder (``seed`` None: the only ``seed_*`` one) that
  does. ``what`` names ``holds`` in the one-line errors."""
  if os.path.exists(os.path.join(workdir, holds)):
    return workdir
  pattern = f"seed_{seed}" if seed is not None else "seed_*"
  found = sorted(os.path.dirname(p) for p in
                 glob.glob(os.path.join(workdir, pattern, holds)))
  if not found:
    raise FileNotFoundError(f"{workdir} holds no run ({pattern}/ with "
                            f"{what}); pass the --workdir of a run")
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
  ckpt = ckpt_lib.Checkpointer(find_run_dir(workdir, seed), read_only=True)
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
  _, meta, step = _restore(find_run_dir(workdir, seed), step, state=False)
  return step, meta["cursor"]


def load_run(workdir: str, seed: int | None = None, step: int | None = None):
  """A run's backbone, adapters and head at one checkpoint.

  Returns:
    ``dict(exp, vit_config, model, params, adapters, head, meta, step,
    num_trained_classes, seed_dir)``; ``head`` has every class of the run,
    the first ``num_trained_classes`` of them trained.
  """
  seed_dir = find_run_dir(workdir, seed)
  # The checkpoint first: a run without one gets that answer, not a
  # complaint about the config it left behind.
  state, meta, step = _restore(seed_dir, step)
  exp = config_lib.from_config(_config(seed_dir))
  arrays = state.get("arrays") or {}
  if "adapters" not in arrays:
    raise ValueError(f"{seed_dir} is a run of {exp.method.name}, whose "
                     "checkpoints hold no SD-LoRA adapters; export writes "
                     "the runs of the methods built on them")
  state = {**arrays["adapters"], "head": arrays["head"]}
  model_cfg, model, params, _ = backbone_lib.build(exp.model, exp.data)
  previous = state["frozen"]["previous"]
  first = next(iter(previous.values()))["A"]
  rules = exp.adapter.rules(model_cfg.qkv)    # as the run built them
  spec = sl.AdapterSpec(sl.find_targets(params, rules),
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
  """timm's name and arguments for ViT ``cfg`` (class token, no fc_norm).

  ``architecture`` is a name timm registers and ``model_args`` override all
  of its arguments, so ``timm.create_model(architecture, **model_args)``
  builds ``cfg`` whether or not timm has a name for it; ``pretrained_cfg``
  is what ``timm.create_model("local-dir:DIR", pretrained=True)`` reads.
  """
  name = f"{_TIMM_NAMES.get((cfg.width, cfg.num_heads), 'vit_base')}_patch"
  exact = f"{name}{cfg.patch_size}_{cfg.image_size}"
  mean_std = transforms.NORMALIZATIONS[normalize]
  mean = list(mean_std[0]) if mean_std else [0.0, 0.0, 0.0]
  std = list(mean_std[1]) if mean_std else [1.0, 1.0, 1.0]
  size = [cfg.in_chans, cfg.image_size, cfg.image_size]
  return {
      "architecture": exact if exact in TIMM_REGISTERED else f"{name}16_224",
      "num_classes": num_classes,
      "num_features": cfg.width,
      "pretrained_cfg": {"num_classes": num_classes, "classifier": "head",
                         "input_size": size, "fixed_input_size": True,
                         "mean": mean, "std": std, "crop_pct": 1.0,
                         "interpolation": "bilinear"},
      "model_args": {"img_size": cfg.image_size, "patch_size": cfg.patch_size,
                     "in_chans": cfg.in_chans, "embed_dim": cfg.width,
                     "depth": cfg.depth, "num_heads": cfg.num_heads,
                     "mlp_ratio": cfg.mlp_dim / cfg.width, "qkv_bias": True,
                     "class_token": True, "global_pool": "token"},
      "input": {"size": size, "layout": "NCHW in PyTorch (NHWC in slora_jax)",
                "pixels": "RGB in [0, 1]", "mean": mean, "std": std},
  }


def evaluated_step(workdir: str, seed: int | None = None) -> tuple[int, str]:
  """(step, kind) of the checkpoint holding the model the run last evaluated.

  An evaluation comes between two checkpoints: the task trained (evaluation
  pending), then, after ``end_task``, which normalises the task's direction
  (docs/semantics.md §3.6), the task finished. ``kind`` is 'evaluated' for
  the first (the model results.json reports); 'finished' for the second when
  the first is no longer kept (the next task's starting point, close to it
  but not equal); 'latest' when no kept checkpoint follows an evaluation
  (the run stopped before finishing a task): a model no evaluation saw.
  """
  metas = [(s, m) for s, m in checkpoint_metas(workdir, seed) if m is not None]
  if not metas:
    raise FileNotFoundError(f"{workdir} holds no readable checkpoint")
  ends = [s for s, m in metas if not m["cursor"]["begun"]
          and m["cursor"]["task"] > 0]
  if not ends:
    return metas[-1][0], "latest"
  by_step = dict(metas)
  end = ends[-1]
  before = by_step.get(end - 1)
  if (before and before["cursor"]["begun"]
      and before["cursor"]["task"] == by_step[end]["cursor"]["task"] - 1):
    return end - 1, "evaluated"
  return end, "finished"


def _write_timm(directory: str, params, head, n: int, cfg, doc: dict) -> None:
  """``model.safetensors`` (params and head's first n classes) + config.json."""
  os.makedirs(directory, exist_ok=True)
  flat = convert.to_timm_arrays(params, cfg)
  head = jax.tree.map(np.asarray, head)
  flat["head.weight"] = np.ascontiguousarray(head["kernel"][:, :n].T)
  flat["head.bias"] = np.ascontiguousarray(head["bias"][:n])
  # Through open(): safetensors' own save_file creates the file 0600.
  with open(os.path.join(directory, "model.safetensors"), "wb") as f:
    f.write(safetensors.numpy.save(flat, metadata={"format": "pt"}))
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)


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
  """Writes the files the module docstring lists to ``out``; returns the
  config written (``source.evaluated``: whether results.json reports it)."""
  if os.path.exists(out) and not os.path.isdir(out):
    _make_out(out)                      # the one-line error, before the work
  try:
    evaluated, kind = evaluated_step(workdir, seed)
  except (FileNotFoundError, ValueError):
    evaluated, kind = None, "latest"    # load_run says what is missing
  found = kind == "evaluated"
  try:
    run = load_run(workdir, seed, evaluated if step is None else step)
  except ckpt_lib.CorruptCheckpointError as e:
    if step is not None or evaluated is None:
      raise
    # The evaluated model is damaged: the newest intact checkpoint, said.
    print(f"warning: {' '.join(str(e).split())}; exporting the newest intact "
          "checkpoint instead", file=sys.stderr)
    run = load_run(workdir, seed, None)
  n = run["num_trained_classes"]
  if n == 0:
    raise ValueError(f"checkpoint {run['step']} of {run['seed_dir']} is taken "
                     "before any task was trained: nothing to export")
  cfg = run["vit_config"]
  _make_out(out)
  fp = run["meta"]["fingerprint"]
  doc = timm_config(cfg, n, run["exp"].data.normalize) | {
      "class_order": fp["class_order"][:n],
      "source": {"workdir": os.path.abspath(run["seed_dir"]),
                 "checkpoint": run["step"], "cursor": run["meta"]["cursor"],
                 "method": fp["method"], "semantics": fp["semantics"],
                 "seed": fp["seed"],
                 "evaluated": found and run["step"] == evaluated},
  }
  _write_timm(out, sl.merge(run["params"], run["adapters"]), run["head"], n,
              cfg, doc)
  _write_timm(os.path.join(out, "backbone"), run["params"], run["head"], n,
              cfg, doc | {"adapters": "none: the frozen backbone"})
  head = jax.tree.map(lambda x: np.asarray(x)[..., :n], run["head"])
  peft.save_peft(os.path.join(out, "peft"), run["adapters"], cfg, head)
  sl.save_adapters(os.path.join(out, "adapters"), run["adapters"],
                   extra={"head": run["head"]}, metadata=doc["source"],
                   overwrite=True)
  return doc


def define_run_flags(flag_values: flags.FlagValues,
                     step_default: str = "the latest") -> None:
  """The flags that pick one run and checkpoint (see `load_run`); the run's
  folder is the positional argument WORKDIR (`run_args`)."""
  flags.DEFINE_integer("seed", None, "which seed_<seed> run (needed if "
                       "several)", flag_values=flag_values)
  flags.DEFINE_integer("step", None, f"checkpoint number (default: "
                       f"{step_default})", flag_values=flag_values)


def run_args(argv, flag_values: flags.FlagValues) -> tuple:
  """(workdir, seed, step) from a tool's WORKDIR and `define_run_flags`."""
  workdir, = tool.positional(argv, "WORKDIR")
  return workdir, flag_values.seed, flag_values.step


FLAGS = flags.FlagValues()   # its own: head_share, import_reference share names
define_run_flags(FLAGS)
flags.DEFINE_string("out", None, "output directory", required=True,
                    flag_values=FLAGS)
USER_ERRORS = (OSError, ValueError)   # FileNotFoundError included


def main(argv) -> int:
  """``python -m experiments.export WORKDIR --out=DIR``: `tool.run`'s main."""
  workdir, seed, step = run_args(argv, FLAGS)
  out = FLAGS.out
  doc = export(workdir, out, seed, step)
  if step is None and not doc["source"]["evaluated"]:
    print(f"note: checkpoint {doc['source']['checkpoint']} is not the model "
          "results.json reports (a mid-task checkpoint, or the one before "
          "end_task is no longer kept)", file=sys.stderr)
  print(f"{doc['architecture']} ({doc['num_classes']} classes, checkpoint "
        f"{doc['source']['checkpoint']}) -> {out}/model.safetensors, "
        f"config.json, backbone/, peft/, adapters/")
  return 0


if __name__ == "__main__":
  tool.run(main, FLAGS, USER_ERRORS)
