"""experiments/make_demo_backbone.py on small IDX files the test writes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from slora_jax.models import convert
from slora_jax.models import vit
from slora_jax.runner import results
from test_data import _write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(image_size=28, patch_size=14, width=16, depth=1, num_heads=2,
            mlp_dim=32)


def _make(tmp_path, *flags):
  root = str(tmp_path / "idx")
  _write_idx(root, gz=False, n_train=40, n_test=12, size=(28, 28), classes=10)
  out = str(tmp_path / "vit.safetensors")
  cmd = [sys.executable, "-m", "experiments.make_demo_backbone", f"--out={out}",
         f"--root={root}", "--images=30", "--epochs=2", "--batch_size=8",
         *(f"--{k}={v}" for k, v in ARCH.items()), *flags]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  return proc, out


def test_styles_join_the_pretraining_set_and_the_manifest(tmp_path):
  proc, out = _make(tmp_path, "--styles=edges,sketch", "--clean_copies=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  manifest = json.loads(open(out[:-len(".safetensors")] + ".json").read())
  recipe = manifest["recipe"]
  assert recipe["styles"] == ["edges", "sketch"] and recipe["clean_copies"] == 2
  # 30 images, 2 clean copies + 2 styles = 120 samples, 2 passes of batch 8
  assert recipe["steps"] == 30
  by_style = manifest["test_accuracy_by_style"]
  assert set(by_style) == {"clean", "inverted", "edges", "texture", "elastic",
                           "sketch", "blur_noise"}
  assert all(0 <= a <= 100 for a in by_style.values())
  assert manifest["clean_test_accuracy"] == by_style["clean"]
  assert "--styles=edges,sketch" in manifest["command"]
  assert results.sha256_file(out) == manifest["sha256"]
  params = convert.load_timm_safetensors(out, vit.ViTConfig(**ARCH))
  assert all(np.isfinite(np.asarray(v)).all()
             for v in jax.tree.leaves(params))


def test_an_unknown_style_is_one_line_and_exit_2(tmp_path):
  proc, out = _make(tmp_path, "--styles=edges,oil")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: unknown --styles ['oil']")
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not os.path.exists(out)
