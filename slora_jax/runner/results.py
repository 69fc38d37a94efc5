"""``results.json``: one continual-learning run, written atomically; plots.

Schema (``schema_version`` 1). Accuracies are percentages; tasks 0-indexed;
JSON has no NaN/Infinity: undefined numbers are ``null``.

  schema_version   int, 1
  created_utc      ISO-8601 time the payload was built (kept on rewrites)
  written_utc      ISO-8601 time of the last ``write_results``
  config           dict, the run's full config; ``config["benchmark"]`` is the
                   benchmark id used by experiments/compare.py (e.g.
                   "imagenet_r_10"; absent → "custom")
  seed             int
  class_order      list[int]; position p = new label p, value = dataset label
  task_sizes       list[int], classes per task
  method           the config's method (a key of runner/methods' registry)
  semantics        Policy preset name ("reference" | "paper"), or a dict of the
                   Policy's fields that includes "name"
  acc_matrix       T×T list, row t = top-1 per task after training task t,
                   null above the diagonal, tasks in numeric order; T rows
                   so far, ``len(task_sizes)`` once the run is complete
  complete         bool, every task of the run evaluated (false while the
                   run is unfinished: its numbers are not final); files
                   without it are judged by that row count
  acc_matrix_top5  optional, same layout for top-5
  acc_matrix_task_il  optional (absent in files of older versions), same
                   layout, task-IL top-1: each image scored against its own
                   task's classes only (`evaluators`); a single-phase run's
                   1x1 matrix has one task of every class: its class-IL
  curves           {top1_sample_weighted: [T], top1_task_mean: [T],
                    top5_sample_weighted: [T] or null; with task-IL,
                    task_il_top1_sample_weighted: [T]}
  summary          ``metrics.summarize`` output: num_tasks, acc, aaa,
                   acc_task_mean, aaa_task_mean, acc_top5, aaa_top5,
                   forgetting, bwt; with task-IL also acc_task_il,
                   aaa_task_il (on its sample-weighted curve) and
                   forgetting_task_il
  cross_task       with task-IL: integer counts per evaluation (ragged rows
                   over the tasks seen; a single-phase run's over the data's
                   class groups): {task_sizes: the groups, count, top1,
                   task_il_top1, to_earlier, to_later: images of each task
                   predicted (class-IL top-1) into an earlier / a later task;
                   errors: {after_task, pairs: [[label, predicted class, n]]}
                   of the cross-task errors once every task is evaluated,
                   else null}
  per_task         [{task, wall_time_s, train_images_per_s, steps,
                     eval_time_s, ...}]
  versions         ``collect_versions()``: slora_jax, jax, jaxlib, flax, optax,
                   orbax, numpy, python (null where not installed)
  backbone         {name, checkpoint_path, sha256 (or null), init; hub:
                    {repo, revision, commit, filename} for weights by name}
  data_manifest    optional, what the run read: per-class counts and a
                   sha256 of the file list (``slora_jax.runner.data.manifest``)
  dry_run          only in a dry run's final file (``--config.dry_run=True``):
                   `slora_jax.runner.dry_run.report`'s section

Readers need only ``summary``, ``curves``, ``acc_matrix`` and ``complete``
(``validate_results`` checks their types, and those of ``seed``,
``class_order``, ``task_sizes``, ``method``, ``config``); the rest is
provenance.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
from typing import Any, Optional, Sequence

import numpy as np

from slora_jax.runner import metrics
from slora_jax.runner import paths

__all__ = [
    "SCHEMA_VERSION", "RESULTS_FILENAME", "ResultsError", "to_jsonable",
    "write_json", "make_payload", "validate_results", "write_results",
    "load_results", "collect_versions", "sha256_file", "plot_results",
    "progress",
]

SCHEMA_VERSION = 1
RESULTS_FILENAME = "results.json"


class ResultsError(ValueError):
  """A results file is missing, unreadable or does not follow the schema."""


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def to_jsonable(obj: Any) -> Any:
  """Plain-JSON copy of ``obj``: numpy → python, NaN/±inf → None, tuples → lists.

  Also unwraps ml_collections ConfigDicts (``to_dict``) and dataclasses.
  """
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, (np.bool_,)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    f = float(obj)
    return f if math.isfinite(f) else None
  if isinstance(obj, np.ndarray):
    return to_jsonable(obj.tolist())
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return to_jsonable(dataclasses.asdict(obj))
  if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    return to_jsonable(obj.to_dict())
  if hasattr(obj, "tolist"):  # jax arrays and other array-likes
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  raise TypeError(f"cannot store {type(obj).__name__} in JSON: {obj!r}")


def write_json(path, obj) -> str:
  """Writes ``to_jsonable(obj)`` to ``path`` atomically; returns the path.

  Through `paths.write_atomic`: a reader (or a crash) never sees a
  half-written file, locally or on gs://.
  """
  data = json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n"
  return paths.write_atomic(path, data)


def collect_versions() -> dict:
  """Installed versions of the packages a result depends on (None if absent)."""
  def version(dist):
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      return None

  ours = version("slora-jax") or version("slora_jax")
  if ours is None:
    try:
      import slora_jax  # pylint: disable=import-outside-toplevel
      ours = getattr(slora_jax, "__version__", None)
    except ImportError:
      ours = None
  return {
      "slora_jax": ours,
      "jax": version("jax"),
      "jaxlib": version("jaxlib"),
      "flax": version("flax"),
      "optax": version("optax"),
      "orbax": version("orbax-checkpoint"),
      "numpy": version("numpy"),
      "python": platform.python_version(),
  }


def sha256_file(path) -> Optional[str]:
  """Hex SHA-256 of a file (e.g. the backbone checkpoint); None if it is missing."""
  if path is None or not paths.isfile(path):
    return None
  h = hashlib.sha256()
  with paths.open_file(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def make_payload(*, config, seed: int, class_order: Sequence[int],
                 task_sizes: Sequence[int], method: str, semantics,
                 acc_matrix, curve_top1_sample_weighted,
                 curve_top1_task_mean=None, curve_top5_sample_weighted=None,
                 acc_matrix_top5=None, acc_matrix_task_il=None,
                 curve_task_il_top1_sample_weighted=None, per_task=(),
                 backbone=None, **extra) -> dict:
  """Builds a schema-conforming payload; computes ``summary`` and ``versions``.

  ``acc_matrix`` may be ragged rows or a (T, T) array (see
  ``metrics.accuracy_matrix``); ``curve_top1_task_mean`` defaults to its row
  means; ``acc_matrix_task_il`` with its curve adds task-IL. ``extra`` keys
  are stored as given.
  """
  R = metrics.accuracy_matrix(acc_matrix)
  summary = metrics.summarize(R, curve_top1_sample_weighted, curve_top1_task_mean,
                              curve_top5_sample_weighted)
  if curve_top1_task_mean is None:
    curve_top1_task_mean = [float(np.mean(R[t, :t + 1])) for t in range(R.shape[0])]
  if sum(task_sizes) != len(class_order) and len(class_order):
    raise ValueError(f"task sizes sum to {sum(task_sizes)} but the class order "
                     f"has {len(class_order)} classes")
  if len(task_sizes) < R.shape[0]:
    raise ValueError(f"{R.shape[0]} evaluated tasks but only {len(task_sizes)} sizes")
  payload = {
      "schema_version": SCHEMA_VERSION,
      "created_utc": _utc_now(),
      "config": config,
      "seed": seed,
      "class_order": list(class_order),
      "task_sizes": list(task_sizes),
      "method": method,
      "semantics": semantics,
      "acc_matrix": R,
      "complete": R.shape[0] == len(task_sizes),
      "acc_matrix_top5": (None if acc_matrix_top5 is None
                          else metrics.accuracy_matrix(acc_matrix_top5)),
      "curves": {
          "top1_sample_weighted": list(curve_top1_sample_weighted),
          "top1_task_mean": list(curve_top1_task_mean),
          "top5_sample_weighted": (None if curve_top5_sample_weighted is None
                                   else list(curve_top5_sample_weighted)),
      },
      "summary": summary,
      "per_task": list(per_task),
      "versions": collect_versions(),
      "backbone": backbone if backbone is not None else {
          "name": None, "checkpoint_path": None, "sha256": None},
  }
  if acc_matrix_task_il is not None:
    R_til = metrics.accuracy_matrix(acc_matrix_task_il)
    curve = np.asarray(curve_task_il_top1_sample_weighted, dtype=float)
    if R_til.shape != R.shape or curve.shape != (R.shape[0],):
      raise ValueError(f"task-IL matrix {R_til.shape} and curve {curve.shape} "
                       f"do not fit the {R.shape} accuracy matrix")
    payload["acc_matrix_task_il"] = R_til
    payload["curves"]["task_il_top1_sample_weighted"] = curve.tolist()
    summary.update(acc_task_il=float(curve[-1]), aaa_task_il=float(curve.mean()),
                   forgetting_task_il=metrics.forgetting(R_til))
  payload.update(extra)
  return to_jsonable(payload)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _numbers(values, name: str, fail, nullable: bool = False) -> None:
  if not isinstance(values, list):
    fail(f"'{name}' must be a list, got {type(values).__name__}")
  for i, v in enumerate(values):
    if not (_is_number(v) or (nullable and v is None)):
      fail(f"'{name}[{i}]' must be a number, got {v!r}")


def _matrix(m, rows: int, name: str, fail) -> None:
  if not isinstance(m, list) or len(m) != rows or not all(
      isinstance(r, list) for r in m):
    fail(f"'{name}' must be a list of {rows} rows like 'acc_matrix'")
  for t, row in enumerate(m):
    if len(row) not in (t + 1, rows):
      fail(f"'{name}' row {t} has {len(row)} entries; expected {t + 1} or "
           f"{rows}")
    _numbers(row[:t + 1], f"{name}[{t}]", fail)
    _numbers(row[t + 1:], f"{name}[{t}]", fail, nullable=True)


def _ints(values, name: str, fail) -> None:
  if not (isinstance(values, list) and all(
      _is_int(v) and v >= 0 for v in values)):
    fail(f"'{name}' must be a list of counts, got {values!r}")


def _cross_task(c, rows: int, fail) -> None:
  """The ``cross_task`` section: per evaluation, counts over the groups seen."""
  if not isinstance(c, dict):
    fail("'cross_task' must be an object")
  _ints(c.get("task_sizes"), "cross_task.task_sizes", fail)
  for key in ("count", "top1", "task_il_top1", "to_earlier", "to_later"):
    v = c.get(key)
    if not isinstance(v, list) or len(v) != rows:
      fail(f"'cross_task.{key}' must hold {rows} rows, one per evaluation")
    for t, row in enumerate(v):
      _ints(row, f"cross_task.{key}[{t}]", fail)
      if len(row) != len(c["count"][t]) or len(row) > len(c["task_sizes"]):
        fail(f"'cross_task.{key}[{t}]' has {len(row)} tasks; 'count' has "
             f"{len(c['count'][t])}")
  errors = c.get("errors")
  if errors is not None:
    pairs = errors.get("pairs") if isinstance(errors, dict) else None
    if not _is_int(errors.get("after_task") if pairs is not None else None):
      fail("'cross_task.errors' must be {after_task, pairs} or null")
    for i, p in enumerate(pairs):
      _ints(p, f"cross_task.errors.pairs[{i}]", fail)
      if len(p) != 3:
        fail(f"'cross_task.errors.pairs[{i}]' must be [label, predicted, n]")


def progress(d: dict) -> tuple[int, int | None]:
  """(tasks evaluated, tasks of the run or None if unknown) of a valid file."""
  sizes = d.get("task_sizes")
  return len(d["acc_matrix"]), (len(sizes) if sizes else None)


def validate_results(d, where: str = "results") -> dict:
  """Checks the keys readers rely on, types included; raises ResultsError
  naming ``where`` and the first bad field."""
  def fail(msg):
    raise ResultsError(f"{where}: {msg}")

  if not isinstance(d, dict):
    fail(f"expected a JSON object, got {type(d).__name__}")
  summary = d.get("summary")
  if not isinstance(summary, dict):
    fail("missing 'summary' object")
  for key in ("acc", "aaa"):
    if not _is_number(summary.get(key)):
      fail(f"'summary.{key}' must be a number, got {summary.get(key)!r}")
  for key, v in summary.items():
    if not (v is None or _is_number(v)):
      fail(f"'summary.{key}' must be a number or null, got {v!r}")
  curves = d.get("curves")
  if not isinstance(curves, dict) or not isinstance(
      curves.get("top1_sample_weighted"), list):
    fail("missing 'curves.top1_sample_weighted' list")
  _numbers(curves["top1_sample_weighted"], "curves.top1_sample_weighted", fail)
  for key in ("top1_task_mean", "top5_sample_weighted"):
    if curves.get(key) is not None:
      _numbers(curves[key], f"curves.{key}", fail, nullable=True)
  matrix = d.get("acc_matrix")
  if not isinstance(matrix, list) or not matrix or not all(
      isinstance(r, list) for r in matrix):
    fail("missing 'acc_matrix' (list of rows)")
  for t, row in enumerate(matrix):
    if len(row) not in (t + 1, len(matrix)):
      fail(f"'acc_matrix' row {t} has {len(row)} entries; expected {t + 1} "
           f"or {len(matrix)}")
    _numbers(row[:t + 1], f"acc_matrix[{t}]", fail)
    _numbers(row[t + 1:], f"acc_matrix[{t}]", fail, nullable=True)
  if "acc_matrix_task_il" in d:
    _matrix(d["acc_matrix_task_il"], len(matrix), "acc_matrix_task_il", fail)
    _numbers(curves.get("task_il_top1_sample_weighted"),
             "curves.task_il_top1_sample_weighted", fail)
    if len(curves["task_il_top1_sample_weighted"]) != len(matrix):
      fail(f"'curves.task_il_top1_sample_weighted' has "
           f"{len(curves['task_il_top1_sample_weighted'])} values for "
           f"{len(matrix)} rows")
  if d.get("cross_task") is not None:
    _cross_task(d["cross_task"], len(matrix), fail)
  if len(matrix) != len(curves["top1_sample_weighted"]):
    fail(f"acc_matrix has {len(matrix)} rows but the top-1 curve "
         f"{len(curves['top1_sample_weighted'])} values")
  config = d.get("config", {})
  if config is not None and not isinstance(config, dict):
    fail("'config' must be an object")
  if "seed" in d and not (d["seed"] is None or _is_int(d["seed"])):
    fail(f"'seed' must be an integer, got {d['seed']!r}")
  for key in ("class_order", "task_sizes"):
    v = d.get(key)
    if v is not None and not (isinstance(v, list) and all(map(_is_int, v))):
      fail(f"'{key}' must be a list of integers, got {v!r}")
  if d.get("method") is not None and not isinstance(d["method"], str):
    fail(f"'method' must be a string, got {d['method']!r}")
  done, planned = progress(d)
  if planned is not None and done > planned:
    fail(f"acc_matrix has {done} rows but the run has {planned} tasks")
  if "complete" in d:
    if not isinstance(d["complete"], bool):
      fail(f"'complete' must be true or false, got {d['complete']!r}")
    if planned is not None and d["complete"] != (done == planned):
      fail(f"'complete' is {str(d['complete']).lower()} but {done} of "
           f"{planned} tasks are evaluated")
  return d


def write_results(workdir, payload) -> str:
  """Validates ``payload`` and writes ``workdir/results.json`` atomically.

  Returns the file's path. NaN/inf become null; numpy types become python
  types; ``written_utc`` is set and ``created_utc`` filled if absent.
  """
  data = to_jsonable(payload)
  if not isinstance(data, dict):
    raise ResultsError(f"payload must be a dict, got {type(payload).__name__}")
  data.setdefault("schema_version", SCHEMA_VERSION)
  data.setdefault("created_utc", _utc_now())
  data["written_utc"] = _utc_now()
  validate_results(data, where="payload")
  return write_json(paths.join(workdir, RESULTS_FILENAME), data)


def load_results(path) -> dict:
  """Reads and validates a results file; ``path`` may also be a run directory.

  Raises:
    ResultsError: missing file, invalid JSON, or schema violation; the message
      names the file and the problem on one line.
  """
  path = os.fspath(path)
  if paths.isdir(path):
    path = paths.join(path, RESULTS_FILENAME)
  try:
    d = json.loads(paths.read_text(path))
  except FileNotFoundError:
    raise ResultsError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise ResultsError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} "
                       f"column {e.colno})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ResultsError(f"{path}: cannot read ({e})") from None
  return validate_results(d, where=path)


def _annotation_fontsize(T: int) -> float:
  # Keeps "88.8" inside a cell from T=1 (large cells) up to T=20.
  return 9 if T <= 8 else 7 if T <= 12 else 5


def plot_results(results: dict, path_png) -> str:
  """Saves a PNG: accuracy-matrix heatmap (left) and accuracy curves (right).

  Uses the Agg canvas directly (no pyplot, no display, global backend left
  untouched). Rows are "after task t", columns tasks in numeric label order;
  cells above the diagonal stay blank. Returns the path.
  """
  # Imported here so that writing results never needs matplotlib.
  import matplotlib  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  validate_results(results)
  R = np.array([[np.nan if v is None else v for v in row]
                for row in results["acc_matrix"]], dtype=float)
  T = R.shape[0]
  sizes = results.get("task_sizes") or []
  col_labels = _column_labels(sizes, T)

  side = max(4.0, 0.45 * T + 1.5)
  fig = Figure(figsize=(side + 5.5, max(4.0, side * 0.85)), dpi=110)
  FigureCanvasAgg(fig)
  ax_m, ax_c = fig.subplots(1, 2, gridspec_kw={"width_ratios": [side, 5.0]})

  masked = np.ma.masked_invalid(R)
  finite = R[np.isfinite(R)]
  vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0, 100)
  if vmax - vmin < 1:
    vmin, vmax = vmin - 0.5, vmax + 0.5
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
  im = ax_m.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
  fs = _annotation_fontsize(T)
  for t in range(T):
    for k in range(T):
      if np.isfinite(R[t, k]):
        # Dark text on the bright end of viridis, white on the dark end.
        light = (R[t, k] - vmin) / (vmax - vmin) > 0.6
        ax_m.text(k, t, f"{R[t, k]:.1f}", ha="center", va="center", fontsize=fs,
                  color="black" if light else "white")
  ax_m.set_xticks(range(T))
  # Long labels ("120-159") collide once a few tasks share the axis.
  if T > 3:
    ax_m.set_xticklabels(col_labels, rotation=90 if T > 10 else 45,
                         ha="center" if T > 10 else "right", fontsize=fs + 1)
  else:
    ax_m.set_xticklabels(col_labels, fontsize=fs + 1)
  ax_m.set_yticks(range(T))
  ax_m.set_yticklabels([str(t + 1) for t in range(T)], fontsize=fs + 1)
  ax_m.set_xlabel("classes of task (numeric order)")
  ax_m.set_ylabel("after training task")
  ax_m.set_title("top-1 accuracy (%) per task")
  fig.colorbar(im, ax=ax_m, fraction=0.046, pad=0.04)

  _plot_curves(ax_c, results, T)
  fig.tight_layout()
  path_png = os.fspath(path_png)
  png = io.BytesIO()
  fig.savefig(png, format="png", bbox_inches="tight")  # rotated labels overhang
  paths.write_atomic(path_png, png.getvalue())
  return path_png


def _plot_curves(ax_c, results: dict, T: int) -> None:
  """The right panel: accuracy curves over tasks, titled with the summary."""
  curves = results["curves"]
  x = np.arange(1, T + 1)
  summary = results["summary"]
  series = [("top1_sample_weighted", "top-1, sample-weighted (Acc)", "o-"),
            ("top1_task_mean", "top-1, mean over tasks", "s--"),
            ("top5_sample_weighted", "top-5, sample-weighted", "^:"),
            ("task_il_top1_sample_weighted", "task-IL top-1, sample-weighted",
             "d-.")]
  for key, label, style in series:
    ys = curves.get(key)
    if ys is not None and len(ys) == T:
      ys = np.array([np.nan if v is None else v for v in ys], dtype=float)
      ax_c.plot(x, ys, style, label=label, markersize=4)
  ax_c.set_xlabel("task")
  ax_c.set_ylabel("accuracy on all seen classes (%)")
  ax_c.set_xticks(x if T <= 10 else x[::2])
  if T == 1:
    ax_c.set_xlim(0.5, 1.5)
  ax_c.grid(True, alpha=0.3)
  ax_c.legend(fontsize=8, loc="best")
  bench = (results.get("config") or {}).get("benchmark", "custom")
  ax_c.set_title(f"{bench} {results.get('method', '')} seed {results.get('seed', '?')}\n"
                 f"Acc {summary['acc']:.2f}  AAA {summary['aaa']:.2f}", fontsize=10)


def _column_labels(task_sizes: Sequence[int], T: int) -> list[str]:
  """Column labels: reference group keys when the task sizes are known."""
  if task_sizes and len(task_sizes) >= T:
    return metrics.group_labels(task_sizes[:T])
  return [f"task {k + 1}" for k in range(T)]
