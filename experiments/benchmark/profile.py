"""Where a compiled step's time goes: profiler events by HLO op name."""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable

import jax


def profile_ops(call: Callable[[], Any], compiled_text: str, repeats: int = 2,
                top: int = 20) -> list[tuple[str, float]]:
  """Milliseconds per call spent in each HLO op group, largest first.

  Runs ``call`` ``repeats`` times under `jax.profiler.trace`, maps each
  XLA:CPU thunk to the ``op_name`` of its instruction in ``compiled_text``
  (the compiled HLO), with ``blocks_<i>`` merged into ``blocks_*`` so a
  group sums over the transformer blocks.
  """
  op_names = {m.group(1): m.group(2) for m in re.finditer(
      r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", compiled_text)}
  groups: dict[str, float] = collections.Counter()
  for e in _trace_events(call, repeats):
    name = op_names.get(e.get("name")) if e.get("ph") == "X" else None
    if name is None:
      continue
    name = re.sub(r"blocks_\d+", "blocks_*", name.split("/", 1)[-1])
    groups[name] += e["dur"] / 1e3 / repeats
  return sorted(groups.items(), key=lambda kv: -kv[1])[:top]


def _trace_events(call: Callable[[], Any], repeats: int) -> list[dict]:
  """The perfetto trace events of ``repeats`` calls of ``call``."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(repeats):
        call()
    paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
             if f.endswith(".trace.json.gz")]
    if not paths:
      raise RuntimeError("jax.profiler wrote no perfetto trace")
    with gzip.open(paths[0]) as f:
      return json.load(f)["traceEvents"]


def profile_rows(table, chain, compiled, t: int, top: int) -> None:
  """Rows ``profile t=<t>: <op group>`` (ms per call) for a timed `Chain`."""
  for name, ms in profile_ops(lambda: chain(False), compiled.as_text(),
                              top=top):
    table.add(f"profile t={t}: {name}", ms, "ms")
