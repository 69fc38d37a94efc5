"""The PyTorch comparison's mechanics: a separate process, alternating rounds."""

import os

import pytest

pytest.importorskip("torch")

from experiments.benchmark import versus_torch  # pylint: disable=wrong-import-position
from experiments.benchmark.settings import Settings  # pylint: disable=wrong-import-position
from experiments.benchmark.table import Table  # pylint: disable=wrong-import-position
from slora_jax.models import vit  # pylint: disable=wrong-import-position


def test_alternate_swaps_sides_every_round_and_takes_medians(monkeypatch):
  monkeypatch.setattr(versus_torch, "PAUSE_S", 0.0)
  monkeypatch.setattr(versus_torch, "WARM_CALL_S", 0.0)
  monkeypatch.setattr(versus_torch, "SHORT_CALL_S", 0.0)
  log, values = [], {"ours": iter([3.0, 1.0, 2.0]), "torch": iter([6.0, 5.0, 4.0])}

  def call(side):
    def run():
      log.append(side)
      return next(values[side])
    return run

  ours, torch_med = versus_torch.alternate(
      {"step t=0": call("ours")}, {"step t=0": call("torch")}, repeats=3,
      warmup=0)
  assert log == ["ours", "torch", "torch", "ours", "ours", "torch"]
  assert ours == {"step t=0": 2.0} and torch_med == {"step t=0": 5.0}


def test_the_port_runs_in_its_own_process_and_answers_times():
  proc = versus_torch.TorchProcess(threads=1)
  try:
    assert proc.info["pid"] != os.getpid() and proc.info["threads"] == 1
    cfg = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=2,
                        num_heads=2, mlp_dim=32)
    calls = proc.load("tiny", tasks=2, batch=2, eval_batch=3, cfg=cfg,
                      num_classes=20, rank=3)
    assert set(calls) == {"step", "eval", "plain"}
    assert all(calls[c]() > 0 for c in calls)
  finally:
    proc.close()
  assert proc._proc.returncode == 0   # pylint: disable=protected-access


def test_case_rows_check_each_target():
  s = Settings(model="vit_ti16", tasks=(0, 19), capacity=20)
  case = versus_torch.Case("b4", s, s.vit_config(), (0, 19), 4)
  ours = {"step t=0": 1.2, "step t=19": 1.3, "plain": 0.4, "eval t=19": 0.4}
  port = {"step t=0": 1.0, "step t=19": 2.5, "plain": 0.5, "eval t=19": 0.8}
  table = Table()
  versus_torch.case_rows(table, case, ours, port, train_flops=300e9,
                         xla_peak=320.0)
  assert table["b4: step t=0, ours / port"].verdict == "FAIL"      # 1.2 > 1.0
  assert table["b4: step t=19, ours / port"].verdict == "PASS"     # 0.52
  assert table["b4: plain, ours / port"].verdict == "PASS"         # 0.8
  row = table["b4: achieved GFLOP/s, our step t=0 (analytic)"]
  assert row.value == pytest.approx(250.0) and row.verdict == "PASS"


def test_cases_cover_both_batches_and_the_demo_size():
  cases = versus_torch.cases(Settings(tasks=(0, 19), capacity=20, torch_batch=32))
  assert [c.settings.batch for c in cases] == [4, 32, 64]
  demo = cases[-1]
  assert (demo.cfg.image_size, demo.cfg.width, demo.cfg.depth) == (28, 128, 6)
  assert demo.tasks == (0, 4) and demo.eval_batch == 250
  assert demo.settings.rank == 4 and not demo.peak_target
  assert cases[0].tasks == (0, 19) and cases[1].tasks == (0,)


def test_alternate_drops_warmup_rounds(monkeypatch):
  monkeypatch.setattr(versus_torch, "PAUSE_S", 0.0)
  seq = {"ours": iter([9.0, 1.0, 3.0]), "torch": iter([9.0, 2.0, 4.0])}
  monkeypatch.setattr(versus_torch, "WARM_CALL_S", 0.0)   # no untimed call
  monkeypatch.setattr(versus_torch, "SHORT_CALL_S", 0.0)  # one timed call
  ours, theirs = versus_torch.alternate(
      {"plain": lambda: next(seq["ours"])},
      {"plain": lambda: next(seq["torch"])}, repeats=2, warmup=1)
  assert ours == {"plain": 2.0} and theirs == {"plain": 3.0}


def test_short_calls_get_a_warm_call_and_several_timed_ones():
  log = []
  def call():
    log.append(len(log))
    return 0.01 * len(log)
  got = versus_torch._turn(call, duration=0.05)  # pylint: disable=protected-access
  assert len(log) == 1 + versus_torch.TURN_CALLS
  assert got == [0.01 * k for k in range(2, 2 + versus_torch.TURN_CALLS)]
  log.clear()
  assert len(versus_torch._turn(call, duration=10.0)) == 1  # pylint: disable=protected-access
  assert len(log) == 1                # long calls: no untimed call


def test_case_rows_at_t0_only_keep_the_step_target():
  s = Settings(model="vit_ti16", tasks=(0, 19), capacity=20, batch=32)
  case = versus_torch.Case("b32", s, s.vit_config(), (0,), 32)
  table = Table()
  versus_torch.case_rows(table, case, {"step t=0": 2.0, "plain": 1.0},
                         {"step t=0": 1.0, "plain": 1.0}, train_flops=1e9,
                         xla_peak=100.0)
  names = [r.name for r in table.rows]
  assert len(names) == len(set(names))
  assert table["b32: step t=0, ours / port"].verdict == "FAIL"
  assert table["b32: plain, ours / port"].verdict == "PASS"
