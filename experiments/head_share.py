"""How much of a run's task-agnostic error is its head's: the final model read two ways.

    python -m experiments.head_share WORKDIR [--seed=1993]

Loads the checkpoint the run's last evaluation used (as
``experiments.export`` loads one), merges the adapters and scores the run's
own test images, through its own evaluation batches, twice: against every
trained class (task-agnostic, the run's top-1) and against the classes of
the image's own task only (task-aware). The gap between the two is error
the features do not make: a right answer that another task's head row
outscores. Prints and writes ``<seed dir>/head_share.json``: per task both
accuracies and the share of its images sent to an earlier or a later task;
over all errors, the share landing in another task and, for classes named
``'garment / style'`` (Fashion-MNIST-R pairs), whether the class picked
shares the garment or the style.
"""

from __future__ import annotations

import os

from absl import flags
import jax
import numpy as np

import slora_jax as sl
from experiments import export as export_lib
from experiments import tool
from slora_jax.runner import experiment_data
from slora_jax.runner import results as results_lib

__all__ = ["summarize", "head_share"]


def _pct(x) -> float:
  return round(100.0 * float(np.mean(x)), 2) if np.size(x) else float("nan")


def summarize(logits: np.ndarray, labels: np.ndarray, task_sizes,
              names=None) -> dict:
  """Task-agnostic vs task-aware accuracy of ``logits`` (rows: samples).

  ``labels`` are head rows; task ``k`` owns the next ``task_sizes[k]`` rows.
  ``names`` (one per row) of the form ``'garment / style'`` add the garment
  and style shares of the cross-task errors.
  """
  bounds = np.cumsum([0, *task_sizes])
  task_of = np.searchsorted(bounds, np.arange(bounds[-1]), side="right") - 1
  pred = logits.argmax(1)
  own = np.empty_like(pred)
  for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    m = task_of[labels] == k
    own[m] = lo + logits[m, lo:hi].argmax(1)
  task, ptask = task_of[labels], task_of[pred]
  per_task = [{"task": k + 1, "top1": _pct(pred[m] == labels[m]),
               "own_task_rows_only": _pct(own[m] == labels[m]),
               "to_earlier_task": _pct(ptask[m] < k),
               "to_later_task": _pct(ptask[m] > k)}
              for k in range(len(task_sizes)) for m in [task == k]]
  err = pred != labels
  cross = err & (ptask != task)
  out = {"top1": _pct(~err), "own_task_rows_only": _pct(own == labels),
         "errors": int(err.sum()), "errors_in_another_task": _pct(cross[err]),
         "per_task": per_task}
  if names is not None and all(n.count(" / ") == 1 for n in names):
    parts = np.asarray([n.split(" / ") for n in names])
    same_g = parts[pred, 0] == parts[labels, 0]
    same_s = parts[pred, 1] == parts[labels, 1]
    out |= {"cross_task_same_garment": _pct(same_g[cross]),
            "cross_task_same_style": _pct(same_s[cross])}
  return out


def _logits_and_labels(run: dict, data, n: int):
  """The merged model's logits over classes ``[0, n)`` on the run's test
  samples of those classes, through the run's own evaluation batches."""
  params = sl.merge(run["params"], run["adapters"])
  fwd = jax.jit(lambda params, head, x: sl.apply_head(
      head, run["model"].apply({"params": params}, x)))
  logits, labels = [], []
  with data.eval_batches(n) as batches:
    for b in batches:
      real = b["mask"] > 0                   # the last batch is padded
      logits.append(np.asarray(fwd(params, run["head"], b["image"]))[real, :n])
      labels.append(np.asarray(b["label"])[real])
  return np.concatenate(logits), np.concatenate(labels)


def _evaluated_step(workdir: str, seed: int | None) -> int:
  """The checkpoint the run's last evaluation used (`export.evaluated_step`):
  the task trained, else the task finished; never a later mid-task one."""
  step, kind = export_lib.evaluated_step(workdir, seed)
  if kind == "latest":
    metas = [(s, m) for s, m in export_lib.checkpoint_metas(workdir, seed)
             if m is not None]
    meta = dict(metas)[step]
    raise ValueError(
        f"no kept checkpoint of {workdir} holds a model the run evaluated "
        f"(the latest, {step}, is at task {meta['cursor']['task'] + 1}, "
        f"step {meta['cursor']['step']}, with {len(meta['done'])} task(s) "
        "evaluated); let the run finish a task, or pass --step=N to score "
        f"another checkpoint ({', '.join(str(s) for s, _ in metas)})")
  return step


def _load_evaluated(workdir: str, seed: int | None, step: int | None) -> dict:
  """The run at ``step``, or at the checkpoint its last evaluation used."""
  if step is None:
    step = _evaluated_step(workdir, seed)
  return export_lib.load_run(workdir, seed, step)


def head_share(workdir: str, seed: int | None = None,
               step: int | None = None) -> dict:
  """Loads a run; returns (and writes) ``summarize``'s dict."""
  run = _load_evaluated(workdir, seed, step)
  exp, n = run["exp"], run["num_trained_classes"]
  data = experiment_data.prepare(exp.data, exp.train,
                                 run["meta"]["fingerprint"]["seed"],
                                 process_index=0, process_count=1)
  logits, labels = _logits_and_labels(run, data, n)
  groups = int(np.searchsorted(np.cumsum(data.task_sizes), n)) + 1
  doc = summarize(logits, labels, data.task_sizes[:groups],
                  data.class_names[:n]) | {"checkpoint": run["step"],
                                           "cursor": run["meta"]["cursor"]}
  path = results_lib.write_json(
      os.path.join(run["seed_dir"], "head_share.json"), doc)
  return doc | {"path": path}


FLAGS = flags.FlagValues()       # its own, as export's
export_lib.define_run_flags(FLAGS, "the one the run's last evaluation used")
USER_ERRORS = (FileNotFoundError, ValueError)


def main(argv) -> int:
  """``python -m experiments.head_share WORKDIR``: `tool.run`'s main."""
  doc = head_share(*export_lib.run_args(argv, FLAGS))
  c = doc["cursor"]
  print(f"checkpoint {doc['checkpoint']} (task {c['task'] + c['begun']} "
        f"{'trained' if c['begun'] else 'finished'})")
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
