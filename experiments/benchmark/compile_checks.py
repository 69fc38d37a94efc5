"""Facts about the compiled train step: compilations, program size, primitives."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import jax.extend.core as jex
import jax.monitoring
import numpy as np

from experiments.benchmark.table import Table

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   _BACKEND_COMPILE)

LOOP_PRIMITIVES = {"while", "scan"}
# Primitives that stop the device to run host code or move data to the host.
HOST_PRIMITIVES = {"pure_callback", "io_callback", "debug_callback",
                   "callback", "device_put", "debug_print"}


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
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def counter_self_check() -> bool:
  """True if `CompileCounter` sees exactly the compilations a jit cache makes."""

  def _counter_probe(x):
    return x * 2 + 1

  f = jax.jit(_counter_probe)
  with CompileCounter() as counter:
    for shape in (3, 3, 4, 3):        # two shapes: two compilations
      jax.block_until_ready(f(np.ones(shape, np.float32)))
  return counter.compiles["_counter_probe"] == 2 and f._cache_size() == 2


def jaxpr_stats(closed_jaxpr) -> tuple[int, set[str]]:
  """(equations including sub-jaxprs, names of primitives used)."""
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


def program_rows(table: Table, step, args_lo: tuple, args_hi: tuple,
                 t_lo: int, t_hi: int) -> None:
  """Rows: the step's program is the same at t_lo and t_hi, and host-free."""
  (n_lo, prims_lo), (n_hi, prims_hi) = (
      jaxpr_stats(jax.make_jaxpr(step)(*args)) for args in (args_lo, args_hi))
  table.add(f"train step jaxpr equations, t={t_lo}", n_lo)
  table.check(f"train step jaxpr equations, t={t_hi}", n_hi, "",
              f"= t={t_lo}", n_lo == n_hi)
  prims = prims_lo | prims_hi
  host = sorted(prims & HOST_PRIMITIVES)
  table.check("host callbacks or transfers in the train step",
              ",".join(host) or "none", "", "none", not host)
  # The stored directions are visited by on-device loops whose trip counts
  # are the stored count (an array), not by Python loops over tasks.
  table.add("on-device loop primitives in the train step",
            ",".join(sorted(prims & LOOP_PRIMITIVES)) or "none")


def rank_schedule_compilations(sd, ranks: tuple[int, ...] | None = None) -> int:
  """Compilations of ``sd``'s train step over one task per rank of ``ranks``
  (default: an SD-LoRA-RR schedule from the settings' rank down by 2s, e.g.
  10 → 8 → 6), one step each, begun by `slora_jax.begin_task` at that rank.

  A rank change keeps the current pair's shape (``max_rank`` wide, zero past
  the rank), so this is 1.
  """
  import slora_jax as sl  # pylint: disable=import-outside-toplevel
  w = sd.w
  top = w.settings.rank
  ranks = ranks or tuple(r for r in (top, top - 2, top - 4) if r >= 1)
  adapters = sd.template.replace(frozen=jax.tree.map(jnp.copy,
                                                     sd.template.frozen))
  head = jax.tree.map(jnp.copy, w.head0)
  with CompileCounter() as counter:
    for task, rank in enumerate(ranks):
      adapters = sl.begin_task(adapters, jax.random.key(200 + task), rank)
      state, _ = sd.step(sd.train_state(adapters, head), w.batch_for(task),
                         w.task(task), w.backbone)
      adapters, _ = sl.end_task(state.arrays["adapters"])
      head = state.arrays["head"]
    jax.block_until_ready(adapters)
  return counter.compiles["step"]
