"""Tests for slora_jax.runner.metrics and the reference-number data."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from slora_jax.runner import metrics
from slora_jax.runner import reference_numbers

LOGS = reference_numbers.official_log_matrices()

# docs/semantics.md §7: forgetting with groups in numeric order, and what the
# logs print (string-sorted groups).
SPEC_FORGETTING = {"InR-T5.log": 5.63, "InR-T20.log": 5.17, "InR-T10.log": 6.46,
                   "InA.log": 10.41, "C100.log": 6.41}
SPEC_PRINTED_FORGETTING = {"InR-T5.log": 5.33, "InR-T20.log": 6.11,
                           "InR-T10.log": 9.04, "InA.log": 12.09, "C100.log": 6.41}


def _matrix(log):
  return metrics.accuracy_matrix(log["acc_matrix_rows_after_task_cols_group"])


@pytest.mark.parametrize("name", sorted(LOGS))
def test_log_acc_and_aaa_from_curves(name):
  log = LOGS[name]
  s = metrics.summarize(_matrix(log), log["top1_curve"], None, log["top5_curve"])
  assert s["num_tasks"] == log["n_tasks"]
  assert s["acc"] == log["final_top1"]
  assert s["aaa"] == pytest.approx(log["mean_top1_curve"], abs=1e-9)
  assert s["acc_top5"] == log["top5_curve"][-1]


@pytest.mark.parametrize("name", sorted(LOGS))
def test_log_forgetting_numeric_order_matches_spec(name):
  # The spec rounds half up (InR N=5 is exactly 5.625 → "5.63").
  assert metrics.forgetting(_matrix(LOGS[name])) == pytest.approx(
      SPEC_FORGETTING[name], abs=0.0051)


@pytest.mark.parametrize("name", sorted(LOGS))
def test_log_forgetting_string_sorted_matches_printed(name):
  log = LOGS[name]
  value = metrics.reference_string_sorted_forgetting(
      _matrix(log), log["group_keys_numeric_order"])
  assert value == pytest.approx(SPEC_PRINTED_FORGETTING[name], abs=0.0051)


def test_group_labels_match_log_keys():
  for name, log in LOGS.items():
    T = log["n_tasks"]
    num_classes = 100 if name == "C100.log" else 200
    assert metrics.group_labels([num_classes // T] * T) == log["group_keys_numeric_order"]


def test_ina_task_mean_differs_from_sample_weighted():
  # Spec §7: unequal test sizes on ImageNet-A; 58.66 sample-weighted vs 59.24.
  s = metrics.summarize(_matrix(LOGS["InA.log"]), LOGS["InA.log"]["top1_curve"])
  assert s["acc"] == 58.66
  assert round(s["acc_task_mean"], 2) == 59.24


def test_forgetting_and_bwt_hand_examples():
  # Monotone decay: forgetting = -bwt = ((90-60) + (70-65)) / 2.
  R = metrics.accuracy_matrix([[90], [80, 70], [60, 65, 75]])
  assert metrics.forgetting(R) == pytest.approx(17.5)
  assert metrics.bwt(R) == pytest.approx(-17.5)
  # Backward improvement: forgetting uses the running max (incl. last task),
  # bwt the diagonal. Task 0: max 60 → 55 (5); task 1: max 85 = last (0).
  R = metrics.accuracy_matrix([[50], [60, 80], [55, 85, 90]])
  assert metrics.forgetting(R) == pytest.approx(2.5)
  assert metrics.bwt(R) == pytest.approx(5.0)  # ((55-50) + (85-80)) / 2


def test_single_task_summary():
  s = metrics.summarize([[88.5]], [88.5])
  assert s["acc"] == s["aaa"] == s["acc_task_mean"] == 88.5
  assert math.isnan(s["forgetting"]) and math.isnan(s["bwt"])
  assert math.isnan(s["acc_top5"])


def test_evaluate_counts_hand_example():
  # Task 0: 90/100, task 1: 10/50. Sample-weighted 100/150; task mean (90+20)/2.
  e = metrics.evaluate_counts([90, 10], [100, 50], correct_top5=[99, 40])
  assert e["top1_per_task"] == [90.0, 20.0]
  assert e["top1_sample_weighted"] == 66.67
  assert e["top1_task_mean"] == 55.0
  assert e["top5_per_task"] == [99.0, 80.0]
  assert e["top5_sample_weighted"] == 92.67  # 139/150
  assert e["top5_task_mean"] == 89.5
  assert metrics.evaluate_counts([1], [3])["top5_sample_weighted"] is None


def test_evaluate_counts_rejects_bad_counts():
  with pytest.raises(ValueError):
    metrics.evaluate_counts([1, 2], [3, 0])
  with pytest.raises(ValueError):
    metrics.evaluate_counts([4], [3])
  with pytest.raises(ValueError):
    metrics.evaluate_counts([1, 2], [3])


def test_percent_is_reference_rounding():
  for c, n in [(1, 3), (2, 3), (5, 8), (1519, 1519), (0, 7), (8906, 15190)]:
    assert metrics.percent(c, n) == np.around(c * 100 / n, decimals=2)


def test_count_correct():
  sizes = [2, 3]  # labels 0,1 → task 0; 2,3,4 → task 1
  labels = np.array([0, 1, 2, 3, 4, 4])
  topk = np.array([[0, 1, 2, 3, 4],   # top-1 hit
                   [0, 2, 3, 4, 1],   # top-5 hit only
                   [2, 0, 1, 3, 4],   # top-1 hit
                   [0, 1, 2, 4, 3],   # top-5 hit only
                   [4, 0, 1, 2, 3],   # top-1 hit
                   [0, 1, 2, 3, 2]])  # miss
  c1, c5, n = metrics.count_correct(labels, topk, metrics.class_to_task(sizes), 2)
  assert c1.tolist() == [1, 2] and c5.tolist() == [2, 3] and n.tolist() == [2, 4]
  with pytest.raises(ValueError):
    metrics.count_correct(labels, topk, metrics.class_to_task(sizes), 1)


def test_accuracy_matrix_validation():
  R = metrics.accuracy_matrix([[1.0, None], [2.0, 3.0]])
  assert np.isnan(R[0, 1]) and R[1, 1] == 3.0
  with pytest.raises(ValueError):
    metrics.accuracy_matrix([[1.0], [2.0]])  # row 1 too short
  with pytest.raises(ValueError):
    metrics.accuracy_matrix([[1.0], [None, 3.0]])  # hole below the diagonal
  with pytest.raises(ValueError):
    metrics.summarize([[1.0]], [1.0, 2.0])  # curve longer than the matrix


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6).flatmap(lambda T: st.lists(
    st.floats(0, 100, allow_nan=False), min_size=T * T, max_size=T * T)))
def test_forgetting_bounds(values):
  T = int(round(math.sqrt(len(values))))
  R = np.tril(np.array(values).reshape(T, T))
  R[np.triu_indices(T, 1)] = np.nan
  f, b = metrics.forgetting(R), metrics.bwt(R)
  if T == 1:
    assert math.isnan(f) and math.isnan(b)
  else:
    # Every forgetting term is ≥ 0 and ≥ the matching −bwt term (max ≥ diagonal).
    assert f >= 0 and f >= -b - 1e-9


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5).flatmap(lambda T: st.tuples(
    st.integers(1, 200), st.lists(st.integers(0, 10**6), min_size=T, max_size=T))))
def test_equal_sizes_task_mean_close_to_sample_weighted(args):
  n, raw = args
  correct = [r % (n + 1) for r in raw]
  e = metrics.evaluate_counts(correct, [n] * len(correct))
  # Only the per-task rounding separates the two when test sizes are equal.
  assert abs(e["top1_task_mean"] - e["top1_sample_weighted"]) <= 0.0100001


# --- reference numbers --------------------------------------------------------

SPEC_VALUES = [
    # (benchmark, method, kind, acc, aaa), typed from docs/semantics.md §8.
    ("imagenet_r_5", "sdlora", "paper", 79.15, 83.01),
    ("imagenet_r_20", "sdlora_rr", "paper", 74.05, 80.65),
    ("imagenet_a_10", "sdlora_kd", "paper", 54.24, 63.89),
    ("domainnet_5", "sdlora", "paper", 72.82, 78.89),
    ("cub200_10", "sdlora_rr", "paper", 76.35, 83.89),
    ("cifar100_10", "sdlora_kd", "paper", 87.09, 92.01),
    ("imagenet_r_10", "sdlora", "official_log", 78.17, 82.59),
    ("imagenet_r_20", "sdlora", "official_log", 75.13, 79.80),
    ("imagenet_a_10", "sdlora", "official_log", 58.66, 68.77),
    ("imagenet_r_10", "sdlora", "libcontinual", 78.35, 83.16),
    ("imagenet_r_20", "sdlora_kd", "libcontinual", 76.00, 81.48),
    ("cifar100_10", "sdlora_rr", "libcontinual", 87.14, 92.27),
]


@pytest.mark.parametrize("bench,method,kind,acc,aaa", SPEC_VALUES)
def test_reference_values_match_spec(bench, method, kind, acc, aaa):
  (entry,) = [e for e in reference_numbers.references(bench, method)
              if e["kind"] == kind]
  assert entry["acc"] == acc
  assert round(entry["aaa"], 2) == aaa
  assert entry["source"]


def test_reference_standard_errors_and_lookup():
  (paper,) = [e for e in reference_numbers.references("imagenet_a_10", "SD-LoRA")
              if e["kind"] == "paper"]
  assert (paper["acc_se"], paper["aaa_se"]) == (0.73, 1.63)
  assert reference_numbers.references("fashion_mnist_5", "sdlora") == []
  assert reference_numbers.references("imagenet_r_10", "lora") == []
  assert reference_numbers.normalize_method("SD-LoRA-RR") == "sdlora_rr"
  assert set(reference_numbers.benchmarks()) == {
      "imagenet_r_5", "imagenet_r_10", "imagenet_r_20", "imagenet_a_10",
      "domainnet_5", "cifar100_10", "cub200_10"}
  for bench, by_method in reference_numbers.load()["references"].items():
    assert set(by_method) == set(reference_numbers.PUBLISHED_METHODS), bench


def test_official_log_entries_consistent_with_matrices():
  # The swapped file names: InR-T20.log is N=10, InR-T10.log is N=20.
  expected = {"InR-T5.log": "imagenet_r_5", "InR-T20.log": "imagenet_r_10",
              "InR-T10.log": "imagenet_r_20", "InA.log": "imagenet_a_10",
              "C100.log": "cifar100_10"}
  for log_file, bench in expected.items():
    (entry,) = [e for e in reference_numbers.references(bench, "sdlora")
                if e["kind"] == "official_log"]
    log = LOGS[log_file]
    assert entry["log_file"] == log_file
    assert entry["curve_top1"] == log["top1_curve"]
    assert entry["acc"] == log["final_top1"]
    assert entry["aaa"] == pytest.approx(log["mean_top1_curve"], abs=1e-9)
    assert reference_numbers.benchmarks()[bench]["num_tasks"] == log["n_tasks"]
    assert entry["forgetting_numeric"] == SPEC_FORGETTING[log_file]
    assert entry["forgetting_printed"] == SPEC_PRINTED_FORGETTING[log_file]


def test_format_matrix_rows_columns_and_blanks():
  R = metrics.accuracy_matrix([[73.6], [0.0, 98.8]])
  text = metrics.format_matrix(R, ["00-01", "02-03"])
  lines = text.splitlines()
  assert lines[0].split() == ["after", "task", "00-01", "02-03"]
  assert lines[1].split() == ["1", "73.6"]          # upper triangle left blank
  assert lines[2].split() == ["2", "0.0", "98.8"]
