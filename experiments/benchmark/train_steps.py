"""The timed train steps: SD-LoRA at every t, plain LoRA, the run's capacity,
InfLoRA after the smallest and largest t."""

from __future__ import annotations

import dataclasses

import jax

from experiments.benchmark import baselines
from experiments.benchmark import flops
from experiments.benchmark import timing
from experiments.benchmark.compile_checks import CompileCounter
from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table, ratio
from experiments.benchmark.workload import InfLoRA, SDLoRA, fresh_copy


@dataclasses.dataclass
class StepTimes:
  """Median seconds per step, and the chains that were timed."""
  step: dict[int, float | None]        # SD-LoRA step at capacity, by t
  lora: float | None                   # plain LoRA step
  run: float | None                    # SD-LoRA t=0 at --run_capacity
  inflora: dict[int, float | None]     # InfLoRA step after t tasks
  dispatch: float | None               # host seconds to dispatch a step
  chains: dict[int, timing.Chain]      # SD-LoRA chains, by t
  lora_chain: timing.Chain
  inflora_chain: timing.Chain          # InfLoRA after the smallest t
  inflora_programs: int                # compilations of InfLoRA's step
  donated: bool                        # the step deleted its input buffers
  step_compiles: int                   # new compilations of 'step' while timed


def inflora_tasks(s: Settings) -> tuple[int, ...]:
  """The t's InfLoRA is timed at: the smallest and the largest of --tasks."""
  return tuple(sorted({s.tasks[0], s.tasks[-1]}))


def _calls(sd: SDLoRA, inf: InfLoRA, built: dict, rest: tuple) -> dict:
  """A chain per t, then 'lora', ('inflora', t) and (with --run_capacity)
  'run'."""
  w, s = sd.w, sd.w.settings
  calls = {t: timing.Chain(sd.step, sd.ready(built[t]), rest) for t in s.tasks}
  lora_init, lora_step = baselines.make_plain_lora_step(
      w.model, w.cfg, s.num_classes)
  calls["lora"] = timing.Chain(
      lora_step, lora_init(jax.random.key(3), s.rank, fresh_copy(w.head0)),
      rest)
  merged = inf.merged_states(inflora_tasks(s))
  for t, state in merged.items():
    calls[("inflora", t)] = timing.Chain(inf.step, inf.ready(state), rest)
  merged.clear()
  if s.run_capacity:
    small = w.init_adapters(s.run_capacity)
    calls["run"] = timing.Chain(w.make_step(), sd.ready(small), rest)
  return calls


def time_steps(sd: SDLoRA, built: dict, rest: tuple) -> StepTimes:
  """Times every step in interleaved rounds; empties ``built`` (the chains
  hold their own copies, and the states would otherwise stay in memory)."""
  s = sd.w.settings
  inf = InfLoRA(sd.w)
  calls = _calls(sd, inf, built, rest)
  built.clear()
  chains = {t: calls[t] for t in s.tasks}
  probe = jax.tree.leaves(
      chains[s.tasks[0]].state.arrays["adapters"].trainable)[0]
  # The SD-LoRA step is warm from the simulated run; the others (InfLoRA's
  # and the run-capacity step are also jits named 'step') compile first, so
  # the counter sees only what the timed rounds compile.
  for name in calls:
    if name not in chains:
      calls[name](False)
  with CompileCounter() as counter:
    timing.rounds(calls, s.repeats, warmup=[])
  run = calls.get("run")
  inflora = {t: calls[("inflora", t)] for t in inflora_tasks(s)}
  return StepTimes(
      step={t: timing.median(chains[t].times) for t in s.tasks},
      lora=timing.median(calls["lora"].times),
      run=timing.median(run.times) if run is not None else None,
      inflora={t: timing.median(c.times) for t, c in inflora.items()},
      dispatch=timing.median([x for c in chains.values() for x in c.dispatch]),
      chains=chains, lora_chain=calls["lora"],
      inflora_chain=inflora[s.tasks[0]],
      inflora_programs=inf.step._cache_size(), donated=probe.is_deleted(),
      step_compiles=counter.compiles["step"])


def step_rows(table: Table, s: Settings, times: StepTimes, sim_compiles: int,
              step_cache_size: int) -> None:
  """Rows: step times, dispatch, donation, compilations over the benchmark."""
  for t in s.tasks:
    table.add(f"train step, t={t} (capacity {s.capacity})", times.step[t], "s")
  table.add(f"plain LoRA train step (rank {s.rank})", times.lora, "s")
  if s.run_capacity:
    table.add(f"train step, t=0 (capacity {s.run_capacity})", times.run, "s")
  table.add("host time to dispatch a train step", times.dispatch * 1e3, "ms")
  table.check("train step inputs donated", times.donated, "", "yes",
              times.donated)
  whole = sim_compiles + times.step_compiles
  table.check("train step compilations, whole benchmark (t sweep + run)",
              whole, "", "= 1", whole == 1 and step_cache_size == 1)


def inflora_rows(table: Table, s: Settings, times: StepTimes) -> None:
  """Rows: InfLoRA's step after t tasks, and its time over SD-LoRA's at the
  same t (same model, batch and rank; no target: a comparison of methods)."""
  ts = inflora_tasks(s)
  table.add("FLOPs per InfLoRA train step (XLA cost analysis)",
            flops.gflop(flops.xla_flops(times.inflora_chain.compiled())),
            "GFLOP")
  for t in ts:
    table.add(f"InfLoRA train step, t={t} (rank {s.rank})", times.inflora[t],
              "s")
  table.check(f"InfLoRA train step compilations, t={ts[0]} and t={ts[-1]}",
              times.inflora_programs, "", "= 1", times.inflora_programs == 1)
  for t in ts:
    table.add(f"InfLoRA step / SD-LoRA step (t={t})",
              ratio(times.inflora[t], times.step[t]), "x")
