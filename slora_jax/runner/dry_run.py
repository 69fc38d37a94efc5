"""The dry run: a config's whole task loop with 2 train steps and 2 eval
batches per task, then what its real run will need.

``--config.dry_run=True`` runs the real loop (`slora_jax.runner.train`) on the
experiment `executed` returns: the config's model, classes, tasks, evaluation
and checkpoints, its first seed only, capped at `STEPS` train steps per task,
and evaluated on a class-balanced subset of the seen classes' test images:
`EVAL_BATCHES` batches, or one image of every seen class where those hold
fewer (`eval_samples`). ``dry_run_batch_size`` (train steps) and
``dry_run_image_size`` make the executed steps small enough for a CPU;
`report` still compiles the train step at the config's own global batch and
image size:

* peak host memory (``ru_maxrss``) of the loop;
* XLA's memory analysis of the compiled train step per device at 1, 4 and 8
  devices of data parallelism. The step replicates every parameter and splits
  only the batch, so one device of an n-device mesh runs the step at
  ``batch / n`` plus an all-reduce of the trainable tree's gradients (adapters
  and head, ``step.trainable_bytes``): where this host has fewer than n
  devices the figures compile the step at ``batch / n`` on one device, else
  the real sharded step (``sharded``). They are XLA:CPU's where the dry run runs on
  a CPU: an accelerator's compiler fuses and lays out differently;
* the checkpoint size after every task;
* the whole run's projected wall time on TPU v4-8, v5e-8 and one H100 from
  XLA's FLOP count of the step, the run's step count and `MFU`, and whether
  a chip's memory holds the per-device step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import resource
import sys

import jax
import numpy as np

from slora_jax.models import vit as vit_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import parallel
from slora_jax.runner import paths
from slora_jax.runner import steps as steps_lib
from slora_jax.runner.data import loader

__all__ = ["STEPS", "EVAL_BATCHES", "MFU", "CHIPS", "executed",
           "eval_samples", "checkpoint_bytes", "report", "format_lines"]

STEPS = 2
EVAL_BATCHES = 2
DEVICE_COUNTS = (1, 4, 8)
# Model FLOP utilisation assumed for the projection: what a ViT-B/16 train
# step at batch 128 commonly reaches on these chips, an assumption, not a
# measurement (experiments/benchmark/flops.py assumes the same).
MFU = 0.4
_GIB = 1 << 30

# Dense peak TFLOP/s per chip by the config's compute dtype, and memory per
# chip. float32 matmuls at JAX's default precision run as bfloat16 passes on
# TPU and as TF32 on H100. Sources: cloud.google.com/tpu/docs/v4 (275 bf16
# TFLOP/s, 32 GiB HBM per chip; a v4-8 has 4 chips), cloud.google.com/tpu/
# docs/v5e (197 bf16 TFLOP/s, 16 GiB per chip; 8 chips), NVIDIA H100 SXM
# datasheet (989 bf16 / 495 TF32 dense TFLOP/s, 80 GB).
CHIPS = {
    "TPU v4-8": dict(chips=4, tflops={"bfloat16": 275.0, "float32": 275.0},
                     memory_bytes=32 * _GIB),
    "TPU v5e-8": dict(chips=8, tflops={"bfloat16": 197.0, "float32": 197.0},
                      memory_bytes=16 * _GIB),
    "H100": dict(chips=1, tflops={"bfloat16": 989.0, "float32": 495.0},
                 memory_bytes=80 * 10**9),
}


def executed(exp: config_lib.Experiment) -> config_lib.Experiment:
  """The experiment a dry run executes (``exp`` itself when not a dry run)."""
  if not exp.dry_run:
    return exp
  tr, small = exp.train, exp.dry_run_batch_size
  cap = min(STEPS, tr.max_steps_per_task) if tr.max_steps_per_task else STEPS
  # The eval batch stays the config's: its 2 batches cover the seen classes.
  train = dataclasses.replace(
      tr, max_steps_per_task=cap, batch_size=small or tr.batch_size,
      eval_batch_size=tr.eval_batch_size or tr.batch_size)
  model, data = exp.model, exp.data
  if exp.dry_run_image_size:
    size = exp.dry_run_image_size
    model = dataclasses.replace(model, image_size=size)
    data = dataclasses.replace(data, image_size=size, resize_size=0)
  return dataclasses.replace(exp, seeds=exp.seeds[:1], model=model, data=data,
                             train=train)


def eval_samples(train: config_lib.TrainSettings) -> int:
  """Test images a dry run evaluates per task, at least one per seen class."""
  return EVAL_BATCHES * (train.eval_batch_size or train.batch_size)


def checkpoint_bytes(ckpt) -> int:
  """Bytes of the latest checkpoint (its step folder) of a `Checkpointer`."""
  step = ckpt.latest_step()
  folder = paths.join(ckpt.directory, str(step))
  total = 0
  for root, names in paths.walk_files(folder):
    for name in names:
      with paths.open_file(paths.join(root, name), "rb") as f:
        total += f.seek(0, 2)
  return total


def peak_host_bytes() -> int:
  """This process's peak resident memory (``ru_maxrss``: KiB on Linux)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _abstract_state(run, method, backbone):
  """Shapes of the method's arrays and its fresh optimiser state."""
  ms = jax.eval_shape(lambda b: method.init(run, b), backbone)
  opt = jax.eval_shape(
      functools.partial(steps_lib.init_opt_state, method, run), ms.arrays)
  return steps_lib.TrainState(ms.arrays, opt)


def _full_run(exp: config_lib.Experiment, session):
  """The method's `Run` at the config's model size, and its backbone shapes."""
  cfg = exp.model.vit_config()
  backbone = vit_lib.abstract_params(cfg)
  return dataclasses.replace(session.run, model=vit_lib.VisionTransformer(cfg),
                             model_config=cfg, backbone_template=backbone,
                             exp=exp), backbone


def _compiled_step(exp: config_lib.Experiment, session, batch: int,
                   devices: int = 1):
  """The train step at the config's image size, compiled for global ``batch``
  split over a data mesh of the first ``devices`` devices (one: no mesh)."""
  run, backbone = _full_run(exp, session)
  cfg = run.model_config
  step = steps_lib.make_train_step(session.method, run)
  state = (_abstract_state(run, session.method, backbone), backbone)
  rows = {"image": ((batch, cfg.image_size, cfg.image_size, 3), np.float32),
          "label": ((batch,), np.int32), "mask": ((batch,), np.float32)}
  rep = split = None
  if devices > 1:
    mesh = parallel.make_mesh(jax.devices()[:devices])
    rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  images = {k: jax.ShapeDtypeStruct(*v, sharding=split)
            for k, v in rows.items()}
  lo, hi = session.data.train_tasks[-1]
  task = steps_lib.task_args(session.num_phases - 1, lo, hi, 0.01)
  train_state, params = state
  return step.lower(train_state, images, task, params).compile()


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes,
         "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes,
         "temporaries": m.temp_size_in_bytes}
  # Donated arguments (the train state) hold the outputs.
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"]
                  + out["temporaries"])
  return {k: int(v) for k, v in out.items()}


def _run_steps(exp: config_lib.Experiment, data) -> int:
  """Train steps of every phase of the real run (one seed)."""
  tr, total, epochs = exp.train, 0, exp.method.epochs(exp)
  for t in range(len(data.train_tasks)):
    steps = loader.steps_per_epoch(len(data.train_indices(t)),
                                   tr.batch_size) * epochs
    total += min(steps, tr.max_steps_per_task) if tr.max_steps_per_task \
        else steps
  return total


def _projection(flops: float | None, steps: int, seeds: int, dtype: str,
                per_device: dict) -> dict:
  out = {}
  for name, chip in CHIPS.items():
    n, peak = chip["chips"], chip["tflops"][dtype] * 1e12
    need = per_device.get(str(n), {}).get("total")
    seconds = None if flops is None else flops * steps / (n * peak * MFU)
    out[name] = {
        "chips": n, "peak_tflops_per_chip": chip["tflops"][dtype],
        "hours_per_seed": None if seconds is None else seconds / 3600,
        "hours_all_seeds": None if seconds is None else seeds * seconds / 3600,
        "memory_per_chip_bytes": chip["memory_bytes"],
        "step_bytes_per_chip": need,
        "fits": None if need is None else bool(need <= chip["memory_bytes"])}
  return out


def report(exp: config_lib.Experiment, session, checkpoints: list[dict],
           peak_host: int) -> dict:
  """The ``dry_run`` section of results.json (``exp``: the config as given)."""
  run = session.exp
  batch = exp.train.batch_size
  per_device, flops = {}, None
  trains = session.method.epochs(exp) > 0   # else there is no train step
  for n in DEVICE_COUNTS:
    if batch % n or not trains:
      continue          # a global batch that n devices cannot split evenly
    # The real sharded step where this host has n devices, else its equal.
    sharded = 1 < n <= jax.device_count()
    compiled = (_compiled_step(exp, session, batch, n) if sharded
                else _compiled_step(exp, session, batch // n))
    per_device[str(n)] = {"batch": batch // n, "sharded": sharded,
                          **_memory(compiled)}
    if n == 1:
      cost = compiled.cost_analysis()
      flops = float(cost["flops"]) if cost and "flops" in cost else None
  full, backbone = _full_run(exp, session)
  state = _abstract_state(full, session.method, backbone)
  trainable = sum(math.prod(x.shape) * x.dtype.itemsize for x in
                  jax.tree.leaves(jax.eval_shape(session.method.trainable,
                                                 state.arrays)))
  steps = _run_steps(exp, session.data)
  return {
      "steps_per_task": run.train.max_steps_per_task,
      "executed_batch_size": run.train.batch_size,
      "executed_eval_batch_size": run.train.eval_batch_size,
      "executed_image_size": run.model.image_size,
      "tasks": checkpoints,
      "peak_host_memory_bytes": peak_host,
      "step": {"global_batch": batch, "image_size": exp.model.image_size,
               "dtype": exp.model.dtype, "flops": flops,
               "trainable_bytes": int(trainable), "per_device": per_device},
      "run_steps_per_seed": steps, "seeds": len(exp.seeds), "mfu": MFU,
      "projection": _projection(flops, steps, len(exp.seeds), exp.model.dtype,
                                per_device),
  }


def _mib(x) -> str:
  """Bytes in the largest binary unit that keeps a figure of at least 1."""
  if x is None:
    return "n/a"
  for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(x) >= size:
      return f"{x / size:,.1f} {unit}"
  return f"{x} B"


def format_lines(d: dict) -> str:
  """What a dry run prints at its end."""
  st = d["step"]
  lines = [
      f"dry run: {len(d['tasks'])} tasks, {d['steps_per_task']} train steps "
      f"each at batch {d['executed_batch_size']} "
      f"({d['executed_image_size']} px); evaluated "
      + ", ".join(str(t["eval_classes"]) for t in d["tasks"])
      + " seen classes; checkpoint per task "
      + ", ".join(_mib(t["checkpoint_bytes"]) for t in d["tasks"]),
      f"peak host memory {_mib(d['peak_host_memory_bytes'])}",
      f"train step at global batch {st['global_batch']} "
      f"({st['image_size']} px, {st['dtype']}): "
      f"{'n/a' if st['flops'] is None else format(st['flops'] / 1e9, ',.0f')}"
      " GFLOP; XLA memory analysis per device (arguments + outputs - "
      "aliased + temporaries):"]
  for n, m in st["per_device"].items():
    how = "sharded" if m["sharded"] else "alone"
    lines.append(f"  {n} device(s), batch {m['batch']} per device ({how}): "
                 f"{_mib(m['arguments'])}"
                 f" + {_mib(m['outputs'])} - {_mib(m['aliased'])} + "
                 f"{_mib(m['temporaries'])} = {_mib(m['total'])}")
  lines.append(f"projected wall time of {d['run_steps_per_seed']:,} steps "
               f"per seed x {d['seeds']} seed(s) at {d['mfu']:.0%} MFU:")
  for name, p in d["projection"].items():
    hours = ("n/a" if p["hours_per_seed"] is None else
             f"{60 * p['hours_per_seed']:,.1f} min per seed, "
             f"{60 * p['hours_all_seeds']:,.1f} min in all")
    fits = {True: "fits", False: "does NOT fit", None: "memory n/a"}[p["fits"]]
    lines.append(f"  {name} ({p['chips']} x {p['peak_tflops_per_chip']:g} "
                 f"TFLOP/s): {hours}; step {fits} in "
                 f"{_mib(p['memory_per_chip_bytes'])} per chip")
  return "\n".join(lines)
