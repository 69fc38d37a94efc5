"""A run's results payload and what the runner prints about it."""

from __future__ import annotations

import math
from typing import Sequence

from slora_jax.runner import metrics
from slora_jax.runner import paths
from slora_jax.runner import results as results_lib

__all__ = ["payload", "session_line", "task_line", "final_lines"]

_PER_TASK = ("task", "wall_time_s", "train_images_per_s", "steps",
             "eval_time_s")


def payload(session, done: Sequence[dict], method_fields: dict) -> dict:
  """The results.json payload of the tasks evaluated so far.

  ``method_fields``: the method's ``semantics`` and ``stored_directions``
  (`methods.base.Method.payload`).
  """
  exp, data = session.exp, session.data
  rows = [d["top1_per_task"] for d in done]
  rows5 = [d["top5_per_task"] for d in done] if all(
      d.get("top5_per_task") is not None for d in done) else None
  # The loop's fields and the method's own (`Method.record`, `after_task`).
  per_task = [{**{k: d[k] for k in _PER_TASK if k in d},
               **d.get("method_fields", {})} for d in done]
  task_sizes, extra = data.task_sizes, {}
  # Records of a run resumed from an older version may lack task-IL.
  til = bool(done) and all("task_il_top1_per_task" in d for d in done)
  rows_til = [d["task_il_top1_per_task"] for d in done] if til else None
  curve_til = ([d["task_il_top1_sample_weighted"] for d in done] if til
               else None)
  if til:
    extra["cross_task"] = cross_task_section(data.task_sizes, done)
  if exp.method.single_phase:
    # One training phase on every class: a 1x1 matrix over all classes, with
    # the per-group accuracies kept beside it (Acc = AAA = final top-1). Its
    # one task holds every class, so its task-IL is its class-IL; the
    # task-IL of the data's class groups is kept beside it too.
    task_sizes = [sum(data.task_sizes)]
    extra["joint_group_top1"] = rows[0] if rows else []
    rows = [[d["top1_sample_weighted"]] for d in done]
    rows5 = [[d["top5_sample_weighted"]] for d in done] if rows5 else None
    if til:
      extra["joint_group_task_il_top1"] = rows_til[0]
      rows_til, curve_til = rows, [d["top1_sample_weighted"] for d in done]
  return results_lib.make_payload(
      **extra,
      config=exp.raw, seed=session.seed, class_order=data.class_order,
      task_sizes=task_sizes, method=exp.method.name,
      semantics=method_fields["semantics"],
      acc_matrix=metrics.accuracy_matrix(rows) if rows else [],
      acc_matrix_top5=metrics.accuracy_matrix(rows5) if rows5 else None,
      curve_top1_sample_weighted=[d["top1_sample_weighted"] for d in done],
      curve_top1_task_mean=[d["top1_task_mean"] for d in done],
      curve_top5_sample_weighted=[d["top5_sample_weighted"] for d in done],
      acc_matrix_task_il=(metrics.accuracy_matrix(rows_til) if rows_til
                          else None),
      curve_task_il_top1_sample_weighted=curve_til,
      per_task=per_task, backbone=session.backbone_info,
      data_manifest=data.manifest,
      stored_directions=method_fields["stored_directions"])


def cross_task_section(group_sizes, done: Sequence[dict]) -> dict:
  """results.json's ``cross_task`` section: the integer counts of every
  evaluation, and the cross-task errors of the last one that holds them."""
  keys = ("count", "top1", "task_il_top1", "to_earlier", "to_later")
  out = {"task_sizes": list(group_sizes),
         **{k: [d["counts"][k] for d in done] for k in keys}, "errors": None}
  for d in reversed(done):
    if "cross_task_errors" in d:
      out["errors"] = {"after_task": d["task"], "pairs": d["cross_task_errors"]}
      break
  return out


def session_line(session) -> str:
  """What a seed's run adapts and learns, once its data and backbone are built."""
  d, info = session.data, session.backbone_info
  sizes = sorted(set(d.task_sizes))
  per = "x".join(str(s) for s in sizes)
  return (f"seed {session.seed}: backbone {info['name']} (width "
          f"{session.width}); data {d.source.description}, {d.num_tasks} tasks "
          f"of {per} classes, {len(d.train_index)} train / {len(d.test_index)} "
          f"test images")


def task_line(record: dict, num_phases: int) -> str:
  """One line after each task's evaluation."""
  til = record.get("task_il_top1_sample_weighted")
  til = "" if til is None else f" (task-IL {til:.2f})"
  return (f"task {record['task'] + 1}/{num_phases}: top-1 "
          f"{record['top1_sample_weighted']:.2f}{til}  per task "
          f"{record['top1_per_task']}  ({record['wall_time_s']:.0f} s, "
          f"{record['train_images_per_s']:.0f} img/s)")


def final_lines(p: dict, seed: int, wall_s: float, path: str) -> str:
  """The accuracy matrix and the summary line printed at the end of a run."""
  s = p["summary"]
  matrix = metrics.format_matrix(p["acc_matrix"],
                                 metrics.group_labels(p["task_sizes"]))
  f = s.get("forgetting")
  forgetting = (f"  forgetting {f:.2f}" if f is not None and math.isfinite(f)
                else "")
  til = ""
  if s.get("acc_task_il") is not None:
    f = s.get("forgetting_task_il")
    til = (f"\n  task-IL (each image against its own task's classes): Acc "
           f"{s['acc_task_il']:.2f}  AAA {s['aaa_task_il']:.2f}" +
           (f"  forgetting {f:.2f}" if f is not None and math.isfinite(f)
            else ""))
  return ("top-1 accuracy (%) on each task's classes, task-agnostic, merged "
          f"weights:\n{matrix}\nseed {seed}: Acc {s['acc']:.2f}  AAA "
          f"{s['aaa']:.2f}{forgetting}  ({wall_s:.0f} s){til}\n  -> {path}, "
          f"{paths.join(paths.dirname(path), 'results.png')}")
