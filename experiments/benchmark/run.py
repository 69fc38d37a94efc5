"""The benchmark's phases, in order; `run` returns the table and its context.

Phase order matters: the simulated run compiles the train step that every
later phase reuses (the whole benchmark must compile it once), and the timed
states are built before timing so no state building runs between rounds.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax

from slora_jax.runner import platform

from experiments.benchmark import compile_checks
from experiments.benchmark import evaluation
from experiments.benchmark import flops
from experiments.benchmark import pipeline
from experiments.benchmark import profile
from experiments.benchmark import ratios
from experiments.benchmark import timing
from experiments.benchmark import train_steps
from experiments.benchmark import versus_torch
from experiments.benchmark import workload
from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table


def run(s: Settings) -> dict:
  """Measures everything; returns ``{'settings', 'environment', 'rows', 'table'}``."""
  wall0 = time.perf_counter()
  platform.configure()   # before the first computation starts a backend
  table, phases = Table(), timing.Phases()
  env = _environment()
  w = workload.Workload(s)
  peak = _machine_rows(table)
  phases.mark("setup")

  sd = workload.SDLoRA(w)
  sim_compiles = _simulated_run(table, s, sd)
  phases.mark("simulated run")

  built = sd.stored_states(s.tasks)
  phases.mark("build states")

  t_lo, t_hi = s.tasks[0], s.tasks[-1]
  batch = w.batch_for(0)
  rest = (batch, w.task(0), w.backbone)
  # The step's program does not depend on t.
  compile_checks.program_rows(table, sd.step, (sd.ready(built[t_lo]), *rest),
                              (sd.ready(built[t_hi]), *rest), t_lo, t_hi)
  phases.mark("jaxpr")

  times = train_steps.time_steps(sd, built, rest)
  phases.mark("timed steps")
  train_steps.step_rows(table, s, times, sim_compiles, sd.step._cache_size())
  train_steps.inflora_rows(table, s, times)
  compiled = times.chains[t_lo].compiled()
  if s.profile:
    profile.profile_rows(table, times.chains[t_lo], compiled, t_lo, s.profile)
    phases.mark("profile")

  targets = len(sd.template.spec.targets)
  flops.train_step_rows(table, s, w.cfg, targets, compiled,
                        times.lora_chain.compiled(), times.step)
  phases.mark("flops")

  final = {t: times.chains[t].state.arrays for t in (t_lo, t_hi)}
  ev = evaluation.time_eval(w, final, batch["image"], s.repeats)
  evaluation.eval_rows(table, ev, peak["XLA"])
  phases.mark("eval")

  rates = pipeline.pipeline_rows(table, s) if s.pipeline else {}
  phases.mark("pipeline")

  _comparison_rows(table, s, times, ev, rates)
  if s.torch:
    del sd, times, final, built   # free the timed states before new ones
    versus_torch.compare(table, versus_torch.cases(s), max(s.repeats, 5),
                         peak["XLA"])
    phases.mark("torch")
  flops.estimate_rows(table, s, w.cfg, targets)

  env["phases_s"] = phases.seconds
  env["loadavg_end"] = os.getloadavg()[0]
  env["wall_s"] = time.perf_counter() - wall0
  return {"settings": dataclasses.asdict(s), "environment": env,
          "rows": table.to_json(), "table": table}


def _environment() -> dict:
  return {"jax": jax.__version__, "device": str(jax.devices()[0]),
          "cpus": os.cpu_count(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "loadavg_start": os.getloadavg()[0]}


def _machine_rows(table: Table) -> dict[str, float]:
  """Rows: the machine's matmul peaks, and that compilations can be counted."""
  peak = flops.matmul_peak()
  for name, gfs in peak.items():
    table.add(f"matmul peak, {name} (f32 2048^3, best of 5)", gfs, "GFLOP/s")
  ok = compile_checks.counter_self_check()
  table.check("compile counter self-check (2 shapes: 2 compilations)", ok, "",
              "yes", ok)
  return peak


def _simulated_run(table: Table, s: Settings, sd: workload.SDLoRA) -> int:
  """A ``--sim_tasks`` run, one step per task; returns the step's compilations."""
  with compile_checks.CompileCounter() as counter:
    sd.simulate(s.sim_tasks)
  compiles = counter.compiles["step"]
  table.add("train step compile time (trace+lower+compile)",
            counter.seconds["step"], "s")
  table.check(f"train step compilations, simulated {s.sim_tasks}-task run",
              compiles, "", "= 1", compiles == 1)
  # SD-LoRA-RR's smaller ranks keep the pair's shape: no new compilation.
  rr = compile_checks.rank_schedule_compilations(sd)
  table.check("train step compilations added by an SD-LoRA-RR rank schedule "
              "(rank, rank-2, rank-4)", rr, "", "= 0", rr == 0)
  table.add("peak host memory after the simulated run", timing.max_rss_mib(),
            "MiB")
  return compiles


def _comparison_rows(table: Table, s: Settings, times: train_steps.StepTimes,
                     ev: evaluation.EvalTimes, rates: dict[str, float]) -> None:
  """Rows: what the step consumes, memory, and the ratios with targets."""
  t_lo = s.tasks[0]
  consume = s.batch / times.step[t_lo] if times.step[t_lo] else None
  table.add(f"images/s the train step consumes (t={t_lo})", consume, "img/s")
  table.add("peak host memory, whole benchmark", timing.max_rss_mib(), "MiB")
  ratios.ratio_rows(table, s, times, ev, rates, consume)
