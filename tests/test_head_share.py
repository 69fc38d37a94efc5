"""experiments/head_share.py: task-agnostic vs task-aware readout of a head."""

import subprocess
import sys

import numpy as np
import pytest

from experiments import head_share
from experiments import tool
from slora_jax.runner import checkpoint as ckpt_lib

NAMES = ["shirt / edges", "coat / edges", "shirt / sketch", "bag / texture"]


def _main(args) -> int:
  """``python -m experiments.head_share ARGS`` in-process: its exit code."""
  return tool.call(head_share.main, args, head_share.FLAGS,
                   head_share.USER_ERRORS)


def test_summarize_counts_where_each_error_goes():
  # tasks: rows {0, 1} and {2, 3}; one sample per row, then one more of row 3
  logits = np.array([[5., 1., 0., 0.],    # row 0: right
                     [0., 1., 3., 0.],    # row 1 -> row 2 (later task)
                     [0., 0., 1., 2.],    # row 2 -> row 3 (own task)
                     [4., 0., 0., 1.],    # row 3 -> row 0 (earlier task)
                     [0., 0., 0., 1.]])   # row 3: right
  labels = np.array([0, 1, 2, 3, 3])
  out = head_share.summarize(logits, labels, [2, 2], NAMES)
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
  out = head_share.summarize(logits, np.array([0, 1]), [1, 1], ["a", "b"])
  assert "cross_task_same_garment" not in out
  pairs = head_share.summarize(logits, np.array([0, 1]), [1, 1],
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


# A run's checkpoints, as the task loop saves them: (task, step, begun, number
# of tasks evaluated). Tasks of 4 steps, a periodic checkpoint every 2.
SAVES = [(0, 2, True, 0), (0, 4, True, 0),     # task 1: step 2, trained
         (1, 0, False, 1),                     # evaluated and finished
         (1, 2, True, 1), (1, 3, True, 1)]     # task 2: step 2, interrupted


def _checkpoints(path, keep):
  ckpt = ckpt_lib.Checkpointer(str(path), keep=keep)
  for task, step, begun, done in SAVES:
    ckpt.save({"x": np.full(2, step, np.float32)},
              {"cursor": {"task": task, "step": step, "begun": begun},
               "done": [{}] * done})
  ckpt.close()
  return str(path)


def test_an_interrupted_run_is_scored_where_it_was_evaluated(tmp_path):
  # The run was stopped in task 2: its last evaluation (task 1) used
  # checkpoint 2 (task 1 trained), or 3 (task 1 finished: the same merged
  # model) when 2 is gone; never 4 or 5, models no evaluation saw.
  assert head_share._evaluated_step(_checkpoints(tmp_path / "a", 5), None) == 2
  assert head_share._evaluated_step(_checkpoints(tmp_path / "b", 3), None) == 3
  with pytest.raises(ValueError, match=r"no kept checkpoint of \S+ holds a "
                     r"model the run evaluated \(the latest, 5, is at task 2, "
                     r"step 3, with 1 task\(s\) evaluated\); let the run "
                     r"finish a task, or pass --step=N to score another "
                     r"checkpoint \(4, 5\)"):
    head_share._evaluated_step(_checkpoints(tmp_path / "c", 2), None)


def test_no_evaluated_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
  assert _main([_checkpoints(tmp_path, 2)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: no kept checkpoint of ")
