"""`python -m experiments.export`: a run's merged ViT and head as timm files.

A tiny run (tests/tiny_config.py) is exported at its last checkpoint and at
a mid-task one; the timm-layout file, run through the independent float64
numpy port of timm's forward (tests/test_vit.py) and the exported head,
gives our logits (the unmerged adapters on the backbone) to 1e-4; with torch
installed, so does a plain PyTorch forward of the same file, and with timm and
PEFT installed, timm's own loading of the folders and PEFT's of the LoRA.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

import slora_jax as sl
from experiments import export
from experiments import tool
from slora_jax.runner import config as config_lib
from slora_jax.runner import experiment_data
from slora_jax.runner import train
from slora_jax.models import vit
from tests import tiny_config
from tests import torch_interop
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


def _main(args) -> int:
  """``python -m experiments.export ARGS`` in-process: its exit code."""
  return tool.call(export.main, args, export.FLAGS, export.USER_ERRORS)


def test_export_cli_matches_our_logits(workdir, tmp_path):
  out = str(tmp_path / "export")
  res = subprocess.run([sys.executable, "-m", "experiments.export", workdir,
                        f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  cfg = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
  # timm has no name for this size: a registered one, overridden by model_args.
  assert cfg["architecture"] == "vit_base_patch16_224"
  assert cfg["num_classes"] == 6 and len(cfg["class_order"]) == 6
  assert cfg["model_args"]["embed_dim"] == 16 and cfg["source"]["seed"] == 1993
  # The model whose numbers results.json reports: task 3's, before end_task.
  assert cfg["source"]["cursor"] == {"task": 2, "step": 4, "begun": True}
  assert cfg["source"]["evaluated"]
  images = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
  run = export.load_run(workdir, step=cfg["source"]["checkpoint"])
  with jax.default_matmul_precision("highest"):
    ours = _our_logits(run, images)
  got, sd = _file_logits(out, images)
  np.testing.assert_allclose(got, ours, atol=1e-4, rtol=1e-4)
  assert sd["head.weight"].shape == (6, 16)
  # The adapters alone travel too, with the head.
  saved = sl.read_adapters(os.path.join(out, "adapters"))
  # Two tasks stored, the third still the current direction, as evaluated.
  assert int(sl.num_stored(saved.adapters)) == 2
  assert np.abs(np.asarray(jax.tree.leaves(
      saved.adapters.trainable["current"])[0])).max() > 0
  np.testing.assert_array_equal(saved.extra["head"]["bias"], run["head"]["bias"])
  if _has_torch():
    np.testing.assert_allclose(_torch_logits(sd, cfg, images), ours,
                               atol=1e-4, rtol=1e-4)
  # The latest checkpoint (after end_task normalised the direction) is
  # another function: exporting it was the bug.
  with jax.default_matmul_precision("highest"):
    after = _our_logits(export.load_run(workdir), images)
  assert np.abs(after - ours).max() > 1e-2
  mode = 0o666 & ~_umask()
  for d, _, files in os.walk(out):
    for f in files:
      assert os.stat(os.path.join(d, f)).st_mode & 0o777 == mode, f


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@pytest.mark.skipif(not torch_interop.available(),
                    reason="needs torch, torchvision, timm and peft")
def test_timm_and_peft_reproduce_our_logits(workdir, tmp_path):
  # timm builds the export from its folder alone, and PEFT applies the
  # exported LoRA (the merged SD-LoRA update) to the exported backbone.
  timm, peft = torch_interop.import_timm()
  import torch  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "export")
  doc = export.export(workdir, out)
  images = np.random.default_rng(2).random((3, 16, 16, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ours = _our_logits(export.load_run(workdir, step=doc["source"]["checkpoint"]),
                       images)
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  merged = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
  env = {}   # README's three lines, as written
  exec(_readme_snippet().replace("OUT", out), env)  # pylint: disable=exec-used
  lora = env["model"]
  assert isinstance(lora, peft.PeftModel)
  with torch.no_grad():
    got_merged, got_lora = merged(x).numpy(), lora(x).numpy()
  np.testing.assert_allclose(got_merged, ours, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got_lora, ours, atol=1e-4, rtol=1e-4)
  print(f"timm |diff| {np.abs(got_merged - ours).max():.2e}, "
        f"timm+peft |diff| {np.abs(got_lora - ours).max():.2e}")
  # The architecture and model_args alone build the same model.
  again = timm.create_model(doc["architecture"], num_classes=6,
                            **doc["model_args"])
  assert {k: v.shape for k, v in again.state_dict().items()} == {
      k: v.shape for k, v in merged.state_dict().items()}


def _readme_snippet() -> str:
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = text.split("### Exporting to PyTorch", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not torch_interop.available(),
                    reason="needs torch, torchvision, timm and peft")
def test_vit_b16_gets_timms_own_name():
  timm, _ = torch_interop.import_timm()
  assert all(timm.is_model(n) for n in export.TIMM_REGISTERED)
  cfg = vit.ViTConfig(image_size=224, patch_size=16, width=768, depth=12,
                      num_heads=12, mlp_dim=3072)
  doc = export.timm_config(cfg, 10, "none")
  assert doc["architecture"] == "vit_base_patch16_224"


@pytest.mark.skipif(not torch_interop.available(),
                    reason="needs torch, torchvision, timm and peft")
def test_a_vit_b16_folder_loads_as_local_dir(tmp_path):
  # One block keeps it cheap; the name stays timm's ViT-B/16.
  timm, _ = torch_interop.import_timm()
  import torch  # pylint: disable=import-outside-toplevel
  cfg = vit.ViTConfig(image_size=224, patch_size=16, width=768, depth=1,
                      num_heads=12, mlp_dim=3072)
  params = vit.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(3)
  head = {"kernel": rng.normal(size=(768, 5)).astype(np.float32),
          "bias": rng.normal(size=5).astype(np.float32)}
  doc = export.timm_config(cfg, 5, "imagenet")
  export._write_timm(str(tmp_path), params, head, 5, cfg, doc)  # pylint: disable=protected-access
  model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
  image = rng.random((1, 224, 224, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    feats = vit.VisionTransformer(cfg).apply({"params": params}, image)
  ours = np.asarray(sl.apply_head(jax.tree.map(jax.numpy.asarray, head), feats))
  with torch.no_grad():
    got = model(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(got, ours, atol=1e-4, rtol=1e-4)
  assert model.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]


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
  assert _main([workdir, f"--out={out}"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"error: --out {out} is a file, not a directory; pass a directory (it "
      "is created if missing)"]
  # A run stopped before its first checkpoint (and its results.json): the
  # missing checkpoint is what is said, not a complaint about the config.
  seed_dir = tmp_path / "run" / "seed_1993"
  (seed_dir / "checkpoints").mkdir(parents=True)
  assert _main([str(tmp_path / "run"), f"--out={tmp_path}/o"]) == 2
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
  # The default is the evaluated model (the checkpoint before the last
  # end_task), which the damage did not reach.
  doc = export.export(str(run), str(tmp_path / "out"))
  assert doc["source"]["checkpoint"] == latest - 1
  assert doc["source"]["evaluated"]
  assert capsys.readouterr().err == ""
  assert os.path.isdir(ckpts / str(latest))      # export writes no workdir
  # The evaluated checkpoint damaged too: the newest intact one, each
  # corrupt one named and left in place.
  _corrupt(ckpts / str(latest - 1), "truncated")
  doc = export.export(str(run), str(tmp_path / "out1"))
  assert doc["source"]["checkpoint"] == latest - 2
  assert not doc["source"]["evaluated"]
  err = capsys.readouterr().err
  assert f"checkpoint {latest - 1} in {ckpts} is corrupt" in err
  assert (f"warning: checkpoint {latest} in {ckpts} is corrupt (its arrays "
          "are unreadable: ") in err
  assert err.rstrip().endswith(f"skipped (left in place); using checkpoint "
                               f"{latest - 2}")
  assert os.path.isdir(ckpts / str(latest - 1))
  assert _main([str(run), f"--out={tmp_path}/o2",
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


def _reevaluated_head_share(workdir):
  """head_share's figures the way it computed them before results.json held
  them: the evaluated checkpoint's merged model re-scored on the run's test
  images (independent of the evaluators)."""
  step, _ = export.evaluated_step(workdir, None)   # the model evaluated
  run = export.load_run(workdir, None, step)
  exp, n = run["exp"], run["num_trained_classes"]
  data = experiment_data.prepare(exp.data, exp.train, 1993,
                                 process_index=0, process_count=1)
  params = sl.merge(run["params"], run["adapters"])
  logits, labels = [], []
  with data.eval_batches(n) as batches:
    for b in batches:
      real = b["mask"] > 0
      out = sl.apply_head(run["head"],
                          run["model"].apply({"params": params}, b["image"]))
      logits.append(np.asarray(out)[real, :n])
      labels.append(np.asarray(b["label"])[real])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  pct = lambda x: round(100.0 * float(np.mean(x)), 2)
  bounds = np.cumsum([0, *data.task_sizes])
  task_of = np.searchsorted(bounds, np.arange(bounds[-1]), side="right") - 1
  pred = logits.argmax(1)
  own = np.array([bounds[task_of[l]] + logits[i, bounds[task_of[l]]:
                                              bounds[task_of[l] + 1]].argmax()
                  for i, l in enumerate(labels)])
  task, ptask = task_of[labels], task_of[pred]
  err = pred != labels
  cross = err & (ptask != task)
  return {"top1": pct(~err), "own_task_rows_only": pct(own == labels),
          "errors": int(err.sum()), "errors_in_another_task": pct(cross[err]),
          "per_task": [{"task": k + 1, "top1": pct(pred[m] == labels[m]),
                        "own_task_rows_only": pct(own[m] == labels[m]),
                        "to_earlier_task": pct(ptask[m] < k),
                        "to_later_task": pct(ptask[m] > k)}
                       for k in range(len(data.task_sizes))
                       for m in [task == k]]}


def test_head_share_gives_the_figures_of_a_re_evaluation(workdir):
  from experiments import head_share   # pylint: disable=import-outside-toplevel
  want = _reevaluated_head_share(workdir)
  got = head_share.head_share(workdir)
  assert want["errors"] > 0 and 0 < want["errors_in_another_task"] < 100
  assert {k: got[k] for k in want} == want
