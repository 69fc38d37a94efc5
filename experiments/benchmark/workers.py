"""Input-pipeline scaling: JPEG train-transform images/s per worker process.

What feeding an accelerator costs in host cores: the runner's train loader
(`slora_jax.runner.data.loader`) over a folder of ImageNet-R-sized JPEGs
(about 500x375), RandomResizedCrop 224 + flip (`transforms.TrainTransform`),
with 1 and 2 grain worker processes (and threads, for reference). A worker
assembles its batches in one thread, so the 1-process rate is the rate of one
busy core; the 1 -> 2 speed-up says whether that rate adds up over cores
(the consumer, this process, copies each batch out of shared memory: about
a tenth of a worker's CPU time per batch, which on a 2-core machine competes
with the two workers, bounding the speed-up near 1.8).
The cores each chip needs are the estimated train step rates
(`flops.accelerator_estimates`) over that per-core rate.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np

from slora_jax.models import vit
from slora_jax.runner.data import loader
from slora_jax.runner.data import sources
from slora_jax.runner.data import transforms

from experiments.benchmark import flops
from experiments.benchmark.pipeline import write_jpeg_folder
from experiments.benchmark.table import Table

SPEEDUP_TARGET = 1.7
# (chips, vCPUs) of one host. v5e: ct5lp-hightpu-8t (cloud.google.com/tpu/
# docs/v5e); H100: DGX H100/H200, 2 x 56-core Xeon 8480C with two threads a
# core; v4: a v4 TPU VM host as commonly reported (not found in the docs).
HOSTS = {"TPU v4": (4, 240), "TPU v5e": (8, 224), "H100 SXM": (8, 224)}
MODELS = ("vit_b16", "vit_s16")


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
  """What the input-pipeline benchmark measures (its command-line flags)."""
  images: int = 256          # JPEGs written (each timed batch draws from them)
  image_size: int = 224
  batch: int = 64
  batches: int = 24          # timed batches per configuration (>= 4)
  threads: int = 4           # the thread backend's decoding threads
  prefetch: int = 1          # batches each worker assembles ahead
  processes: tuple[int, ...] = (1, 2)


def steady_rate(iterator, warmup: int, timed: int, period: int = 1) -> float:
  """Images/s over the second half of ``timed`` batches after ``warmup``.

  Batches the workers buffered while the consumer was still warming up
  arrive at once at the start of the timed ones; by the second half they are
  used up (``timed`` >= 2x what can be buffered) and batches arrive at the
  rate they are made. With k workers they arrive in rounds of k (one batch
  after a wait, the others at once), so the window spans whole rounds
  (``period`` = k). Closes the iterator.
  """
  if timed < 4:
    raise ValueError(f"need at least 4 timed batches, got {timed}")
  stamps, counts = [], []
  with iterator:
    for _ in range(warmup):
      next(iterator)
    for _ in range(timed):
      counts.append(int(next(iterator)["mask"].sum()))
      stamps.append(time.perf_counter())
  intervals = (timed - 1 - timed // 2) // period * period
  if intervals < 1:
    raise ValueError(f"{timed} timed batches are too few for {period} workers")
  start = timed - 1 - intervals
  return sum(counts[start + 1:]) / (stamps[-1] - stamps[start])


def measure(split, s: PipelineSettings, processes: int) -> float:
  """Train-transform images/s with ``processes`` workers (0: threads).

  The untimed warm-up (one batch per worker) covers worker start-up.
  """
  warmup = max(1, processes)
  it = loader.train_batches(
      split, np.arange(len(split)), split.labels, s.batch,
      transforms.TrainTransform(s.image_size), seed=0, task=0,
      num_steps=warmup + s.batches, num_workers=s.threads,
      prefetch=s.prefetch, worker_processes=processes)
  return steady_rate(it, warmup, s.batches, max(1, processes))


def step_rates() -> dict[str, dict[str, float]]:
  """``{model: {chip: estimated train images/s}}`` (docs/benchmark.md)."""
  out = {}
  for name in MODELS:
    cfg = vit.preset(name, image_size=224, patch_size=16)
    out[name] = flops.accelerator_estimates(flops.analytic_flops(
        cfg, flops.ESTIMATE_BATCH, 200, 19, 10, 2 * cfg.depth))
  return out


def core_rows(table: Table, per_core: float) -> None:
  """Rows: host cores that ``per_core`` img/s needs per chip and per host."""
  for model, rates in step_rates().items():
    for chip, ips in rates.items():
      chips, vcpus = HOSTS[chip]
      per_chip = ips / per_core
      table.add(f"cores per {chip} chip, {model} ({ips:,.0f} img/s est.)",
                per_chip, "cores")
      table.check(f"cores per {chip} host ({chips} chips), {model}",
                  chips * per_chip, "cores", f"<= {vcpus} vCPUs",
                  chips * per_chip <= vcpus)


def run(s: PipelineSettings) -> Table:
  """Writes the JPEG folder, measures each configuration; the table."""
  table = Table()
  rates = {}
  with tempfile.TemporaryDirectory() as tmp:
    per_class = max(1, s.images // 8)
    write_jpeg_folder(tmp, classes=8, per_class=per_class, sizes=(450, 550),
                      heights=(330, 420))
    split = sources.ImageFolderSource(tmp).split("train")
    # Processes first: their rows matter most and a quiet start helps.
    for k in s.processes:
      rates[k] = measure(split, s, k)
      table.add(f"JPEG {s.image_size}px train transform, {k} worker "
                f"process{'es' if k > 1 else ''}", rates[k], "img/s")
    threads = measure(split, s, 0)
    table.add(f"JPEG {s.image_size}px train transform, {s.threads} threads "
              "(reference)", threads, "img/s")
  if 1 in rates:
    table.add("per-core rate (1 worker process)", rates[1], "img/s/core")
    if 2 in rates:
      speedup = rates[2] / rates[1]
      table.check("speed-up, 1 -> 2 worker processes", speedup, "x",
                  f">= {SPEEDUP_TARGET}", speedup >= SPEEDUP_TARGET)
    core_rows(table, rates[1])
  return table


def header(s: PipelineSettings) -> str:
  """The machine and the settings, for the printed table."""
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"input pipeline: {s.images} JPEGs ~500x375, batch {s.batch}, "
          f"{s.batches} timed batches, prefetch {s.prefetch} | "
          f"{os.cpu_count()} CPUs, 1-min load at the end {load:.2f} (other "
          "work on the machine invalidates the speed-up)")
