"""experiments/head_share.py: task-agnostic vs task-aware readout of a head.

Its figures come from results.json's ``cross_task`` counts; here the counts
are the evaluators' on given logits (tests/test_export.py checks a run's
against a re-evaluation of its checkpoint).
"""

import json
import subprocess
import sys

import numpy as np

from experiments import head_share
from experiments import tool
from slora_jax.runner import evaluators
from slora_jax.runner import report

NAMES = ["shirt / edges", "coat / edges", "shirt / sketch", "bag / texture"]


def _main(args) -> int:
  """``python -m experiments.head_share ARGS`` in-process: its exit code."""
  return tool.call(head_share.main, args, head_share.FLAGS,
                   head_share.USER_ERRORS)


def summarize(logits, labels, task_sizes, names=None):
  """head_share's figures for ``logits`` scored as one final evaluation."""
  step = evaluators.make_eval_step(lambda a, x: x, logits.shape[1], task_sizes)
  sums = step({}, {"image": np.asarray(logits, np.float32), "label": labels,
                   "mask": np.ones(len(labels), np.float32)}, logits.shape[1])
  record = {"task": 0, **evaluators.task_record(sums, len(task_sizes))}
  return head_share.summarize(report.cross_task_section(task_sizes, [record]),
                              names)


def test_summarize_counts_where_each_error_goes():
  # tasks: rows {0, 1} and {2, 3}; one sample per row, then one more of row 3
  logits = np.array([[5., 1., 0., 0.],    # row 0: right
                     [0., 1., 3., 0.],    # row 1 -> row 2 (later task)
                     [0., 0., 1., 2.],    # row 2 -> row 3 (own task)
                     [4., 0., 0., 1.],    # row 3 -> row 0 (earlier task)
                     [0., 0., 0., 1.]])   # row 3: right
  labels = np.array([0, 1, 2, 3, 3])
  out = summarize(logits, labels, [2, 2], NAMES)
  assert out["top1"] == 40.0 and out["errors"] == 3
  # own rows: sample 1 -> row 1 (right), sample 2 -> row 3, sample 3 -> row 3
  assert out["own_task_rows_only"] == 80.0
  assert round(out["errors_in_another_task"], 2) == 66.67
  t1, t2 = out["per_task"]
  assert (t1["top1"], t1["to_later_task"], t1["to_earlier_task"]) == (50., 50., 0.)
  assert (t2["top1"], t2["to_earlier_task"], t2["own_task_rows_only"]) == (
      round(100 / 3, 2), round(100 / 3, 2), round(200 / 3, 2))
  # cross-task errors: coat/edges -> shirt/sketch (neither), bag -> shirt/edges
  assert out["cross_task_same_garment"] == 0.0
  assert out["cross_task_same_style"] == 0.0


def test_style_shares_need_garment_style_names():
  logits = np.array([[0., 1.], [0., 1.]])
  out = summarize(logits, np.array([0, 1]), [1, 1], ["a", "b"])
  assert "cross_task_same_garment" not in out
  pairs = summarize(logits, np.array([0, 1]), [1, 1],
                      ["shirt / edges", "shirt / sketch"])
  assert pairs["cross_task_same_garment"] == 100.0
  assert pairs["cross_task_same_style"] == 0.0


def test_a_workdir_without_a_run_is_one_line_and_exit_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.head_share",
                         str(tmp_path)], capture_output=True, text=True,
                        check=False, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "no run" in lines[0]


def test_a_run_that_predates_task_il_is_one_line_and_exit_2(tmp_path, capsys):
  old = {"summary": {"acc": 50.0, "aaa": 50.0},
         "curves": {"top1_sample_weighted": [50.0]}, "acc_matrix": [[50.0]],
         "task_sizes": [2], "class_order": [0, 1]}
  (tmp_path / "results.json").write_text(json.dumps(old))
  assert _main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0] == (
      f"error: {tmp_path / 'results.json'} predates task-IL (no 'cross_task' "
      "section); rerun it with this version")
