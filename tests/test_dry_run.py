"""The dry run (``--config.dry_run=True``): every paper config's whole task
loop, capped, with the step's memory, FLOPs and projected wall time."""

import hashlib
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_util import ROOT, cli_env, run_cli, tail
from experiments.benchmark import flops
from experiments.make_dry_run_data import write_folders
from fake_hub import FakeHub, hub_env
from slora_jax.models import convert
from slora_jax.models import vit
from slora_jax.runner import config as config_lib
from slora_jax.runner import dry_run
from slora_jax.runner import experiment_data
import tiny_config

# config: (classes, tasks); every config's classes are its data set's.
PAPER = {"imagenet_r_5": (200, 5), "imagenet_r_10": (200, 10),
         "imagenet_r_20": (200, 20), "imagenet_a_10": (200, 10),
         "cub200_10": (200, 10), "domainnet_5": (345, 5),
         "cifar100_10": (100, 10)}
CPU_BATCH = 4          # the train batch the dry runs execute on CPU
SHALLOW = ("--config.dry_run=True", f"--config.dry_run_batch_size={CPU_BATCH}",
           "--config.model.name=custom", "--config.model.init=random",
           "--config.model.image_size=16", "--config.model.patch_size=8",
           "--config.model.width=16", "--config.model.depth=1",
           "--config.model.num_heads=2", "--config.model.mlp_dim=32",
           "--config.data.image_size=16", "--config.data.resize_size=16",
           "--config.data.num_workers=2")


def test_eval_subset_covers_every_seen_class_in_turn():
  c = tiny_config.get_config()
  c.data.synthetic.update(dict(num_classes=6, test_per_class=8))
  exp = config_lib.from_config(c)
  data = experiment_data.prepare(exp.data, exp.train, 1993)
  every = data.test_indices(6)
  for limit, want in ((4, 6), (9, 9)):     # below the class count: one each
    data.eval_limit = limit
    idx = data.test_indices(6)
    labels = data.test_labels[idx]
    assert len(idx) == want and set(labels) == set(range(6))
    assert np.isin(idx, every).all()
    assert np.bincount(labels).max() - np.bincount(labels).min() <= 1


def test_per_device_memory_is_the_sharded_steps(tmp_path_factory):
  """At batch/n on one device (a host with fewer devices) the step's memory
  is the n-device sharded step's: the same arguments and outputs, and
  temporaries within the size of the all-reduced trainable gradients."""
  per = {}
  for devices in (1, 8):
    work = tmp_path_factory.mktemp(f"devices{devices}")
    env = dict(cli_env(tmp_path_factory), XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={devices}"))
    r = run_cli(env, work, "--config.dry_run=True")
    assert r.returncode == 0, tail(r)
    with open(work / "seed_1993" / "results.json") as f:
      step = json.load(f)["dry_run"]["step"]
    per[devices] = step["per_device"]
  for n in ("4", "8"):
    alone, sharded = per[1][n], per[8][n]
    assert (alone["sharded"], sharded["sharded"]) == (False, True)
    for key in ("batch", "arguments", "outputs", "aliased"):
      assert alone[key] == sharded[key], (n, key)
    extra = sharded["temporaries"] - alone["temporaries"]
    assert abs(extra) <= step["trainable_bytes"], (n, extra)


def _check_dry_run(d: dict, classes: int, tasks: int, batch: int, image: int,
                   depth_params: int):
  """What every dry run's results.json must show."""
  dr = d["dry_run"]
  assert d["task_sizes"] == [classes // tasks] * tasks
  assert len(d["acc_matrix"]) == tasks
  for t, row in enumerate(d["acc_matrix"]):   # every seen task evaluated
    assert [v is not None for v in row] == [k <= t for k in range(tasks)]
  assert [p["steps"] for p in d["per_task"]] == [dry_run.STEPS] * tasks
  assert [t["task"] for t in dr["tasks"]] == list(range(tasks))
  for t in dr["tasks"]:
    seen = classes // tasks * (t["task"] + 1)
    assert t["seen_classes"] == t["eval_classes"] == seen
    assert t["checkpoint_bytes"] > 0
  assert dr["executed_batch_size"] == CPU_BATCH
  st = dr["step"]
  assert (st["global_batch"], st["image_size"]) == (batch, image)
  per = st["per_device"]
  assert {n: m["batch"] for n, m in per.items()} == {
      "1": batch, "4": batch // 4, "8": batch // 8}
  # Every device holds the whole float32 backbone among its arguments.
  assert all(m["arguments"] >= 4 * depth_params for m in per.values())
  assert per["1"]["total"] > per["4"]["total"] > per["8"]["total"]
  assert st["flops"] > 0 and dr["peak_host_memory_bytes"] > 0
  assert set(dr["projection"]) == {"TPU v4-8", "TPU v5e-8", "H100"}
  for p in dr["projection"].values():
    want = (st["flops"] * dr["run_steps_per_seed"]
            / (p["chips"] * p["peak_tflops_per_chip"] * 1e12 * dry_run.MFU))
    assert math.isclose(p["hours_per_seed"] * 3600, want, rel_tol=1e-9)
    assert p["fits"] == (per[str(p["chips"])]["total"]
                         <= p["memory_per_chip_bytes"])


def test_imagenet_r_10_dry_run_at_full_model_size(tmp_path_factory):
  """ViT-B/16 by name from a fake Hub (random weights under the config's
  model.weights) on 200 synthetic class folders: 10 tasks of 2 steps at
  batch 4 and 32 px (the 224-px position embedding resized, as for any other
  image size), the step analysed at batch 128 and 224 px."""
  root = write_folders(str(tmp_path_factory.mktemp("inr")), 200, 2, 1)
  work = tmp_path_factory.mktemp("inr10")
  hub_dir = tmp_path_factory.mktemp("hub")
  config = os.path.join(ROOT, "experiments/configs/imagenet_r_10.py")
  repo = __import__("experiments.configs.imagenet_r_10",
                    fromlist=["_"]).get_config().model.weights
  weights = hub_dir / "model.safetensors"
  convert.save_timm_safetensors(
      jax.device_get(vit.init_params(vit.vit_b16(), jax.random.key(0))),
      weights, vit.vit_b16())
  with FakeHub({repo: {"model.safetensors": weights}}) as fake:
    r = run_cli(hub_env(fake, hub_dir / "hf", cli_env(tmp_path_factory)),
                work, "--config.dry_run=True",
                f"--config.dry_run_batch_size={CPU_BATCH}",
                "--config.dry_run_image_size=32",
                f"--config.data.root={root}", "--config.data.num_workers=2",
                config=config)
    assert fake.gets(repo) == 1
  assert r.returncode == 0, tail(r)
  with open(work / "seed_1993" / "results.json") as f:
    d = json.load(f)
  assert d["backbone"]["hub"]["repo"] == repo
  assert d["backbone"]["hub"]["commit"] == FakeHub.commit(repo)
  assert d["backbone"]["sha256"] == hashlib.sha256(
      weights.read_bytes()).hexdigest()
  b16 = vit.count_params(vit.abstract_params(vit.vit_b16()))
  _check_dry_run(d, 200, 10, 128, 224, b16)
  # XLA counts at least the step's matmuls (q and v of 12 blocks, rank 10).
  hand = flops.analytic_flops(vit.vit_b16(), 128, 200, 0, 10, 24)
  assert d["dry_run"]["step"]["flops"] >= hand["train_step"]
  assert "peak host memory" in r.stdout and "TPU v5e-8" in r.stdout


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  """Each paper data set's layout with its class count, 1 train + 1 test
  image per class: image folders, and a prepared TFDS builder for CIFAR."""
  from test_data import _examples, _write_tfds_fixture
  base_dir = tmp_path_factory.mktemp("layouts")
  out = {n: write_folders(str(base_dir / str(n)), n, 1, 1) for n in (200, 345)}
  labels = list(range(100))
  _write_tfds_fixture(str(base_dir / "tfds"), "slora_dry_cifar100",
                      {"train": _examples(labels, 0),
                       "test": _examples(labels, 1)},
                      [f"c{i}" for i in labels])
  out["tfds"] = str(base_dir / "tfds")
  return out


@pytest.mark.parametrize("name", sorted(set(PAPER) - {"imagenet_r_10"}))
def test_paper_config_dry_run_with_a_shallow_vit(name, layouts,
                                                 tmp_path_factory):
  """The config's classes, task split, data layout, batch and evaluation; a
  one-block ViT stands in for ViT-B/16 (tested above at full size). Through
  the entry point: the configs of 200 classes share their compiled steps
  (the session's compilation cache)."""
  classes, tasks = PAPER[name]
  c = __import__(f"experiments.configs.{name}", fromlist=["_"]).get_config()
  data = ([f"--config.data.data_dir={layouts['tfds']}",
           "--config.data.name=slora_dry_cifar100"]
          if c.data.source == "tfds" else
          [f"--config.data.root={layouts[classes]}"])
  work = tmp_path_factory.mktemp(name)
  r = run_cli(cli_env(tmp_path_factory), work, *SHALLOW, *data,
              config=os.path.join(ROOT, f"experiments/configs/{name}.py"))
  assert r.returncode == 0, tail(r)
  with open(work / "seed_1993" / "results.json") as f:
    d = json.load(f)
  cfg = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1,
                      num_heads=2, mlp_dim=32)
  _check_dry_run(d, classes, tasks, c.train.batch_size, 16,
                 vit.count_params(vit.abstract_params(cfg)))


_TABLE_CHILD = """
import json, os, subprocess, sys
from experiments import dry_run_table
calls = []
def fake_run(cmd, check, cwd):
  calls.append(cmd)
  workdir = [a for a in cmd if a.startswith("--workdir=")][0].split("=", 1)[1]
  os.makedirs(os.path.join(workdir, "seed_1993"))
  with open(os.path.join(workdir, "seed_1993", "results.json"), "w") as f:
    f.write("{}")
subprocess.run = fake_run
dry_run_table.flags.FLAGS(["dry_run_table", "--workdir=dry"])
dry_run_table._run("imagenet_r_5", "data", "dry/imagenet_r_5")
print(json.dumps(calls[0]))
"""


def test_dry_run_table_hands_its_child_absolute_paths(tmp_path):
  """The child `experiments.run` starts in the package's parent folder
  (site-packages for an installed copy): relative paths must not move there."""
  out = subprocess.run([sys.executable, "-c", _TABLE_CHILD], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                       capture_output=True, text=True).stdout
  flags = dict(a.split("=", 1) for a in json.loads(out) if "=" in a)
  assert flags["--workdir"] == str(tmp_path / "dry" / "imagenet_r_5")
  assert flags["--config.data.root"] == str(tmp_path / "data")
  assert (tmp_path / "dry" / "imagenet_r_5" / "seed_1993").is_dir()
