"""Tests for slora_jax.runner.results (results.json, plots) and experiments.compare."""

import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
import numpy as np
import pytest

from experiments import compare
from slora_jax.runner import results

REPO = pathlib.Path(__file__).resolve().parents[1]


def _payload(benchmark="imagenet_r_10", seed=1993, acc=77.0, aaa=82.0,
             method="sdlora", T=2, task_il=None, **config):
  """A small valid payload whose summary acc/aaa are set to the given values;
  with ``task_il`` (a curve), task-IL fields too."""
  rows = [[80.0 + t - k for k in range(t + 1)] for t in range(T)]
  curve = [aaa] * T
  if task_il is not None:
    til = [[90.0 - t - k for k in range(t + 1)] for t in range(T)]
    counts = [[10 + k for k in range(t + 1)] for t in range(T)]
    config_til = dict(acc_matrix_task_il=til,
                      curve_task_il_top1_sample_weighted=task_il,
                      cross_task={"task_sizes": [4] * T, "count": counts,
                                  "top1": counts, "task_il_top1": counts,
                                  "to_earlier": counts, "to_later": counts,
                                  "errors": {"after_task": T - 1,
                                             "pairs": [[0, 5, 2]]}})
  else:
    config_til = {}
  p = results.make_payload(**config_til,
      config=dict(config, **({"benchmark": benchmark} if benchmark else {})),
      seed=seed, class_order=list(range(4 * T)), task_sizes=[4] * T,
      method=method, semantics="reference", acc_matrix=rows,
      curve_top1_sample_weighted=curve,
      per_task=[{"task": t, "wall_time_s": 1.5, "train_images_per_s": 100.0,
                 "steps": 10, "eval_time_s": 0.5} for t in range(T)],
      backbone={"name": "vit_b16", "checkpoint_path": None, "sha256": None})
  # Pin the headline numbers so the expected comparison is simple arithmetic.
  p["summary"]["acc"], p["summary"]["aaa"] = acc, aaa
  return p


def _write(tmp_path, name, payload):
  return results.write_results(tmp_path / name, payload)


# --- results.py ---------------------------------------------------------------

def test_write_load_roundtrip_no_nan(tmp_path):
  p = _payload(T=1, lr=np.float32(0.01), steps=np.int64(3))
  p["extra_array"] = np.array([1.0, np.nan, np.inf])
  path = results.write_results(tmp_path / "run", p)
  assert path == os.fspath(tmp_path / "run" / "results.json")
  text = pathlib.Path(path).read_text()
  assert "NaN" not in text and "Infinity" not in text
  d = results.load_results(tmp_path / "run")  # a directory works too
  assert d["summary"]["forgetting"] is None and d["summary"]["bwt"] is None
  assert d["extra_array"] == [1.0, None, None]
  assert d["config"]["lr"] == pytest.approx(0.01) and d["config"]["steps"] == 3
  assert d["acc_matrix"] == [[80.0]]
  assert d["schema_version"] == 1 and d["created_utc"] and d["written_utc"]
  assert set(d["versions"]) == {"slora_jax", "jax", "jaxlib", "flax", "optax",
                                "orbax", "numpy", "python"}
  assert [f.name for f in (tmp_path / "run").iterdir()] == ["results.json"]


def test_make_payload_summary_and_curves():
  p = results.make_payload(
      config={}, seed=0, class_order=[1, 0, 3, 2], task_sizes=[2, 2],
      method="sdlora", semantics={"name": "paper"},
      acc_matrix=[[90.0], [70.0, 80.0]], curve_top1_sample_weighted=[90.0, 76.0])
  assert p["acc_matrix"] == [[90.0, None], [70.0, 80.0]]
  assert p["curves"]["top1_task_mean"] == [90.0, 75.0]
  assert p["curves"]["top5_sample_weighted"] is None
  s = p["summary"]
  assert (s["acc"], s["aaa"], s["acc_task_mean"], s["aaa_task_mean"]) == (
      76.0, 83.0, 75.0, 82.5)
  assert (s["forgetting"], s["bwt"]) == (20.0, -20.0)
  assert s["acc_top5"] is None


def test_load_results_errors(tmp_path):
  with pytest.raises(results.ResultsError, match="no such file"):
    results.load_results(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(results.ResultsError, match="invalid JSON"):
    results.load_results(bad)
  bad.write_text(json.dumps({"summary": {"acc": 1.0}}))
  with pytest.raises(results.ResultsError, match="summary.aaa"):
    results.load_results(bad)
  with pytest.raises(results.ResultsError):
    results.write_results(tmp_path, {"summary": {}})
  assert not (tmp_path / "results.json").exists()


def test_sha256_file(tmp_path):
  f = tmp_path / "ckpt.bin"
  f.write_bytes(b"abc")
  assert results.sha256_file(f) == (
      "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
  assert results.sha256_file(tmp_path / "nope") is None


@pytest.mark.parametrize("T", [1, 5, 20])
def test_plot_results(tmp_path, T):
  p = _payload(T=T)
  p["curves"]["top5_sample_weighted"] = [95.0] * T
  out = results.plot_results(p, tmp_path / "plots" / "run.png")
  data = pathlib.Path(out).read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# --- compare.py ---------------------------------------------------------------

def test_compare_two_seeds_against_references(tmp_path):
  f1 = _write(tmp_path, "a", _payload(seed=1993, acc=77.0, aaa=82.0))
  f2 = _write(tmp_path, "b", _payload(seed=1994, acc=78.0, aaa=83.0))
  f3 = _write(tmp_path, "c", _payload(benchmark="fashion_mnist_5", seed=0,
                                      acc=90.0, aaa=93.0))
  out, err = io.StringIO(), io.StringIO()
  json_out = tmp_path / "cmp" / "comparison.json"
  assert compare.run([f1, f2, f3], json_out=str(json_out), stream=out, err=err) == 0
  text = out.getvalue()
  assert err.getvalue() == ""
  lines = text.splitlines()

  # Hand-computed: mean 77.5, sample std sqrt(((-.5)^2 + .5^2) / 1) = 0.7071,
  # se = std / sqrt(2) = 0.5; AAA likewise 82.5 ± 0.71 (se 0.50).
  (head,) = [l for l in lines if l.startswith("== imagenet_r_10")]
  assert "method sdlora" in head and "2 runs (seeds 1993, 1994)" in head
  (acc_row,) = [l for l in lines if l.strip().startswith("Acc")
                and "77.50" in l]
  assert "77.50 ± 0.71" in acc_row and " 0.50 " in acc_row
  # Paper Table 2 N=10: 77.34 (se 0.35) → +0.16; AAA 82.04 → +0.46.
  assert "77.34   0.35  +0.16   paper Table 2" in acc_row
  row = lambda s: next(l for l in lines if s in l)  # noqa: E731
  assert "82.50 ± 0.71" in row("AAA    82.50")
  assert "82.04   0.24  +0.46   paper Table 2" in row("82.04")
  # Official log InR-T20.log (true N=10): 78.17 → -0.67; AAA 82.587 → -0.09.
  assert "78.17    n/a  -0.67   official log InR-T20.log" in row("78.17")
  assert "82.59    n/a  -0.09   official log InR-T20.log" in row("82.59")
  # LibContinual B20-20-10: 78.35 → -0.85; 83.16 → -0.66.
  assert "78.35    n/a  -0.85   LibContinual" in row("78.35")
  assert "83.16    n/a  -0.66   LibContinual" in row("83.16")
  # Benchmarks without a published number say so.
  fm = text[text.index("== fashion_mnist_5"):]
  assert "1 run (seed 0)" in fm and "90.00 ± n/a" in fm
  assert fm.count("no published reference") == 2

  cmp = json.loads(json_out.read_text())
  g = {x["benchmark"]: x for x in cmp["groups"]}
  r10 = g["imagenet_r_10"]
  assert r10["acc"]["mean"] == pytest.approx(77.5)
  assert r10["acc"]["std"] == pytest.approx(math.sqrt(0.5))
  assert r10["acc"]["se"] == pytest.approx(0.5)
  assert r10["seeds"] == [1993, 1994]
  kinds = [r["kind"] for r in r10["references"]]
  assert kinds == ["paper", "official_log", "libcontinual"]
  assert r10["references"][1]["aaa_diff"] == pytest.approx(82.5 - 82.587)
  assert g["fashion_mnist_5"]["acc"]["std"] is None
  assert g["fashion_mnist_5"]["references"] == []


def test_compare_groups_by_method_semantics_and_custom(tmp_path):
  f1 = _write(tmp_path, "a", _payload(method="SD-LoRA-RR", acc=77.0))
  f2 = _write(tmp_path, "b", _payload(method="sdlora_rr", seed=1994, acc=79.0))
  f3 = _write(tmp_path, "c", _payload(benchmark=None))
  out = io.StringIO()
  assert compare.run([f1, f2, f3], stream=out, err=io.StringIO()) == 0
  text = out.getvalue()
  assert "== imagenet_r_10 | method sdlora_rr | semantics reference | 2 runs" in text
  assert "78.00 ± 1.41" in text  # std of (77, 79) = sqrt(2)
  assert "77.18   0.39  +0.82   paper Table 2" in text  # RR, N=10
  assert "== custom | method sdlora" in text


def test_compare_missing_and_invalid_files(tmp_path):
  good = _write(tmp_path, "a", _payload())
  err = io.StringIO()
  missing = tmp_path / "nope" / "results.json"
  assert compare.run([good, str(missing)], stream=io.StringIO(), err=err) == 2
  assert err.getvalue().count("\n") == 1
  assert err.getvalue().startswith("error: ") and "no such file" in err.getvalue()
  bad = tmp_path / "bad.json"
  bad.write_text("[1, 2]")
  err = io.StringIO()
  assert compare.run([str(bad)], stream=io.StringIO(), err=err) == 2
  assert "expected a JSON object" in err.getvalue()
  assert compare.run([], stream=io.StringIO(), err=io.StringIO()) == 2


def test_compare_command_line_exit_code(tmp_path):
  good = _write(tmp_path, "a", _payload())
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.compare", good,
       str(tmp_path / "missing.json")],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "missing.json: no such file" in proc.stderr


def test_compare_main_parses_json_flag(tmp_path, capsys):
  good = _write(tmp_path, "a", _payload())
  out = tmp_path / "c.json"
  argv = flags.FLAGS(["compare", good, "--json", str(out)])
  try:
    assert compare.main(argv) == 0
  finally:
    flags.FLAGS.unparse_flags()
  assert "paper Table 2" in capsys.readouterr().out
  assert json.loads(out.read_text())["groups"][0]["acc"]["n"] == 1


def test_compare_names_absent_reference_kinds_and_caveats(tmp_path):
  f1 = _write(tmp_path, "a", _payload(benchmark="cub200_10"))
  f2 = _write(tmp_path, "b", _payload(method="sdlora_rr"))
  f3 = _write(tmp_path, "c", _payload())
  out = io.StringIO()
  json_out = tmp_path / "c.json"
  assert compare.run([f1, f2, f3], json_out=str(json_out), stream=out,
                     err=io.StringIO()) == 0
  blocks = {b.splitlines()[0].split(" | ")[0][3:] + " " + b.split(" | ")[1]: b
            for b in out.getvalue().split("\n\n") if b.startswith("==")}
  absent = "no number published for this benchmark and method in: "
  assert absent + "official log, LibContinual rerun" in blocks[
      "cub200_10 method sdlora"]
  assert absent + "official log\n" in blocks["imagenet_r_10 method sdlora_rr"]
  r10 = blocks["imagenet_r_10 method sdlora"]
  assert absent not in r10        # all three kinds are published
  assert "note on the official log: File name says T20" in r10
  assert "note on the LibContinual rerun: LibContinual re-implementation" in r10
  g = {(x["benchmark"], x["method"]): x
       for x in json.loads(json_out.read_text())["groups"]}
  assert g["cub200_10", "sdlora"]["unpublished_kinds"] == [
      "official_log", "libcontinual"]
  log = g["imagenet_r_10", "sdlora"]["references"][1]
  assert (log["kind"], log["seed"], log["n_runs"]) == ("official_log", 1996, 1)
  assert g["imagenet_r_10", "sdlora"]["references"][0]["n_runs"] == 5


def test_compare_refuses_runs_over_different_data(tmp_path):
  a = _payload(seed=1993, acc=70.0)
  b = _payload(seed=1994, acc=74.0)
  a["data_manifest"] = {"sha256": "a" * 64}
  b["data_manifest"] = {"sha256": "b" * 64}
  files = [_write(tmp_path, "a", a), _write(tmp_path, "b", b)]
  out, err = io.StringIO(), io.StringIO()
  assert compare.run(files, stream=out, err=err) == 2
  assert err.getvalue().splitlines() == [
      "error: the runs of imagenet_r_10/sdlora/reference read "
      f"different data (data manifests {'a' * 12} (1 run), {'b' * 12} (1 run)); "
      "compare runs over the same data, or pass --mixed_data to average them "
      "anyway"]
  assert out.getvalue() == ""
  out = io.StringIO()
  assert compare.run(files, stream=out, err=err, mixed_data=True) == 0
  assert (f"   note: averaged over different data (--mixed_data), manifests "
          f"{'a' * 12}, {'b' * 12}") in out.getvalue().splitlines()
  assert "Acc    72.00 ± 2.83" in out.getvalue()
  # The same data: one group, its manifest named.
  b["data_manifest"] = a["data_manifest"]
  files[1] = _write(tmp_path, "b", b)
  out = io.StringIO()
  assert compare.run(files, stream=out, err=err) == 0
  assert f"   data manifest {'a' * 12}" in out.getvalue().splitlines()


def _partial_payload(done=2, T=5, seed=1995, acc=20.0):
  """A run stopped after ``done`` of its ``T`` tasks."""
  rows = [[80.0 - k for k in range(t + 1)] for t in range(done)]
  p = results.make_payload(
      config={"benchmark": "imagenet_r_10"}, seed=seed,
      class_order=list(range(4 * T)), task_sizes=[4] * T, method="sdlora",
      semantics="reference", acc_matrix=rows,
      curve_top1_sample_weighted=[acc] * done)
  return p


def test_compare_refuses_a_partial_run_in_one_line(tmp_path):
  p = _partial_payload()
  assert p["complete"] is False and _payload()["complete"] is True
  done = _write(tmp_path, "a", _payload(seed=1993, acc=77.0))
  part = _write(tmp_path, "b", p)
  err = io.StringIO()
  assert compare.run([done, part], stream=io.StringIO(), err=err) == 2
  assert err.getvalue() == (
      f"error: {part}: unfinished run (2 of 5 tasks evaluated), its "
      "numbers are not final; rerun its command to finish it, or pass "
      "--allow_partial to list it apart\n")
  # A file written before the flag existed is judged by its rows.
  legacy = json.loads(pathlib.Path(part).read_text())
  del legacy["complete"]
  (tmp_path / "legacy.json").write_text(json.dumps(legacy))
  err = io.StringIO()
  assert compare.run([str(tmp_path / "legacy.json")], stream=io.StringIO(),
                     err=err) == 2
  assert "unfinished run (2 of 5 tasks evaluated)" in err.getvalue()


def test_compare_allow_partial_keeps_partial_runs_apart(tmp_path):
  files = [_write(tmp_path, "a", _payload(seed=1993, acc=77.0)),
           _write(tmp_path, "b", _payload(seed=1994, acc=79.0)),
           _write(tmp_path, "c", _partial_payload(acc=20.0))]
  out, json_out = io.StringIO(), tmp_path / "c.json"
  assert compare.run(files, json_out=str(json_out), stream=out,
                     err=io.StringIO(), allow_partial=True) == 0
  text = out.getvalue()
  assert "| 2 runs (seeds 1993, 1994)\n" in text and "78.00 ± 1.41" in text
  assert ("== imagenet_r_10 | method sdlora | semantics reference | 1 run "
          "(seed 1995) | PARTIAL: 2 of 5 tasks evaluated") in text
  part = text[text.index("PARTIAL"):]
  assert "20.00 ± n/a" in part and "paper" not in part
  assert part.count("not final: not set against any reference") == 2
  groups = json.loads(json_out.read_text())["groups"]
  assert [(g["partial"], g["acc"]["values"]) for g in groups] == [
      (None, [77.0, 79.0]), ("2/5", [20.0])]


def test_compare_shows_task_il_and_says_when_a_run_predates_it(tmp_path):
  f1 = _write(tmp_path, "a", _payload(seed=1993, task_il=[92.0, 88.0]))
  f2 = _write(tmp_path, "b", _payload(seed=1994, task_il=[93.0, 89.0]))
  f3 = _write(tmp_path, "c", _payload(benchmark="fashion_mnist_5"))
  out = io.StringIO()
  assert compare.run([f1, f2, f3], stream=out, err=io.StringIO()) == 0
  lines = out.getvalue().splitlines()
  # Acc: the curves' last values 88, 89; AAA: their means 90, 91.
  assert ("   task-IL (each image against its own task's classes): Acc 88.50 "
          "± 0.71  AAA 90.50 ± 0.71") in lines
  assert "   task-IL: n/a, 1 of 1 run(s) predate task-IL" in lines
  d = results.load_results(f1)
  assert d["summary"]["forgetting_task_il"] == 1.0   # 90 -> 89 on task 1
  assert d["acc_matrix_task_il"] == [[90.0, None], [89.0, 88.0]]


@pytest.mark.parametrize("field,value,message", [
    (("acc_matrix_task_il", 1, 0), None,
     "'acc_matrix_task_il[1][0]' must be a number, got None"),
    (("acc_matrix_task_il",), [[90.0]],
     "'acc_matrix_task_il' must be a list of 2 rows like 'acc_matrix'"),
    (("curves", "task_il_top1_sample_weighted"), [90.0],
     "'curves.task_il_top1_sample_weighted' has 1 values for 2 rows"),
    (("cross_task", "to_later"), [[1]],
     "'cross_task.to_later' must hold 2 rows, one per evaluation"),
    (("cross_task", "top1", 1), [1, -1],
     "'cross_task.top1[1]' must be a list of counts, got [1, -1]"),
    (("cross_task", "top1", 1), [1],
     "'cross_task.top1[1]' has 1 tasks; 'count' has 2"),
    (("cross_task", "errors", "pairs"), [[0, 5]],
     "'cross_task.errors.pairs[0]' must be [label, predicted, n]"),
    (("cross_task", "errors"), None, None),     # not every task evaluated
])
def test_validation_checks_the_task_il_fields(tmp_path, field, value, message):
  d = json.loads(pathlib.Path(_write(tmp_path, "a", _payload(
      task_il=[92.0, 88.0]))).read_text())
  node = d
  for k in field[:-1]:
    node = node[k]
  node[field[-1]] = value
  if message is None:
    results.validate_results(d)
    return
  with pytest.raises(results.ResultsError, match=re.escape(f"x: {message}")):
    results.validate_results(d, where="x")


@pytest.mark.parametrize("field,value,message", [
    (("acc_matrix", 1, 0), "80.0",
     "'acc_matrix[1][0]' must be a number, got '80.0'"),
    (("acc_matrix", 0, 1), 5.0, None),          # above the diagonal: allowed
    (("curves", "top1_sample_weighted", 0), "82",
     "'curves.top1_sample_weighted[0]' must be a number, got '82'"),
    (("summary", "forgetting"), "1.5",
     "'summary.forgetting' must be a number or null, got '1.5'"),
    (("seed",), "1993", "'seed' must be an integer, got '1993'"),
    (("task_sizes",), [4, "4"], "'task_sizes' must be a list of integers"),
    (("method",), 3, "'method' must be a string, got 3"),
    (("complete",), "yes", "'complete' must be true or false, got 'yes'"),
    (("complete",), False, "'complete' is false but 2 of 2 tasks are "
     "evaluated"),
])
def test_compare_checks_every_field_type(tmp_path, field, value, message):
  d = json.loads(pathlib.Path(_write(tmp_path, "a", _payload())).read_text())
  node = d
  for k in field[:-1]:
    node = node[k]
  node[field[-1]] = value
  path = tmp_path / "edited.json"
  path.write_text(json.dumps(d))
  err = io.StringIO()
  code = compare.run([str(path)], stream=io.StringIO(), err=err)
  if message is None:
    assert code == 0, err.getvalue()
    return
  assert code == 2 and err.getvalue().count("\n") == 1, err.getvalue()
  assert err.getvalue().startswith(f"error: {path}: {message}")


def test_printed_lines_show_task_il_beside_class_il():
  from slora_jax.runner import report  # pylint: disable=import-outside-toplevel
  record = {"task": 1, "top1_sample_weighted": 57.2, "top1_per_task": [50.0,
            64.4], "task_il_top1_sample_weighted": 88.1, "wall_time_s": 3.0,
            "train_images_per_s": 100.0}
  assert report.task_line(record, 2).startswith(
      "task 2/2: top-1 57.20 (task-IL 88.10)  per task [50.0, 64.4]")
  lines = report.final_lines(_payload(task_il=[92.0, 88.0]), 1993, 5.0,
                             "r/results.json").splitlines()
  assert lines[-2] == ("  task-IL (each image against its own task's "
                       "classes): Acc 88.00  AAA 90.00  forgetting 1.00")
  old = report.final_lines(_payload(), 1993, 5.0, "r/results.json")
  assert "task-IL" not in old
