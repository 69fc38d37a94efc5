"""What the entry point runs: one method over its seeds, or every method.

``--config.method=all`` runs each registered method on the same config (into
``WORKDIR/<method>``) and prints one table, mean ± std over the seeds, saved
as ``WORKDIR/methods.json``.
"""

from __future__ import annotations

import math
import os
import statistics

import jax

from slora_jax.runner import config as config_lib
from slora_jax.runner import dry_run
from slora_jax.runner import methods as methods_lib
from slora_jax.runner import paths
from slora_jax.runner import results as results_lib
from slora_jax.runner import train

__all__ = ["run", "summary_rows", "format_table"]

ALL = "all"


def _header(exp: config_lib.Experiment, config_file: str, workdir: str) -> str:
  seeds = ", ".join(str(s) for s in dry_run.executed(exp).seeds)
  dry = " (dry run)" if exp.dry_run else ""
  sem = f" ({exp.semantics} semantics)" if exp.method.uses_semantics else ""
  return (f"slora-jax: {exp.method.name}{sem}{dry}, "
          f"seed(s) {seeds}; config {os.path.relpath(config_file)}\n"  # path-ok: local file
          f"results: {workdir}/seed_<seed>/results.json and results.png; the "
          f"full config: {workdir}/config.json")


def run(config, workdir: str, config_file: str) -> list[dict]:
  """Runs ``config`` (a ConfigDict) into ``workdir``; returns the payloads."""
  if config.method != ALL:
    exp = config_lib.from_config(config)
    print(_header(exp, config_file, workdir), flush=True)
    payloads = train.train_and_evaluate(exp, workdir)
    if len(payloads) > 1:
      print(format_table(summary_rows({exp.method.name: payloads})), flush=True)
    return payloads
  by_method = {}
  for name in methods_lib.METHODS:
    c = config.copy_and_resolve_references()
    c.method = name
    exp = config_lib.from_config(c)
    sub = paths.join(workdir, name)
    print(f"\n== {name}: {exp.method.summary}", flush=True)
    print(_header(exp, config_file, sub), flush=True)
    by_method[name] = train.train_and_evaluate(exp, sub)
  rows = summary_rows(by_method)
  print("\n" + format_table(rows), flush=True)
  if jax.process_index() == 0:                     # one writer per run
    path = results_lib.write_json(paths.join(workdir, "methods.json"), rows)
    print(f"table saved: {path}", flush=True)
  return [p for ps in by_method.values() for p in ps]


def _mean_std(values) -> tuple[float | None, float | None]:
  vals = [v for v in values if v is not None and math.isfinite(v)]
  if not vals:
    return None, None
  return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1
                                  else 0.0)


def summary_rows(by_method: dict[str, list[dict]]) -> list[dict]:
  """Class-IL Acc, AAA and forgetting and task-IL Acc per method, mean and
  std over its seeds (task-IL: None if a seed's results predate it)."""
  rows = []
  for name, payloads in by_method.items():
    row = {"method": name, "seeds": [p["seed"] for p in payloads]}
    for key in ("acc", "aaa", "forgetting"):
      row[key], row[f"{key}_std"] = _mean_std(
          p["summary"].get(key) for p in payloads)
    til = [p["summary"].get("acc_task_il") for p in payloads]
    row["acc_task_il"], row["acc_task_il_std"] = (
        _mean_std(til) if None not in til else (None, None))
    row["wall_time_s"] = sum(sum(t.get("wall_time_s", 0.0) for t in p["per_task"])
                             for p in payloads)
    rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  """The rows as an aligned text table (mean ± std over seeds)."""
  def cell(r, key):
    m, s = r[key], r[f"{key}_std"]
    return "n/a" if m is None else f"{m:6.2f} ± {s:5.2f}"

  n = max(len(r["seeds"]) for r in rows)
  lines = [f"mean ± std over {n} seed(s); class-IL (task-agnostic) Acc, AAA "
           "and forgetting (n/a for one phase); task-IL Acc (each image "
           "against its own task's classes)",
           f"{'method':<14}{'Acc':>16}{'AAA':>16}{'forgetting':>16}"
           f"{'task-IL Acc':>16}"]
  lines += [f"{r['method']:<14}{cell(r, 'acc'):>16}{cell(r, 'aaa'):>16}"
            f"{cell(r, 'forgetting'):>16}{cell(r, 'acc_task_il'):>16}"
            for r in rows]
  return "\n".join(lines)
