"""Checkpoint converters: layouts, round trips and strict error reporting."""

import dataclasses
import logging
import re

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy

from slora_jax.models import convert
from slora_jax.models import vit

TINY = vit.ViTConfig(image_size=32, patch_size=8, width=64, depth=2,
                     num_heads=4, mlp_dim=128)
SPLIT = dataclasses.replace(TINY, qkv="split")
D, M, H, HD = 64, 128, 4, 16


def random_params(cfg: vit.ViTConfig, seed: int = 0) -> dict:
  """Random float32 values in the model's tree, without compiling an init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
      vit.abstract_params(cfg))


def features(cfg, params, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(jax.jit(vit.VisionTransformer(cfg).apply)(
        {"params": params}, images))


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(
      np.float32)


@pytest.fixture()
def timm_file(tmp_path):
  params = random_params(TINY)
  path = tmp_path / "model.safetensors"
  convert.save_timm_safetensors(params, path, TINY)
  return params, path


def _rewrite(path, new_path, edit):
  sd = safetensors.numpy.load_file(path)
  edit(sd)
  safetensors.numpy.save_file(sd, new_path)
  return new_path


# ----------------------------------------------------------------------------
# Layouts on disk.


def _timm_names() -> dict:
  want = {
      "patch_embed.proj.weight": (D, 3, 8, 8), "patch_embed.proj.bias": (D,),
      "cls_token": (1, 1, D), "pos_embed": (1, 17, D),
      "norm.weight": (D,), "norm.bias": (D,),
  }
  for i in range(2):
    want.update({
        f"blocks.{i}.norm1.weight": (D,), f"blocks.{i}.norm1.bias": (D,),
        f"blocks.{i}.attn.qkv.weight": (3 * D, D),
        f"blocks.{i}.attn.qkv.bias": (3 * D,),
        f"blocks.{i}.attn.proj.weight": (D, D),
        f"blocks.{i}.attn.proj.bias": (D,),
        f"blocks.{i}.norm2.weight": (D,), f"blocks.{i}.norm2.bias": (D,),
        f"blocks.{i}.mlp.fc1.weight": (M, D), f"blocks.{i}.mlp.fc1.bias": (M,),
        f"blocks.{i}.mlp.fc2.weight": (D, M), f"blocks.{i}.mlp.fc2.bias": (D,),
    })
  return want


def _big_vision_names() -> dict:
  t = "Transformer"
  want = {
      "embedding/kernel": (8, 8, 3, D), "embedding/bias": (D,),
      "cls": (1, 1, D), f"{t}/posembed_input/pos_embedding": (1, 17, D),
      f"{t}/encoder_norm/scale": (D,), f"{t}/encoder_norm/bias": (D,),
  }
  for i in range(2):
    b = f"{t}/encoderblock_{i}"
    a = f"{b}/MultiHeadDotProductAttention_1"
    want.update({
        f"{b}/LayerNorm_0/scale": (D,), f"{b}/LayerNorm_0/bias": (D,),
        f"{a}/query/kernel": (D, H, HD), f"{a}/query/bias": (H, HD),
        f"{a}/key/kernel": (D, H, HD), f"{a}/key/bias": (H, HD),
        f"{a}/value/kernel": (D, H, HD), f"{a}/value/bias": (H, HD),
        f"{a}/out/kernel": (H, HD, D), f"{a}/out/bias": (D,),
        f"{b}/LayerNorm_2/scale": (D,), f"{b}/LayerNorm_2/bias": (D,),
        f"{b}/MlpBlock_3/Dense_0/kernel": (D, M),
        f"{b}/MlpBlock_3/Dense_0/bias": (M,),
        f"{b}/MlpBlock_3/Dense_1/kernel": (M, D),
        f"{b}/MlpBlock_3/Dense_1/bias": (D,),
    })
  return want


def test_timm_file_names_shapes_and_layout(timm_file):
  params, path = timm_file
  sd = safetensors.numpy.load_file(path)
  assert {k: v.shape for k, v in sd.items()} == _timm_names()
  blk = params["blocks_1"]
  np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"],
                                blk["attn"]["qkv"]["kernel"].T)
  np.testing.assert_array_equal(sd["blocks.1.mlp.fc2.weight"],
                                blk["mlp"]["fc2"]["kernel"].T)
  np.testing.assert_array_equal(sd["blocks.1.norm2.weight"],
                                blk["norm2"]["scale"])
  # torch conv weight[out, in, kh, kw] == Flax kernel[kh, kw, in, out].
  np.testing.assert_array_equal(sd["patch_embed.proj.weight"][5, 2, 1, 7],
                                params["patch_embed"]["kernel"][1, 7, 2, 5])


def test_big_vision_file_names_shapes_and_layout(tmp_path):
  params = random_params(TINY)
  path = tmp_path / "vit.npz"
  convert.save_big_vision_npz(params, path, TINY)
  with np.load(path) as npz:
    bv = {k: npz[k] for k in npz.files}
  assert {k: v.shape for k, v in bv.items()} == _big_vision_names()
  a = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
  w = params["blocks_1"]["attn"]["qkv"]["kernel"]
  for j, name in enumerate(("query", "key", "value")):
    np.testing.assert_array_equal(bv[f"{a}/{name}/kernel"].reshape(D, D),
                                  w[:, j * D:(j + 1) * D])
  np.testing.assert_array_equal(bv[f"{a}/out/kernel"].reshape(D, D),
                                params["blocks_1"]["attn"]["proj"]["kernel"])


# ----------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("cfg", [TINY, SPLIT], ids=["fused", "split"])
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_round_trip_is_exact(tmp_path, cfg, fmt):
  params = random_params(cfg, seed=3)
  path = tmp_path / f"ckpt.{fmt}"
  save = {"safetensors": convert.save_timm_safetensors,
          "npz": convert.save_big_vision_npz}[fmt]
  save(params, path, cfg)
  loaded = convert.load_pretrained(path, cfg)
  chex.assert_trees_all_equal(loaded, params)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))


def test_split_layout_computes_the_same_function(timm_file, images):
  params, path = timm_file
  split = convert.load_timm_safetensors(path, SPLIT)
  chex.assert_trees_all_equal(convert.to_fused_qkv(split), params)
  np.testing.assert_allclose(features(SPLIT, split, images),
                             features(TINY, params, images),
                             rtol=1e-5, atol=1e-5)


def test_big_vision_matches_timm(timm_file, tmp_path, images):
  params, timm_path = timm_file
  npz_path = tmp_path / "vit.npz"
  convert.save_big_vision_npz(params, npz_path, TINY)
  for cfg in (TINY, SPLIT):
    chex.assert_trees_all_equal(convert.load_big_vision_npz(npz_path, cfg),
                                convert.load_timm_safetensors(timm_path, cfg))
  got = features(TINY, convert.load_big_vision_npz(npz_path, TINY), images)
  np.testing.assert_array_equal(got, features(TINY, params, images))


def test_classifier_keys_are_ignored(timm_file, tmp_path):
  params, path = timm_file

  def add_head(sd):
    sd["head.weight"] = np.zeros((10, D), np.float32)
    sd["head.bias"] = np.zeros((10,), np.float32)

  with_head = _rewrite(path, tmp_path / "head.safetensors", add_head)
  chex.assert_trees_all_equal(convert.load_timm_safetensors(with_head, TINY),
                              params)


def test_pos_embed_is_resized_to_the_model_grid(tmp_path, caplog):
  small = dataclasses.replace(TINY, image_size=16)  # 2x2 grid -> 4x4
  params = random_params(small)
  params["pos_embed"][0, 1:] = 0.25  # bilinear keeps a constant grid constant
  path = tmp_path / "small.safetensors"
  convert.save_timm_safetensors(params, path, small)
  with caplog.at_level(logging.WARNING, logger=convert.__name__):
    pos = convert.load_timm_safetensors(path, TINY)["pos_embed"]
  assert "resizing the position embedding from a 2x2 to a 4x4" in caplog.text
  assert pos.shape == (1, 17, D)
  np.testing.assert_array_equal(pos[0, 0], params["pos_embed"][0, 0])
  np.testing.assert_allclose(pos[0, 1:], 0.25, atol=1e-6)


# ----------------------------------------------------------------------------
# Strictness.


def test_wrong_shape_names_key_and_both_shapes(timm_file, tmp_path):
  _, path = timm_file

  def shrink(sd):
    sd["blocks.1.attn.qkv.weight"] = np.zeros((3 * D, 32), np.float32)

  bad = _rewrite(path, tmp_path / "bad.safetensors", shrink)
  with pytest.raises(convert.CheckpointMismatchError) as err:
    convert.load_timm_safetensors(bad, TINY)
  assert isinstance(err.value, ValueError)
  assert ("blocks.1.attn.qkv.weight: checkpoint has shape (192, 32), "
          "model expects (192, 64)") in str(err.value)


def test_missing_key_is_named(timm_file, tmp_path):
  _, path = timm_file
  bad = _rewrite(path, tmp_path / "bad.safetensors",
                 lambda sd: sd.pop("blocks.1.mlp.fc2.bias"))
  with pytest.raises(convert.CheckpointMismatchError,
                     match=re.escape("blocks.1.mlp.fc2.bias: missing")):
    convert.load_timm_safetensors(bad, TINY)


def test_unexpected_key_is_named(timm_file, tmp_path):
  _, path = timm_file

  def add(sd):
    sd["blocks.0.ls1.gamma"] = np.ones((D,), np.float32)

  bad = _rewrite(path, tmp_path / "bad.safetensors", add)
  with pytest.raises(convert.CheckpointMismatchError,
                     match=re.escape("blocks.0.ls1.gamma: unexpected key")):
    convert.load_timm_safetensors(bad, TINY)


def test_real_fc_norm_is_rejected(timm_file, tmp_path):
  _, path = timm_file

  def add(sd):
    sd["fc_norm.weight"] = np.ones((D,), np.float32)
    sd["fc_norm.bias"] = np.zeros((D,), np.float32)

  bad = _rewrite(path, tmp_path / "bad.safetensors", add)
  with pytest.raises(convert.CheckpointMismatchError, match="fc_norm.weight"):
    convert.load_timm_safetensors(bad, TINY)


def test_other_model_size_is_rejected(timm_file):
  _, path = timm_file
  wider = dataclasses.replace(TINY, width=96, num_heads=4)
  with pytest.raises(convert.CheckpointMismatchError,
                     match=re.escape("cls_token: checkpoint has shape "
                                     "(1, 1, 64), model expects (1, 1, 96)")):
    convert.load_timm_safetensors(path, wider)


def test_big_vision_wrong_shape_names_key_and_shapes(tmp_path):
  path = tmp_path / "vit.npz"
  convert.save_big_vision_npz(random_params(TINY), path, TINY)
  with np.load(path) as npz:
    bv = {k: npz[k] for k in npz.files}
  key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"
  bv[key] = np.zeros((D, 8, 8), np.float32)
  bad = tmp_path / "bad.npz"
  np.savez(bad, **bv)
  with pytest.raises(convert.CheckpointMismatchError,
                     match=re.escape(f"{key}: checkpoint has shape (64, 8, 8), "
                                     "model expects (64, 4, 16)")):
    convert.load_big_vision_npz(bad, TINY)


def test_missing_file_and_unknown_format(tmp_path):
  missing = tmp_path / "nope.safetensors"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    convert.load_pretrained(missing, TINY)
  missing_npz = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing_npz))):
    convert.load_big_vision_npz(missing_npz, TINY)
  with pytest.raises(ValueError, match="unknown checkpoint format '.pth'"):
    convert.load_pretrained(tmp_path / "model.pth", TINY)


def test_save_rejects_params_of_another_config(tmp_path):
  with pytest.raises(convert.CheckpointMismatchError, match="qkv"):
    convert.save_timm_safetensors(random_params(SPLIT),
                                  tmp_path / "x.safetensors", TINY)


def test_unreadable_files_are_one_line_naming_the_file(tmp_path):
  good = tmp_path / "good.safetensors"
  convert.save_timm_safetensors(random_params(TINY), good, TINY)
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(good.read_bytes()[:-100])      # the tensors' tail is gone
  with pytest.raises(convert.UnreadableCheckpointError) as e:
    convert.load_pretrained(cut, TINY)
  assert str(e.value).startswith(f"{cut}: not a readable .safetensors file (")
  zipped = tmp_path / "cut.npz"
  convert.save_big_vision_npz(random_params(TINY), zipped, TINY)
  zipped.write_bytes(zipped.read_bytes()[:200])  # the zip directory is gone
  with pytest.raises(convert.UnreadableCheckpointError) as e:
    convert.load_pretrained(zipped, TINY)
  assert str(e.value).startswith(f"{zipped}: not a readable .npz file ("
                                 "BadZipFile: ")
  assert "allow_pickle" not in str(e.value)
  # The library reads no pickles; the runner reads .bin files with torch.
  with pytest.raises(convert.UnreadableCheckpointError,
                     match=re.escape(f"{tmp_path / 'w.bin'}: a PyTorch .bin "
                                     "pickle; slora_jax.models reads no "
                                     "pickles")):
    convert.load_pretrained(tmp_path / "w.bin", TINY)
