"""Speed of the SD-LoRA train step, merged evaluation and the input pipeline.

  python -m experiments.benchmark                    # ViT-B/16, 224 px, batch 4
  python -m experiments.benchmark --model=vit_ti16 --image_size=32 --batch=2 \
      --tasks=0,1,5 --repeats=1                      # smoke run (CI)

Everything is measured in this one process and printed as one table. Times
are medians over ``--repeats`` rounds after one warm-up round; the variants
being compared (every t, plain LoRA; plain and merged evaluation) run
interleaved inside each round, so slow drift of a shared machine cancels out
of their ratios. ``--json_out=PATH`` saves the table. See docs/benchmark.md.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import resource
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

from absl import app
from absl import flags

_MODEL = flags.DEFINE_enum("model", "vit_b16", ["vit_b16", "vit_s16", "vit_ti16"],
                           "ViT size.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side in pixels.")
_PATCH_SIZE = flags.DEFINE_integer("patch_size", 16, "Patch side in pixels.")
_DEPTH = flags.DEFINE_integer("depth", 0, "Transformer blocks; 0: the preset's "
                              "(fewer make a quick smoke run).")
_BATCH = flags.DEFINE_integer("batch", 4, "Train and eval batch size.")
_TASKS = flags.DEFINE_list("tasks", ["0", "1", "5", "10", "19", "49", "99"],
                           "Numbers t of stored earlier directions to time.")
_RANK = flags.DEFINE_integer("rank", 10, "LoRA rank (SD-LoRA and plain LoRA).")
_CAPACITY = flags.DEFINE_integer(
    "capacity", 100, "Stored-direction slots of the timed state (at least "
    "max(--tasks) + 1 and --sim_tasks); fixed, so the step compiles once.")
_RUN_CAPACITY = flags.DEFINE_integer(
    "run_capacity", 20, "Also time t=0 with this capacity (what a run of that "
    "many tasks allocates); 0 skips it.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "ViT compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (median taken).")
_SIM_TASKS = flags.DEFINE_integer("sim_tasks", 20,
                                  "Tasks of the simulated run (one step each).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 200, "Head classes.")
_PIPELINE = flags.DEFINE_bool("pipeline", True, "Measure the input pipeline.")
_PIPELINE_BATCH = flags.DEFINE_integer("pipeline_batch", 32,
                                       "Batch size of the input pipeline.")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 6,
                                         "Timed input-pipeline batches.")
_WORKERS = flags.DEFINE_integer("workers", 4, "Input-pipeline threads.")
_JSON = flags.DEFINE_string("json_out", None, "Also save the table as JSON here.")
_FORM = flags.DEFINE_enum(
    "adapter_form", "activation", ["activation", "weight"],
    "How the SD-LoRA train step applies adapters (slora_jax.runner.steps."
    "make_train_step): on activations (default) or on the kernels.")
_PROFILE = flags.DEFINE_integer(
    "profile", 0, "Also profile the t=min(--tasks) train step (jax.profiler) "
    "and list this many op groups by time (HLO op names, blocks merged).")
_TORCH = flags.DEFINE_bool(
    "torch", False, "Also time the PyTorch reference's arithmetic "
    "(experiments/torch_reference.py) at the same settings, in this process.")

# The PyTorch reference (ViT-B/16, 224 px, batch 4, float32) on this machine.
REFERENCE_SETTING = dict(model="vit_b16", image_size=224, patch_size=16,
                         depth=0, batch=4, dtype="float32")
REFERENCE_STEP_S = {0: 2.34, 5: 2.53, 10: 2.84, 19: 3.28}
REFERENCE_EVAL_S = {0: 1.08, 5: 1.16, 10: 1.25, 19: 1.42}
REFERENCE_PLAIN_EVAL_S = 1.04

# Public dense bf16 peaks per chip, for the accelerator estimates.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5e": 197.0, "H100 SXM": 989.0}
ESTIMATE_MFU = 0.4
ESTIMATE_BATCH = 128

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass
class Settings:
  """What to measure (the command-line flags)."""
  model: str = "vit_b16"
  image_size: int = 224
  patch_size: int = 16
  depth: int = 0
  batch: int = 4
  tasks: tuple[int, ...] = (0, 1, 5, 10, 19, 49, 99)
  rank: int = 10
  capacity: int = 100
  run_capacity: int = 20
  dtype: str = "float32"
  repeats: int = 3
  sim_tasks: int = 20
  num_classes: int = 200
  pipeline: bool = True
  pipeline_batch: int = 32
  pipeline_batches: int = 6
  workers: int = 4
  json: str | None = None
  torch: bool = False
  adapter_form: str = "activation"
  profile: int = 0

  def __post_init__(self):
    self.tasks = tuple(sorted({int(t) for t in self.tasks}))
    if not self.tasks or self.tasks[0] < 0:
      raise ValueError(f"tasks must be non-negative integers, got {self.tasks}")
    need = max(self.tasks[-1] + 1, self.sim_tasks)
    if self.capacity < need:
      raise ValueError(f"capacity {self.capacity} < {need}: it must hold "
                       "max(tasks) + 1 and sim_tasks directions")
    if self.sim_tasks < 1 or self.num_classes < self.sim_tasks:
      raise ValueError("need sim_tasks >= 1 and num_classes >= sim_tasks")
    if self.repeats < 1 or self.batch < 1:
      raise ValueError("repeats and batch must be at least 1")


def settings_from_flags() -> Settings:
  return Settings(
      model=_MODEL.value, image_size=_IMAGE_SIZE.value,
      patch_size=_PATCH_SIZE.value, depth=_DEPTH.value, batch=_BATCH.value,
      tasks=tuple(int(t) for t in _TASKS.value), rank=_RANK.value,
      capacity=_CAPACITY.value, run_capacity=_RUN_CAPACITY.value,
      dtype=_DTYPE.value, repeats=_REPEATS.value, sim_tasks=_SIM_TASKS.value,
      num_classes=_NUM_CLASSES.value, pipeline=_PIPELINE.value,
      pipeline_batch=_PIPELINE_BATCH.value,
      pipeline_batches=_PIPELINE_BATCHES.value, workers=_WORKERS.value,
      json=_JSON.value, torch=_TORCH.value, adapter_form=_FORM.value,
      profile=_PROFILE.value)


# ----------------------------------------------------------------- the table

@dataclasses.dataclass
class Row:
  """One line of the table; ``verdict`` is PASS, FAIL, n/a or '' (no target)."""
  name: str
  value: Any
  unit: str = ""
  target: str = ""
  verdict: str = ""


class Table:
  """Rows in insertion order, addressable by name."""

  def __init__(self):
    self.rows: list[Row] = []

  def add(self, name, value, unit="", target="", verdict=""):
    self.rows.append(Row(name, value, unit, target, verdict))

  def check(self, name, value, unit, target, ok, applicable=True):
    """Adds a row with a target; ``ok`` is a bool or None (not measured)."""
    if not applicable or ok is None:
      verdict = "n/a"
    else:
      verdict = "PASS" if ok else "FAIL"
    self.add(name, value, unit, target, verdict)

  def __getitem__(self, name) -> Row:
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(name)

  def format(self) -> str:
    def fmt(v):
      if v is None:
        return "n/a"
      if isinstance(v, bool):
        return "yes" if v else "no"
      if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
      return str(v)
    cells = [(r.name, fmt(r.value) if r.value is None
              else f"{fmt(r.value)} {r.unit}".strip(), r.target, r.verdict)
             for r in self.rows]
    head = ("metric", "value", "target", "result")
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(4)]
    line = lambda c: "  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule] + [line(c) for c in cells])

  def to_json(self) -> list[dict]:
    return [dataclasses.asdict(r) for r in self.rows]


# --------------------------------------------------------- compile counting

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   _BACKEND_COMPILE)


def _base_name(fun_name: str) -> str:
  # Tracing reports 'step', lowering and compiling 'jit(step)'.
  return fun_name[4:-1] if fun_name.startswith("jit(") else fun_name


class CompileCounter:
  """Counts XLA compilations (and trace+lower+compile seconds) per function.

  Listens to JAX's monitoring events while active (a context manager). A
  function is named by its Python ``__name__``.
  """

  def __init__(self):
    self.compiles: collections.Counter = collections.Counter()
    self.seconds: collections.Counter = collections.Counter()

  def _listen(self, event, duration, **kwargs):
    if event not in _COMPILE_EVENTS:
      return
    name = _base_name(str(kwargs.get("fun_name", "?")))
    self.seconds[name] += duration
    if event == _BACKEND_COMPILE:
      self.compiles[name] += 1

  def __enter__(self):
    import jax.monitoring
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    import jax.monitoring
    jax.monitoring.unregister_event_duration_listener(self._listen)


def counter_self_check() -> bool:
  """True if `CompileCounter` sees exactly the compilations a jit cache makes."""
  import jax
  import numpy as np

  def _counter_probe(x):
    return x * 2 + 1

  f = jax.jit(_counter_probe)
  with CompileCounter() as counter:
    for shape in (3, 3, 4, 3):        # two shapes: two compilations
      jax.block_until_ready(f(np.ones(shape, np.float32)))
  return counter.compiles["_counter_probe"] == 2 and f._cache_size() == 2


# ------------------------------------------------------------ jaxpr checks

def jaxpr_stats(closed_jaxpr) -> tuple[int, set[str]]:
  """(equations including sub-jaxprs, names of primitives used)."""
  import jax.extend.core as jex

  count, prims = 0, set()

  def visit(jaxpr):
    nonlocal count
    for eqn in jaxpr.eqns:
      count += 1
      prims.add(eqn.primitive.name)
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else (p,):
          if isinstance(sub, jex.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jex.Jaxpr):
            visit(sub)

  visit(closed_jaxpr.jaxpr)
  return count, prims


_LOOP_PRIMITIVES = {"while", "scan"}
# Primitives that stop the device to run host code or move data to the host.
_HOST_PRIMITIVES = {"pure_callback", "io_callback", "debug_callback",
                    "callback", "device_put", "debug_print"}


# ------------------------------------------------------ FLOPs and estimates

def analytic_flops(cfg, batch: int, num_classes: int, stored: int,
                   rank: int, num_targets: int) -> dict[str, float]:
  """Matmul FLOPs of one train step at ``stored`` earlier directions, by hand.

  Forward: patch embedding, per block qkv/proj/fc1/fc2 and the two attention
  products, the head; the last block computes qkv for every token but its
  attention row, proj and MLP for the class token only. Backward: input
  gradients of every block (the linear layers once more, the attention
  products twice) and the head's gradients; no kernel gradient
  (`slora_jax.apply_with_adapters`). The current rank-r pair is counted as
  plain LoRA on activations costs it, 12·n·r·d per target and image (forward,
  dx, dA, dB). The stored directions cost, per target and step, 2·t·R·d² to
  merge into the kernel and min(4·N·d·t·R, 2·N·d² + 2·d²·t·R) for the
  magnitudes' gradient (N tokens in the batch), whatever the capacity.
  """
  n, d, m = cfg.seq_len, cfg.width, cfg.mlp_dim
  linear = 2 * n * (3 * d * d + d * d + 2 * d * m)
  attention = 2 * 2 * n * n * d
  # The last block: qkv on n tokens, everything after it on one.
  last_linear = 2 * n * 3 * d * d + 2 * (d * d + 2 * d * m)
  last_attention = 2 * 2 * n * d
  patch = 2 * cfg.num_patches * cfg.patch_size ** 2 * cfg.in_chans * d
  head = 2 * d * num_classes
  lora = num_targets * 12 * n * rank * d
  full = max(cfg.depth - 1, 0)
  last = 1 if cfg.depth else 0
  forward = (patch + full * (linear + attention)
             + last * (last_linear + last_attention) + head)
  backward = (full * (linear + 2 * attention)
              + last * (last_linear + 2 * last_attention) + 2 * head)
  tokens, cols = batch * n, stored * rank
  per_target = 2 * cols * d * d + min(4 * tokens * d * cols,
                                      2 * tokens * d * d + 2 * d * d * cols)
  fixed = num_targets * per_target if stored else 0
  return {"forward_per_image": float(forward),
          "train_per_image": float(forward + backward + lora),
          "delta_per_step": float(fixed),
          "train_step": float(batch * (forward + backward + lora) + fixed)}


def accelerator_estimates(flops: dict[str, float],
                          batch: int = ESTIMATE_BATCH,
                          mfu: float = ESTIMATE_MFU) -> dict[str, float]:
  """Estimated train images/s per chip from FLOPs and public bf16 peaks."""
  per_image = flops["train_per_image"] + flops["delta_per_step"] / batch
  return {chip: mfu * peak * 1e12 / per_image
          for chip, peak in PEAK_TFLOPS.items()}


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends have no cost model
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost["flops"]) if cost and "flops" in cost else None


# ------------------------------------------------------------------ model

def _vit_config(s: Settings):
  import jax.numpy as jnp
  from slora_jax.models import vit
  preset = {"vit_b16": vit.vit_b16, "vit_s16": vit.vit_s16,
            "vit_ti16": vit.vit_ti16}[s.model]
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[s.dtype]
  extra = {"depth": s.depth} if s.depth else {}
  return preset(image_size=s.image_size, patch_size=s.patch_size, dtype=dtype,
                **extra)


def make_plain_lora_step(model, cfg, num_classes: int, momentum: float = 0.9):
  """A plain LoRA train step written without slora_jax's adapter code.

  q and v of every block get ``x·W0 + (x Aᵀ) Bᵀ`` (A ``(r, d)``, B ``(d, r)``)
  on the activations, through Flax method interception; no magnitudes, no
  earlier directions. Loss (cross-entropy over the classes
  ``[lo, hi)``, masked mean over the batch), head and optimiser (SGD,
  momentum 0.9, the rate set at every step) are those of the SD-LoRA step.
  Returns ``(init(rng, rank), jitted step)``.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  d = cfg.width
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0,
                                           momentum=momentum)

  def init(rng, rank):
    keys = jax.random.split(rng, 2 * cfg.depth)
    lora, bound = {}, 1.0 / math.sqrt(d)
    for i in range(cfg.depth):
      lora[f"blocks_{i}"] = {
          part: {"A": jax.random.uniform(keys[2 * i + j], (rank, d),
                                         jnp.float32, -bound, bound),
                 "B": jnp.zeros((d, rank), jnp.float32)}
          for j, part in enumerate(("q", "v"))}
    return lora

  def lora_interceptor(lora):
    # The adapted map as a LoRA user would write it on the activations:
    # y[:, q] += (x Aᵀ) Bᵀ, same for v; the kernels get no gradient.
    def intercept(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      path = context.module.path
      if context.method_name != "__call__" or path[1:] != ("attn", "qkv"):
        return y
      f, x = lora[path[0]], args[0]
      dq = (x @ f["q"]["A"].T) @ f["q"]["B"].T
      dv = (x @ f["v"]["A"].T) @ f["v"]["B"].T
      return jnp.concatenate([y[..., :d] + dq, y[..., d:2 * d],
                              y[..., 2 * d:] + dv], axis=-1)
    return intercept

  def plain_lora_step(lora, head, opt_state, backbone, batch, lo, hi, lr):
    classes = jnp.arange(num_classes)
    keep = (classes >= lo) & (classes < hi)
    mask = batch["mask"].astype(jnp.float32)

    def loss_fn(tree):
      with nn.intercept_methods(lora_interceptor(tree["lora"])):
        feats = model.apply({"params": backbone}, batch["image"])
      logits = feats.astype(jnp.float32) @ tree["head"]["kernel"]
      logits = jnp.where(keep, logits + tree["head"]["bias"],
                         jnp.finfo(jnp.float32).min)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch["label"])
      return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    tree = {"lora": lora, "head": head}
    loss, grads = jax.value_and_grad(loss_fn)(tree)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, opt_state = tx.update(grads, opt_state, tree)
    tree = optax.apply_updates(tree, updates)
    return tree["lora"], tree["head"], opt_state, {"loss": loss}

  return init, tx, jax.jit(plain_lora_step, donate_argnums=(0, 1, 2))


def random_params(cfg, seed: int = 0) -> dict:
  """ViT parameters drawn on the host (no compiled initialiser needed).

  Kernels and embeddings ~ N(0, 0.02²), LayerNorm scales 1, biases 0: the
  scale of a pre-trained ViT, so no denormals or overflow distort timings.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from slora_jax.models import vit
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    if "bias" in name:
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.02, leaf.shape).astype(np.float32))

  return jax.tree_util.tree_map_with_path(draw, vit.abstract_params(cfg))


class TaskOps:
  """Jitted begin_task / end_task, and storing a random direction with them.

  One compilation each serves the simulated run and the state building.
  """

  def __init__(self, rank: int):
    import jax
    import slora_jax as sl
    self.begin = jax.jit(lambda ad, key: sl.begin_task(ad, key, rank))
    self.end = jax.jit(lambda ad: sl.end_task(ad)[0])

    def randomize(adapters, key):
      current = adapters.trainable["current"]
      keys = jax.random.split(key, len(current))
      current = {name: {"A": f["A"],
                        "B": 0.02 * jax.random.normal(k, f["B"].shape)}
                 for k, (name, f) in zip(keys, sorted(current.items()))}
      return adapters.replace(trainable=dict(adapters.trainable,
                                             current=current))
    self.randomize = jax.jit(randomize)

  def store_random(self, adapters, key):
    """Begins a task, draws a random non-zero B, ends it: one more slot used."""
    import jax
    k_begin, k_b = jax.random.split(key)
    return self.end(self.randomize(self.begin(adapters, k_begin), k_b))


def _fresh_copy(tree):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(jnp.copy, tree)


class _Chain:
  """Repeated calls of a donating step on its own state; times each call."""

  def __init__(self, step, state, rest):
    self.step, self.state, self.rest = step, state, rest
    self.times, self.dispatch = [], []

  def __call__(self, record: bool):
    import jax
    t0 = time.perf_counter()
    out = self.step(*self.state, *self.rest)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    self.state = out[:3]
    if record:
      self.dispatch.append(t1 - t0)
      self.times.append(t2 - t0)


def _rounds(calls: dict[Any, Callable[[bool], None]], repeats: int,
            warmup) -> None:
  """Untimed first calls of ``warmup``, then ``repeats`` timed rounds.

  Each round calls every entry once, starting one entry later than the
  previous round, so no entry always runs first (or after the same one).
  """
  for name in warmup:
    calls[name](False)
  names = list(calls)
  for r in range(repeats):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      calls[name](True)


def profile_ops(call: Callable[[], Any], compiled_text: str, repeats: int = 2,
                top: int = 20) -> list[tuple[str, float]]:
  """Milliseconds per call spent in each HLO op group, largest first.

  Runs ``call`` ``repeats`` times under `jax.profiler.trace`, maps each
  XLA:CPU thunk to the ``op_name`` of its instruction in ``compiled_text``
  (the compiled HLO), with ``blocks_<i>`` merged into ``blocks_*`` so a
  group sums over the transformer blocks.
  """
  import gzip
  import re
  import jax

  op_names = {m.group(1): m.group(2) for m in re.finditer(
      r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", compiled_text)}
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(repeats):
        call()
    paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
             if f.endswith(".trace.json.gz")]
    if not paths:
      raise RuntimeError("jax.profiler wrote no perfetto trace")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]
  groups: dict[str, float] = collections.Counter()
  for e in events:
    name = op_names.get(e.get("name")) if e.get("ph") == "X" else None
    if name is None:
      continue
    name = re.sub(r"blocks_\d+", "blocks_*", name.split("/", 1)[-1])
    groups[name] += e["dur"] / 1e3 / repeats
  return sorted(groups.items(), key=lambda kv: -kv[1])[:top]


def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  return None if not n else (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2]))


# --------------------------------------------------------- input pipeline

def pipeline_throughput(make_iterator: Callable[[], Iterator[dict]],
                        num_batches: int, warmup: int = 1) -> float:
  """Images/s delivered by a fresh iterator from ``make_iterator``.

  Batches are dicts with ``image`` and optionally ``mask`` (real rows). The
  first ``warmup`` batches are not timed; ``close()`` is called if present.
  """
  it = make_iterator()
  try:
    for _ in range(warmup):
      next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(num_batches):
      batch = next(it)
      mask = batch.get("mask")
      n += int(mask.sum()) if mask is not None else len(batch["image"])
    return n / (time.perf_counter() - t0)
  finally:
    close = getattr(it, "close", None)
    if close:
      close()


def write_jpeg_folder(root: str, classes: int = 10, per_class: int = 20,
                      sizes=(256, 500), seed: int = 0) -> str:
  """Writes ``root/train/<class>/*.jpg`` photo-like images of random sizes."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  for c in range(classes):
    folder = os.path.join(root, "train", f"class_{c:02d}")
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
      # Smooth colour fields plus mild noise: roughly photo-like entropy.
      coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
      img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC),
                       np.float32)
      img += rng.normal(0, 8, img.shape)
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
          os.path.join(folder, f"img_{i:03d}.jpg"), quality=90)
  return root


def _pipeline_factories(s: Settings, folder_root: str):
  """``{name: (image size, iterator factory)}`` from `slora_jax.runner.data`."""
  import numpy as np
  from slora_jax.runner.data import loader, sources, transforms

  def factory(split, size):
    transform = transforms.TrainTransform(size)
    indices = np.arange(len(split))
    steps = s.pipeline_batches + 1
    return lambda: loader.train_batches(
        split, indices, split.labels, s.pipeline_batch, transform,
        (size, size, 3), seed=0, task=0, start_step=0, num_steps=steps,
        num_workers=s.workers)

  if os.path.isdir(FASHION_MNIST):
    demo, demo_name = sources.IdxSource(FASHION_MNIST), "Fashion-MNIST"
  else:
    demo, demo_name = sources.SyntheticSource(10, 200, 100, 32), "generated"
  folder = sources.ImageFolderSource(folder_root)
  return {f"demo data ({demo_name}, 32 px)": (32, factory(demo.split("train"), 32)),
          f"JPEG folder ({s.image_size} px)":
              (s.image_size, factory(folder.split("train"), s.image_size))}


# -------------------------------------------------------------------- run

def run(s: Settings) -> dict:
  """Measures everything; returns ``{'settings', 'environment', 'rows'}``."""
  wall0 = time.perf_counter()
  from slora_jax.runner import platform
  platform.configure()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import slora_jax as sl
  from slora_jax.runner import steps as steps_lib
  from slora_jax.models import vit

  table = Table()
  phases: dict[str, float] = {}
  mark = [time.perf_counter()]

  def phase(name):
    now = time.perf_counter()
    phases[name] = round(now - mark[0], 2)
    mark[0] = now

  env = {"jax": jax.__version__, "device": str(jax.devices()[0]),
         "cpus": os.cpu_count(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
         "loadavg_start": os.getloadavg()[0]}

  cfg = _vit_config(s)
  model = vit.VisionTransformer(cfg)
  backbone = random_params(cfg)
  apply_fn = lambda params, images: model.apply({"params": params}, images)
  rules = sl.vit_qv_rules(cfg.qkv)
  rng = np.random.default_rng(0)
  classes_per_task = s.num_classes // s.sim_tasks

  def batch_for(task):
    lo = task * classes_per_task
    return {"image": jnp.asarray(rng.uniform(0, 1, (s.batch, s.image_size,
                                                    s.image_size, 3)),
                                 jnp.float32),
            "label": jnp.asarray(rng.integers(lo, lo + classes_per_task,
                                              s.batch), jnp.int32),
            "mask": jnp.ones((s.batch,), jnp.float32)}

  def bounds(task):
    return (np.int32(task * classes_per_task),
            np.int32((task + 1) * classes_per_task))

  lr = np.float32(0.01)
  tx = steps_lib.make_optimizer()
  head0 = sl.init_head(jax.random.key(1), cfg.width, s.num_classes)

  peak = matmul_peak()
  for name, gfs in peak.items():
    table.add(f"matmul peak, {name} (f32 2048^3, best of 5)", gfs, "GFLOP/s")
  ok = counter_self_check()
  table.check("compile counter self-check (2 shapes: 2 compilations)", ok, "",
              "yes", ok)

  phase("setup")

  # -- A simulated run: begin_task / one step / end_task per task.
  step = steps_lib.make_train_step(apply_fn, s.num_classes, tx,
                                  adapter_form=s.adapter_form)
  template = sl.init_adapters(backbone, rules, capacity=s.capacity,
                              max_rank=s.rank)
  ops = TaskOps(s.rank)
  opt_init = jax.jit(tx.init)
  with CompileCounter() as sim_counter:
    # The step donates its inputs: keep the template's buffers out of it.
    adapters = template.replace(frozen=_fresh_copy(template.frozen))
    head = _fresh_copy(head0)
    for task in range(s.sim_tasks):
      adapters = ops.begin(adapters, jax.random.key(100 + task))
      opt_state = opt_init(sl.trainable_params(adapters, head))
      adapters, head, opt_state, _ = step(adapters, head, opt_state, backbone,
                                          batch_for(task), *bounds(task), lr)
      adapters = ops.end(adapters)
    jax.block_until_ready(adapters)
  sim_compiles = sim_counter.compiles["step"]
  table.add("train step compile time (trace+lower+compile)",
            sim_counter.seconds["step"], "s")
  table.check(f"train step compilations, simulated {s.sim_tasks}-task run",
              sim_compiles, "", "= 1", sim_compiles == 1)
  table.add("peak host memory after the simulated run", _max_rss_mib(), "MiB")

  phase("simulated run")

  # -- States with t stored random directions.
  built, state, t_done = {}, template, 0
  for t in s.tasks:
    for i in range(t_done, t):
      state = ops.store_random(state, jax.random.key(10_000 + i))
    t_done, built[t] = t, state
  key = jax.random.key(7)

  def ready_state(t, capacity_template=None):
    ad = ops.begin(built[t] if capacity_template is None
                   else capacity_template, key)
    ad = ad.replace(frozen=_fresh_copy(ad.frozen))
    head = _fresh_copy(head0)
    return ad, head, opt_init(sl.trainable_params(ad, head))

  phase("build states")

  # -- The step's program does not depend on t.
  t_lo, t_hi = s.tasks[0], s.tasks[-1]
  batch, (lo, hi) = batch_for(0), bounds(0)
  stats = {}
  for t in (t_lo, t_hi):
    stats[t] = jaxpr_stats(jax.make_jaxpr(step)(*ready_state(t), backbone,
                                                batch, lo, hi, lr))
  n_lo, n_hi = stats[t_lo][0], stats[t_hi][0]
  table.add(f"train step jaxpr equations, t={t_lo}", n_lo)
  table.check(f"train step jaxpr equations, t={t_hi}", n_hi, "",
              f"= t={t_lo}", n_lo == n_hi)
  prims = stats[t_lo][1] | stats[t_hi][1]
  host = sorted(prims & _HOST_PRIMITIVES)
  table.check("host callbacks or transfers in the train step",
              ",".join(host) or "none", "", "none", not host)
  # The stored directions are visited by on-device loops whose trip counts
  # are the stored count (an array), not by Python loops over tasks.
  table.add("on-device loop primitives in the train step",
            ",".join(sorted(prims & _LOOP_PRIMITIVES)) or "none")

  phase("jaxpr")

  # -- Timed: the step at every t, plain LoRA, the run-capacity step.
  chains = {t: _Chain(step, ready_state(t), (backbone, batch, lo, hi, lr))
            for t in s.tasks}
  probe = jax.tree.leaves(chains[t_lo].state[0].trainable)[0]
  lora_init, lora_tx, lora_step = make_plain_lora_step(model, cfg,
                                                       s.num_classes)
  lora = lora_init(jax.random.key(3), s.rank)
  lora_head = _fresh_copy(head0)
  lora_state = (lora, lora_head, lora_tx.init({"lora": lora, "head": lora_head}))
  calls: dict[Any, Callable] = dict(chains)
  calls["lora"] = _Chain(lora_step, lora_state, (backbone, batch, lo, hi, lr))
  run_step = None
  if s.run_capacity:
    run_step = steps_lib.make_train_step(apply_fn, s.num_classes, tx,
                                         adapter_form=s.adapter_form)
    small = sl.init_adapters(backbone, rules, capacity=s.run_capacity,
                             max_rank=s.rank)
    calls["run"] = _Chain(run_step, ready_state(0, small),
                          (backbone, batch, lo, hi, lr))
  built.clear()  # the chains hold copies
  with CompileCounter() as timed_counter:
    # The SD-LoRA step is warm from the simulated run; the others compile now.
    _rounds(calls, s.repeats, warmup=[k for k in ("lora", "run") if k in calls])
  phase("timed steps")
  donated = probe.is_deleted()
  step_s = {t: _median(chains[t].times) for t in s.tasks}
  for t in s.tasks:
    table.add(f"train step, t={t} (capacity {s.capacity})", step_s[t], "s")
  lora_s = _median(calls["lora"].times)
  table.add(f"plain LoRA train step (rank {s.rank})", lora_s, "s")
  run_s = _median(calls["run"].times) if run_step else None
  if run_step:
    table.add(f"train step, t=0 (capacity {s.run_capacity})", run_s, "s")
  dispatch = _median([x for t in s.tasks for x in chains[t].dispatch])
  table.add("host time to dispatch a train step", dispatch * 1e3, "ms")
  table.check("train step inputs donated", donated, "", "yes", donated)
  whole = sim_compiles + timed_counter.compiles["step"] - (1 if run_step else 0)
  table.check("train step compilations, whole benchmark (t sweep + run)",
              whole, "", "= 1", whole == 1 and step._cache_size() == 1)
  # The step is already compiled, so this hits the cache.
  compiled = step.lower(*chains[t_lo].state, *chains[t_lo].rest).compile()
  if s.profile:
    ops = profile_ops(lambda: chains[t_lo](False), compiled.as_text(),
                      top=s.profile)
    for name, ms in ops:
      table.add(f"profile t={t_lo}: {name}", ms, "ms")
    phase("profile")

  # -- FLOPs.
  flops = _xla_flops(compiled)
  lora_flops = _xla_flops(lora_step.lower(*calls["lora"].state, backbone,
                                          batch, lo, hi, lr).compile())
  targets = len(template.spec.targets)
  hand = analytic_flops(cfg, s.batch, s.num_classes, t_lo, s.rank, targets)
  hand_hi = analytic_flops(cfg, s.batch, s.num_classes, t_hi, s.rank, targets)
  # XLA's static count visits each loop body and both branches of a cond
  # once, whatever the trip counts: an upper bound here, not the t=0 cost.
  table.add("FLOPs per train step (XLA cost analysis, loop bodies once)",
            _g(flops), "GFLOP")
  table.add(f"FLOPs per train step t={t_lo} (analytic)", _g(hand["train_step"]),
            "GFLOP")
  table.add(f"FLOPs per train step t={t_hi} (analytic)",
            _g(hand_hi["train_step"]), "GFLOP")
  table.add("FLOPs per plain LoRA step (XLA cost analysis)", _g(lora_flops),
            "GFLOP")
  for t, h in ((t_lo, hand), (t_hi, hand_hi)):
    if step_s[t]:
      table.add(f"achieved, train step t={t} (analytic FLOPs)",
                h["train_step"] / step_s[t] / 1e9, "GFLOP/s")

  phase("flops")

  # -- Evaluation: plain ViT vs merged parameters (same weights otherwise).
  def eval_forward(params, head, images):
    feats = model.apply({"params": params}, images).astype(jnp.float32)
    return feats @ head["kernel"] + head["bias"]
  eval_fwd = jax.jit(eval_forward)
  merge = jax.jit(sl.merge)
  final = {t: chains[t].state for t in (t_lo, t_hi)}
  merged = {t: merge(backbone, final[t][0]) for t in (t_lo, t_hi)}
  merge_times = []
  for _ in range(s.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(merge(backbone, final[t_hi][0]))
    merge_times.append(time.perf_counter() - t0)
  images = batch["image"]
  eval_times = collections.defaultdict(list)

  def timed_eval(name, params, head):
    def call(record):
      t0 = time.perf_counter()
      jax.block_until_ready(eval_fwd(params, head, images))
      if record:
        eval_times[name].append(time.perf_counter() - t0)
    return call

  # The three forwards run one executable on different values, so any
  # difference is noise: a forward costs a third of a step, and twice the
  # step's rounds (at least 5) keep a 2% target above the machine's jitter.
  _rounds({"plain": timed_eval("plain", backbone, final[t_lo][1]),
           **{t: timed_eval(t, merged[t], final[t][1]) for t in merged}},
          max(2 * s.repeats, 5), warmup=["plain"])
  plain_eval = _median(eval_times["plain"])
  merged_eval = {t: _median(eval_times[t]) for t in merged}
  # Zero overhead by construction: merged parameters are ordinary arrays of
  # the backbone's shapes, so the plain and merged forwards are one program.
  # Time differences between them come from the values (e.g. softmax
  # underflow with larger q/v weights), not from the adapters.
  table.check("plain and merged eval forwards: one compiled program",
              eval_fwd._cache_size(), "", "= 1", eval_fwd._cache_size() == 1)
  eval_flops = _xla_flops(eval_fwd.lower(backbone, final[t_lo][1],
                                          images).compile())
  table.add("FLOPs per eval forward (XLA cost analysis)", _g(eval_flops),
            "GFLOP")
  table.add("eval forward, plain ViT", plain_eval, "s")
  if eval_flops and plain_eval:
    table.add("achieved, eval forward", eval_flops / plain_eval / 1e9,
              "GFLOP/s", f"<= matmul peak {peak['XLA']:.0f}")
  for t in merged:
    table.add(f"eval forward, merged parameters t={t}", merged_eval[t], "s")
  table.add("merge (once per task)", _median(merge_times), "s")
  del merged

  phase("eval")

  # -- Input pipeline.
  pipeline = {}
  if s.pipeline:
    with tempfile.TemporaryDirectory() as tmp:
      write_jpeg_folder(tmp)
      for name, (size, make) in _pipeline_factories(s, tmp).items():
        pipeline[name] = pipeline_throughput(make, s.pipeline_batches)
        table.add(f"input pipeline, {name}", pipeline[name], "img/s")
  phase("pipeline")
  consume = s.batch / step_s[t_lo] if step_s[t_lo] else None
  table.add(f"images/s the train step consumes (t={t_lo})", consume, "img/s")

  table.add("peak host memory, whole benchmark", _max_rss_mib(), "MiB")

  # -- Ratios against their targets.
  def ratio(a, b):
    return a / b if a is not None and b else None

  for t, bound in ((19, 1.05), (99, 1.15)):
    r = ratio(step_s.get(t), step_s.get(0))
    table.check(f"step(t={t}) / step(t=0)", r, "", f"<= {bound}",
                None if r is None else r <= bound)
  r = ratio(step_s.get(0), lora_s)
  table.check(f"step(t=0) / plain LoRA step (capacity {s.capacity})", r, "",
              "<= 1.05", None if r is None else r <= 1.05)
  if run_step:
    r = ratio(run_s, lora_s)
    table.check(f"step(t=0) / plain LoRA step (capacity {s.run_capacity})",
                r, "", "<= 1.05", None if r is None else r <= 1.05)
  r = ratio(merged_eval[t_hi], plain_eval)
  table.check(f"merged eval (t={t_hi}) / plain ViT eval", r, "", "<= 1.02",
              None if r is None else r <= 1.02)
  folder = next((v for k, v in pipeline.items() if k.startswith("JPEG")), None)
  r = ratio(folder, consume)
  table.check("JPEG pipeline / train step images/s", r, "",
              ">= 3 (at vit_s16)", None if r is None else r >= 3,
              applicable=s.model == "vit_s16")
  is_ref = all(getattr(s, k) == v for k, v in REFERENCE_SETTING.items())
  for t, factor in ((19, 0.8), (0, 1.0)):
    ours, theirs = step_s.get(t), REFERENCE_STEP_S[t]
    table.check(f"step(t={t}) vs PyTorch reference ({theirs} s)",
                ratio(ours, theirs) if is_ref else None, "x",
                f"<= {factor} ({factor * theirs:.3g} s)",
                None if ours is None else ours <= factor * theirs,
                applicable=is_ref)
  for t in merged_eval:
    if t in REFERENCE_EVAL_S:
      table.add(f"merged eval(t={t}) vs PyTorch eval ({REFERENCE_EVAL_S[t]} s)",
                ratio(merged_eval[t], REFERENCE_EVAL_S[t]) if is_ref else None,
                "x")

  if s.torch:
    _torch_rows(table, s, cfg, step_s, merged_eval, plain_eval, ratio)
    phase("torch")

  # A reference time is only comparable if this machine could run it at all.
  implied = (eval_flops / REFERENCE_PLAIN_EVAL_S / 1e9
             if is_ref and eval_flops else None)
  best = max(peak.values())
  table.check(f"GFLOP/s the reference plain eval ({REFERENCE_PLAIN_EVAL_S} s) "
              "implies", implied, "GFLOP/s",
              f"<= 1.1 x matmul peak ({1.1 * best:.0f})",
              None if implied is None else implied <= 1.1 * best,
              applicable=is_ref)

  # -- Estimates for accelerators (not measured).
  est = accelerator_estimates(analytic_flops(cfg, ESTIMATE_BATCH,
                                            s.num_classes, 19, s.rank, targets))
  for chip, ips in est.items():
    table.add(f"estimate: train images/s per {chip}", ips, "img/s",
              f"{ESTIMATE_MFU:.0%} of bf16 peak, batch {ESTIMATE_BATCH}, t=19")

  env["phases_s"] = phases
  env["loadavg_end"] = os.getloadavg()[0]
  env["wall_s"] = time.perf_counter() - wall0
  return {"settings": dataclasses.asdict(s), "environment": env,
          "rows": table.to_json(), "table": table}


def _torch_rows(table, s, cfg, step_s, merged_eval, plain_eval, ratio):
  """Times the reference's arithmetic in PyTorch and compares, same process."""
  from experiments import torch_reference  # pylint: disable=import-outside-toplevel
  tasks = tuple(t for t in (0, 19) if t in step_s)
  ref = torch_reference.time_reference(
      tasks=tasks, batch=s.batch, repeats=s.repeats, depth=cfg.depth,
      width=cfg.width, heads=cfg.num_heads, mlp=cfg.mlp_dim,
      image_size=cfg.image_size, patch=cfg.patch_size,
      num_classes=s.num_classes, rank=s.rank)
  table.add(f"PyTorch {ref['version']} ({ref['threads']} threads): plain eval",
            ref["plain_eval"], "s")
  for t in tasks:
    table.add(f"PyTorch reference port: train step t={t}", ref["step"][t], "s")
    table.add(f"PyTorch reference port: eval forward t={t}", ref["eval"][t], "s")
  for t, factor in ((19, 0.8), (0, 1.0)):
    if t in tasks:
      r = ratio(step_s[t], ref["step"][t])
      table.check(f"step(t={t}) / PyTorch port step(t={t}), measured", r, "x",
                  f"<= {factor}", None if r is None else r <= factor)
  r = ratio(plain_eval, ref["plain_eval"])
  table.add("plain eval / PyTorch plain eval, measured", r, "x")
  t_hi = max(merged_eval)
  if t_hi in ref["eval"]:
    table.add(f"merged eval(t={t_hi}) / PyTorch port eval(t={t_hi}), measured",
              ratio(merged_eval[t_hi], ref["eval"][t_hi]), "x")


def _max_rss_mib() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """GFLOP/s of an f32 n³ matmul in XLA, numpy and (if installed) torch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  out = {}
  f = jax.jit(lambda x: x @ x)
  x = jnp.asarray(a)
  calls = [("XLA", lambda: jax.block_until_ready(f(x))), ("numpy", lambda: a @ a)]
  try:  # PyTorch's BLAS (MKL on x86) sets what the reference can reach here.
    import torch  # pylint: disable=import-outside-toplevel
    ta = torch.from_numpy(a)
    calls.append(("torch", lambda: torch.mm(ta, ta)))
  except ImportError:
    pass
  for name, call in calls:
    call()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      call()
      best = min(best, time.perf_counter() - t0)
    out[name] = 2 * n ** 3 / best / 1e9
  return out


def _g(x):
  return None if x is None else x / 1e9


def report(result: dict) -> str:
  """The printed form: a header line and the table."""
  s, env = result["settings"], result["environment"]
  depth = f" depth {s['depth']}" if s["depth"] else ""
  head = (f"SD-LoRA speed: {s['model']}{depth} {s['image_size']}px batch {s['batch']} "
          f"rank {s['rank']} {s['dtype']} | jax {env['jax']} on "
          f"{env['device']}, {env['cpus']} CPUs, load "
          f"{env['loadavg_start']:.2f}->{env['loadavg_end']:.2f} | "
          f"{s['repeats']} rounds, median | {env['wall_s']:.0f} s\n"
          f"XLA_FLAGS={env['XLA_FLAGS']!r}\nphases (s): " +
          ", ".join(f"{k} {v:.1f}" for k, v in env["phases_s"].items()))
  return head + "\n" + result["table"].format()


def save_json(result: dict, path: str) -> None:
  out = {k: v for k, v in result.items() if k != "table"}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1, default=str)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  settings = settings_from_flags()
  result = run(settings)
  print(report(result), flush=True)
  if settings.json:
    save_json(result, settings.json)


if __name__ == "__main__":
  app.run(main)
