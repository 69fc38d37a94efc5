"""The speed benchmark end to end, at the smallest settings.

Runs ``python -m experiments.benchmark`` once in a fresh process (so compile
counts see only the benchmark) and checks the table's structure and its
non-timing facts: one compilation of the train step for a whole run, the
same program whatever the number of stored tasks, donated inputs. Timing
ratios are never asserted here.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = (0, 1, 5)
ARGS = ["--model=vit_ti16", "--depth=4", "--image_size=32", "--batch=2",
        f"--tasks={','.join(map(str, TASKS))}", "--repeats=1",
        "--run_capacity=8", "--pipeline_batch=8", "--pipeline_batches=2",
        "--workers=2", "--profile=5"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "table.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", *ARGS, f"--json_out={path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  data["stdout"] = proc.stdout
  data["by_name"] = {r["name"]: r for r in data["rows"]}
  return data


def test_table_has_every_row(result):
  rows = result["by_name"]
  expected = [f"train step, t={t} (capacity 100)" for t in TASKS] + [
      "plain LoRA train step (rank 10)",
      "train step, t=0 (capacity 8)",
      "train step compile time (trace+lower+compile)",
      "train step compilations, simulated 20-task run",
      "train step compilations, whole benchmark (t sweep + run)",
      "compile counter self-check (2 shapes: 2 compilations)",
      "train step jaxpr equations, t=0",
      "train step jaxpr equations, t=5",
      "host callbacks or transfers in the train step",
      "on-device loop primitives in the train step",
      "train step inputs donated",
      "host time to dispatch a train step",
      "FLOPs per train step (XLA cost analysis, loop bodies once)",
      "FLOPs per train step t=0 (analytic)",
      "FLOPs per train step t=5 (analytic)",
      "FLOPs per plain LoRA step (XLA cost analysis)",
      "eval forward, plain ViT",
      "eval forward, merged parameters t=0",
      "eval forward, merged parameters t=5",
      "merge (once per task)",
      "images/s the train step consumes (t=0)",
      "peak host memory after the simulated run",
      "peak host memory, whole benchmark",
      "matmul peak, XLA (f32 2048^3, best of 5)",
      "FLOPs per eval forward (XLA cost analysis)",
      "step(t=19) / step(t=0)",
      "step(t=99) / step(t=0)",
      "step(t=0) / plain LoRA step (capacity 100)",
      "step(t=0) / plain LoRA step (capacity 8)",
      "merged eval (t=5) / plain ViT eval",
      "JPEG pipeline / train step images/s",
      "InfLoRA train step, t=0 (rank 10)",
      "InfLoRA train step, t=5 (rank 10)",
      "InfLoRA train step compilations, t=0 and t=5",
      "InfLoRA step / SD-LoRA step (t=0)",
      "InfLoRA step / SD-LoRA step (t=5)",
      "FLOPs per InfLoRA train step (XLA cost analysis)",
  ]
  missing = [name for name in expected if name not in rows]
  assert not missing, missing
  pipeline = [n for n in rows if n.startswith("input pipeline, ")]
  assert len(pipeline) == 2 and all(rows[n]["value"] > 0 for n in pipeline)
  for t in TASKS:
    assert rows[f"train step, t={t} (capacity 100)"]["value"] > 0
  # Every row is printed, and the JSON matches the printed table.
  for name in rows:
    assert name in result["stdout"]


def test_profile_rows_name_model_ops(result):
  rows = [r for r in result["rows"] if r["name"].startswith("profile t=0: ")]
  assert len(rows) == 5
  assert all(r["value"] > 0 and r["unit"] == "ms" for r in rows)
  # Sorted by time, and mapped to HLO op names with the blocks merged.
  assert [r["value"] for r in rows] == sorted((r["value"] for r in rows),
                                              reverse=True)
  assert any("blocks_*/" in r["name"] and "dot_general" in r["name"]
             for r in rows), [r["name"] for r in rows]


def test_one_compilation_per_run(result):
  rows = result["by_name"]
  assert rows["compile counter self-check (2 shapes: 2 compilations)"][
      "verdict"] == "PASS"
  sim = rows["train step compilations, simulated 20-task run"]
  assert sim["value"] == 1 and sim["verdict"] == "PASS"
  whole = rows["train step compilations, whole benchmark (t sweep + run)"]
  assert whole["value"] == 1 and whole["verdict"] == "PASS"


def test_program_does_not_grow_with_tasks(result):
  rows = result["by_name"]
  n0 = rows["train step jaxpr equations, t=0"]["value"]
  n5 = rows["train step jaxpr equations, t=5"]
  assert n0 > 0 and n5["value"] == n0 and n5["verdict"] == "PASS"
  assert rows["host callbacks or transfers in the train step"]["value"] == "none"
  assert rows["train step inputs donated"]["value"] is True


def test_inflora_step_against_sd_loras(result):
  # InfLoRA's step after t tasks: one program for every t (its updates are
  # merged into the kernels), timed beside SD-LoRA's at the same t.
  rows = result["by_name"]
  programs = rows["InfLoRA train step compilations, t=0 and t=5"]
  assert programs["value"] == 1 and programs["verdict"] == "PASS"
  for t in (0, 5):
    inf = rows[f"InfLoRA train step, t={t} (rank 10)"]["value"]
    sd = rows[f"train step, t={t} (capacity 100)"]["value"]
    r = rows[f"InfLoRA step / SD-LoRA step (t={t})"]
    assert inf > 0 and r["unit"] == "x" and r["verdict"] == ""
    assert r["value"] == pytest.approx(inf / sd, rel=1e-6)
  # Its B gradient goes through the whole qkv kernel's gradient (weight
  # form): more than the plain LoRA step's products on the activations.
  assert (rows["FLOPs per InfLoRA train step (XLA cost analysis)"]["value"] >
          rows["FLOPs per plain LoRA step (XLA cost analysis)"]["value"])


def test_not_applicable_targets_say_so(result):
  rows = result["by_name"]
  # No t=19/99 timed, and not ViT-S/16.
  for name in ("step(t=19) / step(t=0)", "JPEG pipeline / train step images/s"):
    assert rows[name]["verdict"] == "n/a"
  for row in result["rows"]:
    assert row["verdict"] in ("", "PASS", "FAIL", "n/a"), row


def test_analytic_flops_match_xla(result):
  # At t=0 the SD-LoRA step does the plain LoRA step's matmuls plus a
  # magnitude; the plain step has no loops, so XLA counts it exactly.
  rows = result["by_name"]
  xla = rows["FLOPs per plain LoRA step (XLA cost analysis)"]["value"]
  hand = rows["FLOPs per train step t=0 (analytic)"]["value"]
  assert xla == pytest.approx(hand, rel=0.1)
  # XLA's static count of the SD-LoRA step includes every loop body once.
  assert rows["FLOPs per train step (XLA cost analysis, loop bodies once)"][
      "value"] > hand


def test_counter_self_check_in_process():
  assert benchmark.counter_self_check()


def test_settings_reject_small_capacity():
  with pytest.raises(ValueError, match="capacity"):
    benchmark.Settings(tasks=(0, 99), capacity=50)


def test_a_rank_schedule_compiles_the_train_step_once():
  """SD-LoRA-RR's ranks (here 4 → 2) share the step's one compilation."""
  from experiments.benchmark import (  # pylint: disable=import-outside-toplevel
      compile_checks, settings, workload)
  s = settings.Settings(model="vit_ti16", image_size=16, patch_size=8,
                        depth=1, batch=2, num_classes=4, rank=4, capacity=4,
                        tasks=(0, 2), sim_tasks=3, run_capacity=4)
  sd = workload.SDLoRA(workload.Workload(s))
  assert compile_checks.rank_schedule_compilations(sd) == 1


def test_adapter_form_weight_is_the_same_step_on_the_kernels():
  """--adapter_form=weight reaches the plug-in's loss (no stored-direction
  loops: every slot merged into the kernels) and gives the activation
  form's step up to rounding."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from experiments.benchmark import (  # pylint: disable=import-outside-toplevel
      compile_checks, settings, workload)
  out = {}
  for form in ("activation", "weight"):
    s = settings.Settings(model="vit_ti16", image_size=16, patch_size=8,
                          depth=1, batch=2, num_classes=6, rank=4, capacity=4,
                          tasks=(0, 2), sim_tasks=3, run_capacity=4,
                          adapter_form=form)
    w = workload.Workload(s)
    sd = workload.SDLoRA(w)
    ad = sd.ops.randomize(sd.ops.begin(sd.stored_states((1,))[1],
                                       jax.random.key(1)), jax.random.key(2))
    state = sd.train_state(ad, workload.fresh_copy(w.head0))
    before = jax.tree.map(np.asarray, state.arrays)
    args = (state, w.batch_for(0), w.task(0), w.backbone)
    _, prims = compile_checks.jaxpr_stats(jax.make_jaxpr(sd.step)(*args))
    new, metrics = sd.step(*args)
    update = jax.tree.map(lambda a, b: np.asarray(a) - b, new.arrays, before)
    out[form] = (float(metrics["loss"]), update, prims)
  (loss_a, upd_a, prims_a), (loss_w, upd_w, prims_w) = out.values()
  assert "while" in prims_a and "while" not in prims_w
  # The forwards merge the same ΔW into the kernels; the gradients sum over
  # the batch's tokens and the width in different orders.
  eps = np.finfo(np.float32).eps
  n = 2 * w.cfg.seq_len + w.cfg.width
  assert loss_w == pytest.approx(loss_a, rel=n * eps)
  for a, b in zip(jax.tree.leaves(upd_a), jax.tree.leaves(upd_w)):
    np.testing.assert_allclose(b, a, rtol=0,
                               atol=n * eps * float(np.max(np.abs(a))))
