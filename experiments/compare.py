r"""Compares results.json files with the published SD-LoRA numbers.

Usage:
  python -m experiments.compare RUN/results.json [RUN2/results.json ...] \
      [--json comparison.json]

Runs are grouped by (benchmark id, method, semantics); the benchmark id is
``config["benchmark"]`` ("custom" when absent). Runs of one group must have
read the same data (``data_manifest.sha256`` in results.json; "unrecorded"
for older files): runs over different data are refused unless
``--mixed_data`` is given, and then each group lists its manifests. For each group it prints the
mean ± sample standard deviation (ddof=1) and the standard error over runs of
Acc and AAA, then every published reference for that benchmark and method
(paper table, official log, LibContinual rerun) with its source and the
difference ours − reference, then which of the three kinds has no number for
that benchmark and method, and the caveats recorded with each reference (code
version, class order, magnitude init). Paper values are means of 5 runs with
standard errors; logs and LibContinual are single runs with other seeds/class
orders.
A run that has not evaluated all its tasks (``complete`` false in its
results.json) is refused: its numbers are not final. With
``--allow_partial`` each such run is listed in its own group, marked
"PARTIAL", never averaged with finished runs nor set against the references.
Exit status 2 with a one-line error for missing, invalid or partial files.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Sequence, TextIO

from absl import flags
import numpy as np

from experiments import tool
from slora_jax.runner import reference_numbers
from slora_jax.runner.results import (ResultsError, load_results, progress,
                                      write_json)

_JSON = flags.DEFINE_string("json", None, "Also write the comparison to this JSON file.")
_MIXED = flags.DEFINE_bool("mixed_data", False,
                           "Average runs of one group even when they read "
                           "different data (different data manifests).")
_ALLOW_PARTIAL = flags.DEFINE_bool(
    "allow_partial", False, "List unfinished runs, each group marked PARTIAL "
    "and kept apart from finished runs, instead of refusing them.")

METRICS = (("acc", "Acc"), ("aaa", "AAA"))
# Task-IL (each image against its own task's classes): no reference has it.
TASK_IL = (("acc_task_il", "Acc"), ("aaa_task_il", "AAA"))
# The three kinds of published reference, in the order they are listed.
KINDS = (("paper", "paper table"), ("official_log", "official log"),
         ("libcontinual", "LibContinual rerun"))


def _semantics_name(semantics) -> str:
  if isinstance(semantics, dict):
    semantics = semantics.get("name")
  return str(semantics) if semantics else "unknown"


def run_key(results: dict) -> tuple[str, str, str]:
  """(benchmark id, method, semantics) of one results dict.

  Method spellings of the published variants are normalized ('SD-LoRA-RR' →
  'sdlora_rr') so they group together and find their references.
  """
  config = results.get("config") or {}
  benchmark = config.get("benchmark") or "custom"
  raw_method = results.get("method") or config.get("method") or "unknown"
  method = reference_numbers.normalize_method(raw_method) or str(raw_method)
  return str(benchmark), method, _semantics_name(results.get("semantics"))


class MixedDataError(ValueError):
  """Runs of one group read different data."""


def data_key(results: dict) -> str:
  """The short digest of the data a run read, or 'unrecorded'."""
  sha = (results.get("data_manifest") or {}).get("sha256")
  return str(sha)[:12] if sha else "unrecorded"


def _check_same_data(key, members, mixed_data: bool) -> list[str]:
  counts: dict[str, int] = {}
  for _, res in members:
    counts[data_key(res)] = counts.get(data_key(res), 0) + 1
  if len(counts) > 1 and not mixed_data:
    seen = ", ".join(f"{k} ({n} run{'s' if n > 1 else ''})"
                     for k, n in sorted(counts.items()))
    raise MixedDataError(
        f"the runs of {'/'.join(key)} read different data (data manifests "
        f"{seen}); compare runs over the same data, or pass --mixed_data to "
        "average them anyway")
  return sorted(counts)


def stats(values: Sequence[float]) -> dict:
  """mean, std (ddof=1; NaN for one run), se = std/√n, n and the values."""
  v = np.asarray(values, dtype=float)
  n = v.size
  std = float(np.std(v, ddof=1)) if n > 1 else math.nan
  return {"n": n, "mean": float(np.mean(v)), "std": std,
          "se": std / math.sqrt(n) if n > 1 else math.nan,
          "values": v.tolist()}


def partial(results: dict) -> str | None:
  """"k/T" for a run that evaluated k of its T tasks, None when complete."""
  done, planned = progress(results)
  if results.get("complete", True) and (planned is None or done == planned):
    return None
  return f"{done}/{planned if planned is not None else '?'}"


def compare_runs(runs: Sequence[tuple[str, dict]],
                 mixed_data: bool = False) -> list[dict]:
  """Groups (path, results) pairs and attaches references; one dict per group.

  Partial runs form groups of their own (``partial``: "k/T"), without
  references.

  Raises:
    MixedDataError: a group's runs read different data and not ``mixed_data``.
  """
  groups: dict[tuple[str, str, str, str], list[tuple[str, dict]]] = {}
  for path, res in runs:
    key = (*run_key(res), partial(res) or "")
    groups.setdefault(key, []).append((path, res))
  out = []
  for (benchmark, method, semantics, part), members in sorted(groups.items()):
    seeds = [res.get("seed", (res.get("config") or {}).get("seed")) for _, res in members]
    data = _check_same_data((benchmark, method, semantics), members,
                            mixed_data)
    group = {"benchmark": benchmark, "method": method, "semantics": semantics,
             "partial": part or None,
             "files": [p for p, _ in members], "seeds": seeds,
             "data_manifests": data}
    for key, _ in METRICS:
      group[key] = stats([res["summary"][key] for _, res in members])
    # Files of older versions have no task-IL: then the group has none.
    group["predate_task_il"] = sum(
        res["summary"].get("acc_task_il") is None for _, res in members)
    for key, _ in TASK_IL:
      group[key] = (None if group["predate_task_il"] else
                    stats([res["summary"][key] for _, res in members]))
    refs = []
    for ref in ([] if part else
                reference_numbers.references(benchmark, method)):
      entry = {"kind": ref["kind"], "source": ref["source"],
               "n_runs": ref.get("n_runs"), "seed": ref.get("seed"),
               "notes": ref.get("notes")}
      for key, _ in METRICS:
        entry[key] = ref.get(key)
        entry[f"{key}_se"] = ref.get(f"{key}_se")
        entry[f"{key}_diff"] = (None if ref.get(key) is None
                                else group[key]["mean"] - ref[key])
      refs.append(entry)
    group["references"] = refs
    present = {r["kind"] for r in refs}
    group["unpublished_kinds"] = [k for k, _ in KINDS if k not in present]
    out.append(group)
  return out


def _fmt(x, spec: str = ".2f", sign: bool = False) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  # Round first so float noise (68.771 - 68.771 = -1e-14) never prints "-0.00".
  x = float(format(x, spec)) + 0.0
  return format(x, ("+" if sign else "") + spec)


def _task_il_line(g: dict) -> str:
  if g.get("predate_task_il"):
    return (f"   task-IL: n/a, {g['predate_task_il']} of {g['acc']['n']} "
            "run(s) predate task-IL")
  cells = "  ".join(f"{label} {_fmt(g[key]['mean'])} ± {_fmt(g[key]['std'])}"
                    for key, label in TASK_IL)
  return f"   task-IL (each image against its own task's classes): {cells}"


def format_comparison(groups: Sequence[dict]) -> str:
  """Human-readable table, one block per group."""
  lines = []
  for g in groups:
    seeds = ", ".join(str(s) for s in g["seeds"])
    n = g["acc"]["n"]
    plural = "s" if n != 1 else ""
    done = (f" | PARTIAL: {g['partial'].replace('/', ' of ')} tasks evaluated"
            if g.get("partial") else "")
    lines.append(f"== {g['benchmark']} | method {g['method']} | semantics "
                 f"{g['semantics']} | {n} run{plural} (seed{plural} {seeds})"
                 f"{done}")
    if len(set(g["seeds"])) < len(g["seeds"]):
      lines.append("   note: repeated seeds; runs are not independent")
    data = g.get("data_manifests") or []
    if len(data) > 1:
      lines.append("   note: averaged over different data (--mixed_data), "
                   "manifests " + ", ".join(data))
    elif data and data[0] != "unrecorded":
      lines.append(f"   data manifest {data[0]}")
    header = (f"   {'metric':<6} {'ours mean ± std':<17} {'se':>5}   "
              f"{'ref':>6} {'ref se':>6} {'diff':>6}   source")
    lines.append(header)
    for key, label in METRICS:
      s = g[key]
      ours = f"{_fmt(s['mean'])} ± {_fmt(s['std'])}"
      prefix = f"   {label:<6} {ours:<17} {_fmt(s['se']):>5}   "
      if g.get("partial"):
        lines.append(prefix + "not final: not set against any reference")
        continue
      if not g["references"]:
        lines.append(prefix + "no published reference")
        continue
      for i, ref in enumerate(g["references"]):
        lead = prefix if i == 0 else " " * len(prefix)
        lines.append(lead + f"{_fmt(ref[key]):>6} {_fmt(ref[key + '_se']):>6} "
                     f"{_fmt(ref[key + '_diff'], sign=True):>6}   {ref['source']}")
    lines.append(_task_il_line(g))
    labels = dict(KINDS)
    if g["references"] and g.get("unpublished_kinds"):
      # Say which kinds are absent, so a missing row is not read as an omission.
      lines.append("   no number published for this benchmark and method in: "
                   + ", ".join(labels[k] for k in g["unpublished_kinds"]))
    for ref in g["references"]:
      if ref.get("notes"):
        lines.append(f"   note on the {labels.get(ref['kind'], ref['kind'])}: "
                     f"{ref['notes']}")
    lines.append("")
  return "\n".join(lines)


def run(paths: Sequence[str], json_out: Optional[str] = None,
        stream: Optional[TextIO] = None, err: Optional[TextIO] = None,
        mixed_data: bool = False, allow_partial: bool = False) -> int:
  """Loads ``paths``, prints the comparison, optionally writes JSON.

  Returns the exit status: 0, or 2 after a one-line error on ``err`` (a
  missing or invalid file, or a partial run unless ``allow_partial``).
  """
  stream = stream or sys.stdout
  err = err or sys.stderr
  if not paths:
    print("error: give at least one results.json", file=err)
    return 2
  try:
    runs = [(p, load_results(p)) for p in paths]
  except ResultsError as e:
    print(f"error: {e}", file=err)
    return 2
  for path, res in runs:
    part = partial(res)
    if part and not allow_partial:
      done, planned = part.split("/")
      print(f"error: {path}: unfinished run ({done} of {planned} "
            "tasks evaluated), its numbers are not final; rerun its command "
            "to finish it, or pass --allow_partial to list it apart",
            file=err)
      return 2
  try:
    groups = compare_runs(runs, mixed_data)
  except MixedDataError as e:
    print(f"error: {e}", file=err)
    return 2
  print(format_comparison(groups), file=stream)
  if json_out:
    write_json(json_out, {"groups": groups})
    print(f"wrote {json_out}", file=stream)
  return 0


def main(argv: Sequence[str]) -> int:
  if len(argv) < 2:
    tool.fail("give at least one results.json (see --help)")
  return run(list(argv[1:]), _JSON.value, mixed_data=_MIXED.value,
             allow_partial=_ALLOW_PARTIAL.value)


if __name__ == "__main__":
  tool.run(main)
