"""`python -m experiments.export`: a run's merged ViT and head as timm files.

A tiny run (tests/tiny_config.py) is exported at its last checkpoint and at
a mid-task one; the timm-layout file, run through the independent float64
numpy port of timm's forward (tests/test_vit.py) and the exported head,
gives our logits (the unmerged adapters on the backbone) to 1e-4; with torch
installed, so does a plain PyTorch forward of the same file.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

import slora_jax as sl
from experiments import export
from slora_jax.runner import config as config_lib
from slora_jax.runner import train
from tests import tiny_config
from tests.test_checkpoint import _corrupt
from tests.test_vit import numpy_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  c = tiny_config.get_config()
  c.checkpoint.keep = 20
  train.run_seed(config_lib.from_config(c), 1993, str(root / "seed_1993"))
  return str(root)


def _our_logits(run, images):
  # The training form's function: adapters applied, not the merged file.
  feats = run["model"].apply(
      {"params": sl.apply_adapters(run["params"], run["adapters"])}, images)
  n = run["num_trained_classes"]
  return np.asarray(sl.apply_head(run["head"], feats))[:, :n]


def _file_logits(out, images):
  sd = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  cfg = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
  a = cfg["model_args"]
  from slora_jax.models import vit  # the numpy port takes a ViTConfig
  vcfg = vit.ViTConfig(image_size=a["img_size"], patch_size=a["patch_size"],
                       width=a["embed_dim"], depth=a["depth"],
                       num_heads=a["num_heads"],
                       mlp_dim=round(a["mlp_ratio"] * a["embed_dim"]))
  feats = numpy_vit(sd, images, vcfg)
  return feats @ sd["head.weight"].T.astype(np.float64) + sd["head.bias"], sd


def test_export_cli_matches_our_logits(workdir, tmp_path):
  out = str(tmp_path / "export")
  res = subprocess.run([sys.executable, "-m", "experiments.export", workdir,
                        f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  cfg = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
  assert cfg["architecture"] == "vit_base_patch8_16"
  assert cfg["num_classes"] == 6 and len(cfg["class_order"]) == 6
  assert cfg["model_args"]["embed_dim"] == 16 and cfg["source"]["seed"] == 1993
  images = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
  run = export.load_run(workdir)
  with jax.default_matmul_precision("highest"):
    ours = _our_logits(run, images)
  got, sd = _file_logits(out, images)
  np.testing.assert_allclose(got, ours, atol=1e-4, rtol=1e-4)
  assert sd["head.weight"].shape == (6, 16)
  # The adapters alone travel too, with the head.
  saved = sl.read_adapters(os.path.join(out, "adapters"))
  assert int(sl.num_stored(saved.adapters)) == 3
  np.testing.assert_array_equal(saved.extra["head"]["bias"], run["head"]["bias"])
  if _has_torch():
    np.testing.assert_allclose(_torch_logits(sd, cfg, images), ours,
                               atol=1e-4, rtol=1e-4)


def test_mid_task_checkpoint_exports_the_classes_seen(workdir, tmp_path):
  # Checkpoint 1 is taken two steps into task 0: two classes are in play.
  doc = export.export(workdir, str(tmp_path / "mid"), step=1)
  assert doc["source"]["cursor"] == {"task": 0, "step": 2, "begun": True}
  assert doc["num_classes"] == 2
  images = np.random.default_rng(1).random((2, 16, 16, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ours = _our_logits(export.load_run(workdir, step=1), images)
  np.testing.assert_allclose(_file_logits(str(tmp_path / "mid"), images)[0],
                             ours, atol=1e-4, rtol=1e-4)


def test_missing_run_is_one_line(tmp_path):
  res = subprocess.run([sys.executable, "-m", "experiments.export",
                        str(tmp_path), f"--out={tmp_path}/o"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      f"error: {tmp_path} holds no run (seed_*/ with checkpoints); pass the "
      "--workdir of a run"]


def test_out_a_file_or_no_checkpoint_is_one_line(workdir, tmp_path, capsys):
  out = tmp_path / "taken.txt"
  out.write_text("x")
  assert export.main([workdir, f"--out={out}"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"error: --out {out} is a file, not a directory; pass a directory (it "
      "is created if missing)"]
  # A run stopped before its first checkpoint (and its results.json): the
  # missing checkpoint is what is said, not a complaint about the config.
  seed_dir = tmp_path / "run" / "seed_1993"
  (seed_dir / "checkpoints").mkdir(parents=True)
  assert export.main([str(tmp_path / "run"), f"--out={tmp_path}/o"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"error: no checkpoint in {seed_dir / 'checkpoints'} yet: the run "
      "stopped before its first save; rerun it to train, then export"]


def test_a_corrupt_latest_checkpoint_is_skipped_and_left_in_place(
    workdir, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  ckpts = run / "seed_1993" / "checkpoints"
  latest = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
  _corrupt(ckpts / str(latest), "truncated")
  doc = export.export(str(run), str(tmp_path / "out"))
  assert doc["source"]["checkpoint"] == latest - 1
  line, = capsys.readouterr().err.splitlines()
  assert line.startswith(f"warning: checkpoint {latest} in {ckpts} is "
                         "corrupt (its arrays are unreadable: ")
  assert line.endswith(f"); skipped (left in place); using checkpoint "
                       f"{latest - 1}")
  assert os.path.isdir(ckpts / str(latest))      # export writes no workdir
  assert export.main([str(run), f"--out={tmp_path}/o2",
                      f"--step={latest}"]) == 2
  err, = capsys.readouterr().err.splitlines()
  assert err.startswith(f"error: checkpoint {latest} in {ckpts} is corrupt "
                        "(its arrays are unreadable: ")


def _has_torch():
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def _torch_logits(sd, cfg, images):
  """timm's forward written with torch.nn.functional (timm is not needed)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  w = {k: torch.from_numpy(v.astype(np.float64)) for k, v in sd.items()}
  a = cfg["model_args"]
  d, h = a["embed_dim"], a["num_heads"]
  x = torch.from_numpy(images.astype(np.float64)).permute(0, 3, 1, 2)
  t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"],
               stride=a["patch_size"]).flatten(2).transpose(1, 2)
  t = torch.cat([w["cls_token"].expand(len(t), -1, -1), t], 1) + w["pos_embed"]
  ln = lambda z, p: F.layer_norm(z, (d,), w[p + ".weight"], w[p + ".bias"], 1e-6)
  for i in range(a["depth"]):
    p = f"blocks.{i}."
    qkv = F.linear(ln(t, p + "norm1"), w[p + "attn.qkv.weight"],
                   w[p + "attn.qkv.bias"])
    q, k, v = qkv.unflatten(-1, (3, h, d // h)).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    t = t + F.linear(o, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
    y = F.gelu(F.linear(ln(t, p + "norm2"), w[p + "mlp.fc1.weight"],
                        w[p + "mlp.fc1.bias"]))
    t = t + F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
  feats = ln(t, "norm")[:, 0]
  return F.linear(feats, w["head.weight"], w["head.bias"]).numpy()
