"""How much of a run's task-agnostic error is its head's: two readouts.

    python -m experiments.head_share WORKDIR [--seed=1993]

Reads the run's results.json (no checkpoint, no re-evaluation): its
``cross_task`` section holds, for the last evaluation, per task the images
scored right against every trained class (task-agnostic, the run's top-1)
and against the classes of the image's own task only (task-aware, its
task-IL), and the images sent to an earlier or a later task. The gap between
the two accuracies is error the features do not make: a right answer that
another task's head row outscores. Prints and writes
``<seed dir>/head_share.json``: per task both accuracies and the share of its
images sent to an earlier or a later task; over all errors, the share landing
in another task and, once every task is evaluated, for classes named
``'garment / style'`` (Fashion-MNIST-R pairs), whether the class picked
shares the garment or the style.
"""

from __future__ import annotations

import os

from absl import flags

from experiments import export as export_lib
from experiments import tool
from slora_jax.runner import results as results_lib

__all__ = ["summarize", "head_share"]


def _pct(part, whole) -> float:
  """``part / whole`` in % to 2 places (NaN of nothing)."""
  return round(100.0 * (part / whole), 2) if whole else float("nan")


def summarize(cross_task: dict, names=None) -> dict:
  """Task-agnostic vs task-aware accuracy of the last evaluation.

  ``cross_task``: results.json's section of that name (integer counts per
  evaluation, `slora_jax.runner.evaluators`). ``names`` (one per head row)
  of the form ``'garment / style'`` add the garment and style shares of the
  cross-task errors, which the section holds once every task is evaluated.
  """
  count, top1, own, earlier, later = (
      cross_task[k][-1] for k in ("count", "top1", "task_il_top1",
                                  "to_earlier", "to_later"))
  n, right = sum(count), sum(top1)
  errors = n - right
  per_task = [{"task": k + 1, "top1": _pct(top1[k], count[k]),
               "own_task_rows_only": _pct(own[k], count[k]),
               "to_earlier_task": _pct(earlier[k], count[k]),
               "to_later_task": _pct(later[k], count[k])}
              for k in range(len(count))]
  out = {"top1": _pct(right, n), "own_task_rows_only": _pct(sum(own), n),
         "errors": int(errors),
         "errors_in_another_task": _pct(sum(earlier) + sum(later), errors),
         "per_task": per_task}
  pairs = (cross_task.get("errors") or {}).get("pairs")
  if (names is not None and pairs is not None
      and all(name.count(" / ") == 1 for name in names)):
    parts = [name.split(" / ") for name in names]
    cross = sum(c for _, _, c in pairs)
    out |= {f"cross_task_same_{what}": _pct(
        sum(c for l, p, c in pairs if parts[l][i] == parts[p][i]), cross)
            for i, what in enumerate(("garment", "style"))}
  return out


def _head_rows_names(results: dict):
  """The class name of each head row, when the data manifest names them."""
  classes = (results.get("data_manifest") or {}).get("classes")
  if not isinstance(classes, dict):
    return None
  names = list(classes)
  return [names[c] for c in results["class_order"]]


def head_share(workdir: str, seed: int | None = None) -> dict:
  """Reads a run's results.json; returns (and writes) ``summarize``'s dict."""
  path = os.path.join(export_lib.find_run_dir(
      workdir, seed, results_lib.RESULTS_FILENAME,
      results_lib.RESULTS_FILENAME), results_lib.RESULTS_FILENAME)
  results = results_lib.load_results(path)
  if results.get("cross_task") is None:
    raise ValueError(f"{path} predates task-IL (no 'cross_task' section); "
                     "rerun it with this version")
  done, planned = results_lib.progress(results)
  doc = summarize(results["cross_task"], _head_rows_names(results)) | {
      "evaluated_tasks": len(results["cross_task"]["count"][-1]),
      "after_phase": done, "phases": planned}
  out = results_lib.write_json(
      os.path.join(os.path.dirname(path), "head_share.json"), doc)
  return doc | {"path": out}


FLAGS = flags.FlagValues()       # its own, as export's
flags.DEFINE_integer("seed", None, "which seed_<seed> run (needed if several)",
                     flag_values=FLAGS)
USER_ERRORS = (FileNotFoundError, ValueError)


def main(argv) -> int:
  """``python -m experiments.head_share WORKDIR``: `tool.run`'s main."""
  workdir, = tool.positional(argv, "WORKDIR")
  doc = head_share(workdir, FLAGS.seed)
  print(f"evaluation after phase {doc['after_phase']} of {doc['phases']} "
        f"({doc['evaluated_tasks']} tasks)")
  print(f"top-1 {doc['top1']:.2f} task-agnostic, "
        f"{doc['own_task_rows_only']:.2f} on each image's own task's rows; "
        f"{doc['errors_in_another_task']:.1f}% of the {doc['errors']} errors "
        "pick another task's class")
  for t in doc["per_task"]:
    print(f"  task {t['task']}: top-1 {t['top1']:.1f}, own rows "
          f"{t['own_task_rows_only']:.1f}, to earlier {t['to_earlier_task']:.1f}"
          f"%, to later {t['to_later_task']:.1f}%")
  if "cross_task_same_garment" in doc:
    print(f"cross-task errors: same garment {doc['cross_task_same_garment']:.1f}"
          f"%, same style {doc['cross_task_same_style']:.1f}%")
  print(f"-> {doc['path']}")
  return 0


if __name__ == "__main__":
  tool.run(main, FLAGS, USER_ERRORS)
