"""The input-pipeline benchmark's arithmetic (python -m experiments.benchmark_pipeline)."""

import numpy as np
import pytest

from experiments.benchmark import table as table_lib
from experiments.benchmark import workers


class _Clock:
  """Stands in for ``time.perf_counter``; batches advance it."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _batches(clock, waits, size=10):
  for wait in waits:
    clock.now += wait
    yield {"mask": np.ones(size)}


class _Iterator:
  def __init__(self, gen):
    self.gen = gen

  def __next__(self):
    return next(self.gen)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def test_steady_rate_ignores_buffered_batches_and_spans_whole_rounds(
    monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(workers.time, "perf_counter", clock)
  # Two workers: 1 warm-up batch, 3 buffered batches arriving at once, then
  # rounds of (0.18 s, 0.02 s): 10 images per 0.1 s on average.
  waits = [2.0] + [0.0] * 3 + [0.18, 0.02] * 6
  rate = workers.steady_rate(_Iterator(_batches(clock, waits)), 1,
                             len(waits) - 1, period=2)
  assert rate == pytest.approx(100.0)
  with pytest.raises(ValueError, match="at least 4"):
    workers.steady_rate(_Iterator(_batches(clock, waits)), 0, 3)


def test_core_rows_divide_the_chip_estimates_by_the_per_core_rate():
  t = table_lib.Table()
  workers.core_rows(t, 100.0)
  est = workers.step_rates()
  # The estimates of docs/benchmark.md (ViT-B/16: TPU v4 ~1,570 img/s).
  assert est["vit_b16"]["TPU v4"] == pytest.approx(1568, abs=5)
  row = t["cores per TPU v4 chip, vit_b16 (1,568 img/s est.)"]
  assert row.value == pytest.approx(est["vit_b16"]["TPU v4"] / 100)
  host = t["cores per H100 SXM host (8 chips), vit_s16"]
  assert host.value == pytest.approx(8 * est["vit_s16"]["H100 SXM"] / 100)
  assert host.verdict == "FAIL" and host.target == "<= 224 vCPUs"
