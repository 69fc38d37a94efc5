"""The demo backbone's label-free pre-training and its cache."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from experiments.configs import base
from slora_jax.runner import backbone
from slora_jax.runner import config as config_lib
from slora_jax.models import convert
from slora_jax.models import vit

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1,
                    num_heads=2, mlp_dim=32)


def _pretrain(task, steps=6):
  return config_lib.PretrainSettings(
      task=task, num_classes=4, train_per_class=8, steps=steps, batch_size=8,
      lr=1e-2, seed=3, cache_dir="")


def _data():
  c = base.base()
  c.data.update(dict(
      source="synthetic", name="synthetic", root="", data_dir="",
      synthetic=dict(num_classes=3, train_per_class=12, test_per_class=2,
                     seed=0), image_size=16))
  return config_lib.from_config(c).data


@pytest.mark.parametrize("task", ["rotation", "patterns"])
def test_pretrain_writes_a_loadable_cached_backbone(task, tmp_path, capsys):
  path = backbone.synthetic_pretrain(CFG, _pretrain(task), str(tmp_path),
                                     data=_data())
  assert os.path.isfile(path) and os.path.dirname(path) == str(tmp_path)
  assert f"({task}:" in capsys.readouterr().out
  params = convert.load_timm_safetensors(path, CFG)
  init = vit.init_params(CFG, jax.random.key(3))   # the pre-training's init
  moved = np.abs(np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"]) -
                 np.asarray(init["blocks_0"]["attn"]["qkv"]["kernel"])).max()
  assert moved > 0                                  # it trained
  # A second call is a cache hit: same file, nothing trained or printed.
  mtime = os.path.getmtime(path)
  assert backbone.synthetic_pretrain(CFG, _pretrain(task), str(tmp_path),
                                     data=_data()) == path
  assert os.path.getmtime(path) == mtime
  assert "pre-training" not in capsys.readouterr().out


def test_cache_key_separates_tasks_steps_and_data(tmp_path):
  paths = {backbone.synthetic_pretrain(CFG, _pretrain(t, s), str(tmp_path),
                                       data=_data())
           for t, s in (("rotation", 2), ("rotation", 3), ("patterns", 2))}
  other = _data()
  other = dataclasses.replace(
      other, root="elsewhere",
      synthetic=dataclasses.replace(other.synthetic, seed=1))
  paths.add(backbone.synthetic_pretrain(CFG, _pretrain("rotation", 2),
                                        str(tmp_path), data=other))
  assert len(paths) == 4


def test_bad_pretrain_task_is_refused(tmp_path):
  with pytest.raises(ValueError, match="pretrain.task"):
    backbone.synthetic_pretrain(CFG, _pretrain("jigsaw"), str(tmp_path),
                                data=_data())


def test_committed_demo_backbone_matches_its_manifest_and_the_demo_config():
  import json
  from experiments.configs import demo
  from slora_jax.runner import config as config_lib
  from slora_jax.runner import results
  manifest = json.loads(open(demo.BACKBONE[:-len(".safetensors")] + ".json")
                        .read())
  assert results.sha256_file(demo.BACKBONE) == manifest["sha256"]
  assert manifest["command"].startswith("python -m experiments.make_demo_backbone")
  cfg = config_lib.from_config(demo.get_config()).model.vit_config()
  assert {k: getattr(cfg, k) for k in manifest["architecture"]} == \
      manifest["architecture"]
  params = convert.load_timm_safetensors(demo.BACKBONE, cfg)   # shapes checked
  assert vit.count_params(params) == 816384
