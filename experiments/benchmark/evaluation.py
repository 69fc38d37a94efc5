"""Evaluation: the plain ViT forward against the forward on merged parameters."""

from __future__ import annotations

import dataclasses

import jax

import slora_jax as sl

from experiments.benchmark import flops as flops_lib
from experiments.benchmark import timing
from experiments.benchmark.table import Table
from experiments.benchmark.workload import Workload


@dataclasses.dataclass
class EvalTimes:
  """Median seconds of the forwards and of a merge, and the forward's program."""
  plain: float | None                  # s per plain forward
  merged: dict[int, float | None]      # s per merged forward, by t
  merge: float | None                  # s per merge
  flops: float | None                  # XLA's FLOPs of one forward
  programs: int                        # compilations of the forward


def time_eval(w: Workload, final: dict[int, dict], images,
              repeats: int) -> EvalTimes:
  """Times merging and the forwards; ``final`` maps t to a trained state's
  arrays (``adapters``, ``head``)."""
  def eval_forward(params, head, x):
    return sl.apply_head(head, w.apply(params, x))

  eval_fwd = jax.jit(eval_forward)
  merge = jax.jit(sl.merge)
  t_lo, t_hi = min(final), max(final)
  merged = {t: merge(w.backbone, final[t]["adapters"]) for t in final}
  merge_call = timing.Call(merge, w.backbone, final[t_hi]["adapters"])
  for _ in range(repeats):
    merge_call(True)
  calls = {"plain": timing.Call(eval_fwd, w.backbone, final[t_lo]["head"],
                                images),
           **{t: timing.Call(eval_fwd, merged[t], final[t]["head"], images)
              for t in merged}}
  # The forwards run one executable on different values, so any difference
  # is noise: a forward costs a third of a step, and twice the step's rounds
  # (at least 5) keep a 2% target above the machine's jitter.
  timing.rounds(calls, max(2 * repeats, 5), warmup=["plain"])
  programs = eval_fwd._cache_size()
  flops = flops_lib.xla_flops(eval_fwd.lower(
      w.backbone, final[t_lo]["head"], images).compile())
  return EvalTimes(plain=timing.median(calls["plain"].times),
                   merged={t: timing.median(calls[t].times) for t in merged},
                   merge=timing.median(merge_call.times), flops=flops,
                   programs=programs)


def eval_rows(table: Table, ev: EvalTimes, matmul_peak_xla: float) -> None:
  """Rows: one program for plain and merged forwards, their times and FLOPs."""
  # Zero overhead by construction: merged parameters are ordinary arrays of
  # the backbone's shapes, so the plain and merged forwards are one program.
  # Time differences between them come from the values (e.g. softmax
  # underflow with larger q/v weights), not from the adapters.
  table.check("plain and merged eval forwards: one compiled program",
              ev.programs, "", "= 1", ev.programs == 1)
  table.add("FLOPs per eval forward (XLA cost analysis)",
            flops_lib.gflop(ev.flops), "GFLOP")
  table.add("eval forward, plain ViT", ev.plain, "s")
  if ev.flops and ev.plain:
    table.add("achieved, eval forward", ev.flops / ev.plain / 1e9,
              "GFLOP/s", f"<= matmul peak {matmul_peak_xla:.0f}")
  for t, seconds in ev.merged.items():
    table.add(f"eval forward, merged parameters t={t}", seconds, "s")
  table.add("merge (once per task)", ev.merge, "s")
