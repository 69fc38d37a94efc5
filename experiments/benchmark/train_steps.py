"""The timed train steps: SD-LoRA at every t, plain LoRA, the run's capacity."""

from __future__ import annotations

import dataclasses

import jax

from experiments.benchmark import baselines
from experiments.benchmark import timing
from experiments.benchmark.compile_checks import CompileCounter
from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table
from experiments.benchmark.workload import SDLoRA, fresh_copy


@dataclasses.dataclass
class StepTimes:
  """Median seconds per step, and the chains that were timed."""
  step: dict[int, float | None]        # SD-LoRA step at capacity, by t
  lora: float | None                   # plain LoRA step
  run: float | None                    # SD-LoRA t=0 at --run_capacity
  dispatch: float | None               # host seconds to dispatch a step
  chains: dict[int, timing.Chain]      # SD-LoRA chains, by t
  lora_chain: timing.Chain
  donated: bool                        # the step deleted its input buffers
  step_compiles: int                   # new compilations of 'step' while timed


def _calls(sd: SDLoRA, built: dict, rest: tuple) -> dict:
  """A chain per t, then 'lora' and (with --run_capacity) 'run'."""
  w, s = sd.w, sd.w.settings
  calls = {t: timing.Chain(sd.step, sd.ready(built[t]), rest) for t in s.tasks}
  lora_init, lora_tx, lora_step = baselines.make_plain_lora_step(
      w.model, w.cfg, s.num_classes)
  lora = lora_init(jax.random.key(3), s.rank)
  lora_head = fresh_copy(w.head0)
  lora_state = (lora, lora_head,
                lora_tx.init({"lora": lora, "head": lora_head}))
  calls["lora"] = timing.Chain(lora_step, lora_state, rest)
  if s.run_capacity:
    small = w.init_adapters(s.run_capacity)
    calls["run"] = timing.Chain(w.make_step(), sd.ready(small), rest)
  return calls


def time_steps(sd: SDLoRA, built: dict, rest: tuple) -> StepTimes:
  """Times every step in interleaved rounds; empties ``built`` (the chains
  hold their own copies, and the states would otherwise stay in memory)."""
  s = sd.w.settings
  calls = _calls(sd, built, rest)
  built.clear()
  chains = {t: calls[t] for t in s.tasks}
  probe = jax.tree.leaves(chains[s.tasks[0]].state[0].trainable)[0]
  with CompileCounter() as counter:
    # The SD-LoRA step is warm from the simulated run; the others compile now.
    timing.rounds(calls, s.repeats,
                  warmup=[k for k in ("lora", "run") if k in calls])
  run = calls.get("run")
  return StepTimes(
      step={t: timing.median(chains[t].times) for t in s.tasks},
      lora=timing.median(calls["lora"].times),
      run=timing.median(run.times) if run is not None else None,
      dispatch=timing.median([x for c in chains.values() for x in c.dispatch]),
      chains=chains, lora_chain=calls["lora"], donated=probe.is_deleted(),
      # 'run' is a second jit of the same function, also named 'step': its
      # first compilation is expected, not a recompile of the timed step.
      step_compiles=counter.compiles["step"] - (1 if run is not None else 0))


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
