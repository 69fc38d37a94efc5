"""``--config.method=all``: every method on one config, one table."""

import json

import pytest

from cli_util import cli_env, run_cli, tail
from slora_jax.runner import methods, sweep


def _payload(seed, acc, aaa, forgetting, acc_task_il=None):
  return {"seed": seed, "summary": {"acc": acc, "aaa": aaa,
                                    "forgetting": forgetting,
                                    "acc_task_il": acc_task_il},
          "per_task": [{"wall_time_s": 1.5}, {"wall_time_s": 2.0}]}


def test_rows_are_mean_and_sample_std_over_seeds():
  rows = sweep.summary_rows({
      "sdlora": [_payload(1, 60.0, 70.0, 10.0, 80.0),
                 _payload(2, 64.0, 72.0, 14.0, 84.0)],
      "joint": [_payload(1, 90.0, 90.0, None), _payload(2, 92.0, 90.0, None)]})
  sd, joint = rows
  assert (sd["acc"], sd["aaa"], sd["forgetting"]) == (62.0, 71.0, 12.0)
  assert sd["acc_std"] == pytest.approx(2 ** 1.5)     # sample std of 60, 64
  assert joint["forgetting"] is None and sd["wall_time_s"] == 7.0
  table = sweep.format_table(rows)
  assert "sdlora" in table and " 62.00 ±  2.83" in table and "n/a" in table
  # task-IL beside class-IL; n/a for results that predate it
  assert sd["acc_task_il"] == 82.0 and joint["acc_task_il"] is None
  assert "task-IL Acc" in table.splitlines()[1]
  sd_line = next(l for l in table.splitlines() if l.startswith("sdlora"))
  assert sd_line.endswith(" 82.00 ±  2.83")


def test_cli_all_runs_every_method_and_saves_the_table(tmp_path_factory,
                                                       tmp_path):
  r = run_cli(cli_env(tmp_path_factory), tmp_path / "all",
              "--config.method=all")
  assert r.returncode == 0, tail(r)
  rows = json.loads((tmp_path / "all" / "methods.json").read_text())
  assert [row["method"] for row in rows] == list(methods.METHODS)
  for name in methods.METHODS:
    assert (tmp_path / "all" / name / "seed_1993" / "results.json").is_file()
    assert f"\n{name} " in r.stdout                     # its table row
  assert all(0 <= row["acc"] <= 100 for row in rows)
  assert all(0 <= row["acc_task_il"] <= 100 for row in rows)
