"""The result table, its printed form and its JSON file."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


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
    cells = [(r.name, _fmt(r.value) if r.value is None
              else f"{_fmt(r.value)} {r.unit}".strip(), r.target, r.verdict)
             for r in self.rows]
    head = ("metric", "value", "target", "result")
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(4)]
    line = lambda c: "  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule] + [line(c) for c in cells])

  def to_json(self) -> list[dict]:
    return [dataclasses.asdict(r) for r in self.rows]


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


def ratio(a, b):
  """``a / b``, or None when ``a`` is missing or ``b`` missing or zero."""
  return a / b if a is not None and b else None


def within(r, bound: float, at_least: bool = False):
  """``r <= bound`` (``>=`` with ``at_least``), None when ``r`` is None."""
  if r is None:
    return None
  return r >= bound if at_least else r <= bound


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
  """Writes everything but the `Table` object (its rows are already there)."""
  out = {k: v for k, v in result.items() if k != "table"}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1, default=str)
