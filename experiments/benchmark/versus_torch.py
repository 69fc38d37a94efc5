"""Ours against the PyTorch port, each side in its own process, alternating.

XLA's and PyTorch's thread pools slow each other down when both live in one
process, so the port (`experiments/torch_reference.py`) runs in a child
process that times one call per request. Every round runs each measured
call once on each side, ours first in even rounds and the port first in odd
ones, with a pause between calls so neither side's spinning threads still
hold the cores when the other starts; ratios are of the medians.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable

import jax

import slora_jax as sl

from experiments.benchmark import flops as flops_lib
from experiments.benchmark import timing
from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table, ratio, within
from experiments.benchmark.workload import SDLoRA, Workload

# Targets of our time / the port's (issue #15): the t=0 step (the moonshot;
# the official code itself took 1.3-1.45x the port's time), the step at 19
# stored directions, and the plain forward.
STEP_T0 = 1.0
STEP_T19 = 0.6
PLAIN_EVAL = 1.0
PAUSE_S = 0.2   # lets the idle side's worker threads stop spinning
# Right after the other process has built its models our first steps run up
# to 1.8x slower for a few calls (measured: 2.22, 1.62, 1.42, then 1.25 s at
# ViT-B/16 batch 4, while back-to-back calls take 1.2-1.25 s); whole
# alternating rounds run untimed first.
WARMUP_ROUNDS = 2
# A call that follows 0.2 s or more without XLA work runs slower: the demo's
# eval forward takes 57-59 ms after a 0.2 s sleep or busy-wait of the calling
# thread, 33-35 ms back to back or after 10 ms (the port: 36 vs 32 ms). A
# training loop runs steps back to back, so each turn first makes an untimed
# call when calls are shorter than WARM_CALL_S (the ~25 ms is < 1% above),
# and times TURN_CALLS calls in a row when shorter than SHORT_CALL_S.
WARM_CALL_S = 3.0
SHORT_CALL_S = 0.3
TURN_CALLS = 3
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class TorchProcess:
  """The port in a child process with its own thread setting."""

  def __init__(self, threads: int):
    env = dict(os.environ, SLORA_JAX_TORCH_THREADS=str(threads))
    self._proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.torch_reference", "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        cwd=_REPO)
    self.info = self.request(op="info")

  def request(self, **req) -> dict:
    self._proc.stdin.write(json.dumps(req) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError("the PyTorch timing process exited (see its stderr)")
    return json.loads(line)

  def load(self, key: str, tasks: int, batch: int, eval_batch: int,
           cfg, num_classes: int, rank: int) -> dict[str, Callable[[], float]]:
    """Builds the port's workload; returns its timed calls."""
    dims = dict(depth=cfg.depth, width=cfg.width, heads=cfg.num_heads,
                mlp=cfg.mlp_dim, image_size=cfg.image_size,
                patch=cfg.patch_size, num_classes=num_classes, rank=rank)
    self.request(op="load", key=key, tasks=tasks, batch=batch,
                 eval_batch=eval_batch, dims=dims)
    return {c: (lambda c=c: self.request(op="time", key=key,
                                         call=c)["seconds"])
            for c in ("step", "eval", "plain")}

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self._proc.stdin.flush()
      self._proc.wait(timeout=60)


@dataclasses.dataclass(frozen=True)
class Case:
  """One compared setting: a name, our workload, the t's and eval batch."""
  name: str
  settings: Settings
  cfg: object
  tasks: tuple[int, ...]          # (0, t_hi) or (0,): t=0 only
  eval_batch: int
  peak_target: bool = True        # the 75%-of-peak target applies (ViT-B)


def _seconds(call) -> float:
  call(True)
  return call.times[-1]


def our_side(case: Case) -> tuple[dict[str, Callable[[], float]], float]:
  """Our timed calls (step at both t's, plain forward, merged forward at
  t_hi), warmed up; and the analytic FLOPs of the t=0 step."""
  w = Workload(case.settings, cfg=case.cfg)
  sd = SDLoRA(w)
  built = sd.stored_states(case.tasks)
  rest = (w.batch_for(0), w.task(0), w.backbone)
  chains = {t: timing.Chain(sd.step, sd.ready(built[t]), rest)
            for t in case.tasks}
  built.clear()
  fwd = jax.jit(lambda p, h, x: sl.apply_head(h, w.apply(p, x)))
  images = w.images(case.eval_batch)
  plain = timing.Call(fwd, w.backbone, w.head0, images)
  calls = {f"step t={t}": (lambda c=chains[t]: _seconds(c))
           for t in case.tasks}
  calls["plain"] = lambda: _seconds(plain)
  t_hi = case.tasks[-1]
  if t_hi:
    merged = jax.jit(sl.merge)(w.backbone,
                               chains[t_hi].state.arrays["adapters"])
    merged_call = timing.Call(fwd, merged, w.head0, images)
    calls[f"eval t={t_hi}"] = lambda: _seconds(merged_call)
  for c in calls.values():      # compile and warm up
    c()
  s = case.settings
  train_flops = flops_lib.analytic_flops(
      w.cfg, s.batch, s.num_classes, 0, s.rank,
      len(sd.template.spec.targets))["train_step"]
  return calls, train_flops


def torch_side(proc: TorchProcess, case: Case) -> dict[str, Callable[[], float]]:
  """The port's calls under our call names (a model per t)."""
  s, t_lo, t_hi = case.settings, case.tasks[0], case.tasks[-1]
  by_t = {t: proc.load(f"{case.name} t={t}", t, s.batch, case.eval_batch,
                       case.cfg, s.num_classes, s.rank)
          for t in case.tasks}
  calls = {f"step t={t}": by_t[t]["step"] for t in case.tasks}
  calls["plain"] = by_t[t_lo]["plain"]
  if t_hi:
    calls[f"eval t={t_hi}"] = by_t[t_hi]["eval"]
  for c in calls.values():      # warm up
    c()
  return calls


def _turn(call, duration: float) -> list[float]:
  """One side's turn at one measurement: short calls get an untimed call
  first and several timed ones (steady state, as in a training loop)."""
  if duration < WARM_CALL_S:
    call()
  return [call() for _ in range(TURN_CALLS if duration < SHORT_CALL_S else 1)]


def alternate(ours: dict, theirs: dict, repeats: int,
              warmup: int = WARMUP_ROUNDS) -> tuple[dict, dict]:
  """Medians over ``repeats`` alternating rounds of the call names, after
  ``warmup`` untimed rounds of one call each."""
  got = {"ours": {k: [] for k in ours}, "torch": {k: [] for k in ours}}
  sides = (("ours", ours), ("torch", theirs))
  last = {k: 0.0 for k in ours}
  for r in range(warmup + repeats):
    for name in ours:
      for side, calls in (sides if r % 2 == 0 else sides[::-1]):
        time.sleep(PAUSE_S)
        if r < warmup:
          last[name] = max(last[name], calls[name]())
        else:
          got[side][name] += _turn(calls[name], last[name])
  med = {side: {k: timing.median(v) for k, v in d.items()}
         for side, d in got.items()}
  return med["ours"], med["torch"]


def case_rows(table: Table, case: Case, ours: dict, theirs: dict,
              train_flops: float, xla_peak: float) -> None:
  """Rows: both sides' medians, the ratios against their targets, and the
  GFLOP/s our t=0 step reaches against 75% of the XLA matmul peak."""
  t_hi = case.tasks[-1]
  for name in ours:
    table.add(f"{case.name}: {name}, ours | PyTorch port",
              f"{ours[name]:.4g} | {theirs[name]:.4g}", "s")
  checks = [("step t=0", STEP_T0), ("plain", PLAIN_EVAL)]
  if t_hi:   # the target is at t=19; another t gets no target
    checks.insert(1, (f"step t={t_hi}", STEP_T19 if t_hi == 19 else None))
  for name, bound in checks:
    r = ratio(ours[name], theirs[name])
    if bound is None:
      table.add(f"{case.name}: {name}, ours / port", r, "x")
    else:
      table.check(f"{case.name}: {name}, ours / port", r, "x", f"<= {bound}",
                  within(r, bound))
  if t_hi:
    r = ratio(ours[f"eval t={t_hi}"], theirs[f"eval t={t_hi}"])
    table.add(f"{case.name}: merged eval t={t_hi}, ours / port eval", r, "x")
  achieved = train_flops / ours["step t=0"] / 1e9
  table.check(f"{case.name}: achieved GFLOP/s, our step t=0 (analytic)",
              achieved, "GFLOP/s", f">= 75% of XLA peak ({0.75 * xla_peak:.0f})",
              achieved >= 0.75 * xla_peak, applicable=case.peak_target)


def compare(table: Table, cases: list[Case], repeats: int,
            xla_peak: float) -> None:
  """Times every case on both sides, alternating, and adds its rows."""
  proc = TorchProcess(threads=os.cpu_count() or 1)
  try:
    table.add("PyTorch port process",
              f"torch {proc.info['version']}, {proc.info['threads']} threads")
    for case in cases:
      ours, train_flops = our_side(case)
      theirs = torch_side(proc, case)
      ours_med, torch_med = alternate(ours, theirs, repeats)
      case_rows(table, case, ours_med, torch_med, train_flops, xla_peak)
      del ours, theirs
      proc.request(op="clear")
  finally:
    proc.close()


def cases(s: Settings) -> list[Case]:
  """The compared settings: --batch, --torch_batch and the demo's size."""
  t_hi = min(19, s.capacity - 1)
  out = [Case(f"{s.model} batch {s.batch}", s, s.vit_config(), (0, t_hi),
              s.batch)]
  if s.torch_batch and s.torch_batch != s.batch:
    b = dataclasses.replace(s, batch=s.torch_batch)
    # The port keeps every earlier task's full-width branch output for its
    # backward: at ViT-B/16 batch 32 its process reached 19.5 GB at t=19
    # (killed on a 24 GB machine) and 13 GB at t=5, which with ours left
    # the machine paging and doubled our step time; so t=0 only there.
    out.append(Case(f"{s.model} batch {b.batch}", b, b.vit_config(), (0,),
                    b.batch))
  if s.torch_demo:
    out.append(demo_case(s))
  return out


def demo_case(s: Settings) -> Case:
  """The demo config's model, batch sizes, rank and task count."""
  # The benchmark otherwise needs no runner config: import it only here.
  from experiments.configs import demo  # pylint: disable=import-outside-toplevel
  from slora_jax.runner import config as config_lib  # pylint: disable=import-outside-toplevel
  exp = config_lib.from_config(demo.get_config())
  cfg = exp.model.vit_config()
  tasks = exp.data.num_tasks
  d = dataclasses.replace(
      s, batch=exp.train.batch_size, num_classes=exp.data.num_classes,
      rank=exp.adapter.rank, sim_tasks=tasks, image_size=cfg.image_size,
      patch_size=cfg.patch_size, tasks=(0, tasks - 1))
  return Case(f"demo ViT {cfg.image_size}px batch {d.batch}", d, cfg,
              (0, tasks - 1), exp.train.eval_batch_size, peak_target=False)
