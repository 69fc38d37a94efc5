"""Published SD-LoRA numbers (paper, official logs, LibContinual) as data.

The numbers live in ``reference_data/reference_numbers.json``, transcribed
from docs/semantics.md §8, each entry with a human-readable ``source``.
Layout: ``references[benchmark_id][method] -> [entry, ...]`` with
benchmark ids such as ``imagenet_r_10`` and methods ``sdlora``,
``sdlora_rr``, ``sdlora_kd``. Entry fields: ``kind`` ("paper",
"official_log", "libcontinual"), ``source``, ``acc``, ``aaa``, optional
``acc_se``/``aaa_se`` (paper standard errors), ``n_runs``, ``seed``, ``lr``,
``curve_top1``, ``forgetting_numeric``/``forgetting_printed`` and ``notes``.

``reference_data/official_log_accuracy_matrices.json`` holds the per-task
accuracy matrices parsed from the five official logs (groups in numeric order;
a copy of the spec's ``log_accuracy_matrices.json``), keyed by log file name.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import re
from typing import Optional

__all__ = ["DATA_PATH", "LOG_MATRICES_PATH", "PUBLISHED_METHODS", "load", "benchmarks",
           "normalize_method", "references", "official_log_matrices"]

_DATA_DIR = pathlib.Path(__file__).with_name("reference_data")
DATA_PATH = _DATA_DIR / "reference_numbers.json"
LOG_MATRICES_PATH = _DATA_DIR / "official_log_accuracy_matrices.json"
# The methods with published numbers (the runner's registry is methods.METHODS).
PUBLISHED_METHODS = ("sdlora", "sdlora_rr", "sdlora_kd")


@functools.lru_cache(maxsize=1)
def _load_cached() -> dict:
  with open(DATA_PATH, encoding="utf-8") as f:
    return json.load(f)


def load() -> dict:
  """The whole data file (a fresh copy; callers may mutate it)."""
  return copy.deepcopy(_load_cached())


def benchmarks() -> dict:
  """Benchmark id → {dataset, num_tasks, classes_per_task, num_classes}."""
  return load()["benchmarks"]


def normalize_method(name) -> Optional[str]:
  """Maps spellings like 'SD-LoRA-RR', 'sd_lora_rr', 'sdlora-rr' to a PUBLISHED_METHODS key.

  Returns None for names that are not one of the published variants.
  """
  if not isinstance(name, str):
    return None
  squashed = re.sub(r"[\s_\-]", "", name.lower())
  for m in PUBLISHED_METHODS:
    if squashed == m.replace("_", ""):
      return m
  return None


def references(benchmark: str, method: str) -> list[dict]:
  """Reference entries for (benchmark id, method), paper first; [] if none."""
  m = normalize_method(method)
  if m is None:
    return []
  entries = _load_cached()["references"].get(benchmark, {}).get(m, [])
  return copy.deepcopy(entries)


def official_log_matrices() -> dict:
  """Log file name → {n_tasks, group_keys_numeric_order, top1_curve,
  top5_curve, acc_matrix_rows_after_task_cols_group (null above the diagonal),
  final_top1, mean_top1_curve}. The benchmark behind each file is the
  ``log_file`` entry in ``references`` (InR-T10/T20 names are swapped)."""
  with open(LOG_MATRICES_PATH, encoding="utf-8") as f:
    return json.load(f)
