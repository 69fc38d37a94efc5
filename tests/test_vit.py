"""The Flax ViT against an independent float64 numpy port of timm's forward."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from slora_jax.models import convert
from slora_jax.models import vit

TINY = vit.ViTConfig(image_size=32, patch_size=8, width=64, depth=2,
                     num_heads=4, mlp_dim=128)

_erf = np.vectorize(math.erf)


def random_timm_state_dict(cfg: vit.ViTConfig, seed: int = 0) -> dict:
  """A timm-layout state dict with O(1) activations, so every op matters."""
  rng = np.random.default_rng(seed)
  d, m, p, c = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.in_chans

  def normal(*shape, std=1.0):
    return (std * rng.standard_normal(shape)).astype(np.float32)

  sd = {
      "patch_embed.proj.weight": normal(d, c, p, p, std=(c * p * p) ** -0.5),
      "patch_embed.proj.bias": normal(d, std=0.1),
      "cls_token": normal(1, 1, d),
      "pos_embed": normal(1, cfg.seq_len, d, std=0.5),
      "norm.weight": 1 + normal(d, std=0.2),
      "norm.bias": normal(d, std=0.2),
      # A classifier that the loader must skip.
      "head.weight": normal(10, d),
      "head.bias": normal(10),
  }
  for i in range(cfg.depth):
    b = f"blocks.{i}."
    for n in ("norm1", "norm2"):
      sd[b + n + ".weight"] = 1 + normal(d, std=0.2)
      sd[b + n + ".bias"] = normal(d, std=0.2)
    # Larger q/k weights make the attention distribution far from uniform.
    sd[b + "attn.qkv.weight"] = normal(3 * d, d, std=2 * d ** -0.5)
    sd[b + "attn.qkv.bias"] = normal(3 * d, std=0.1)
    sd[b + "attn.proj.weight"] = normal(d, d, std=d ** -0.5)
    sd[b + "attn.proj.bias"] = normal(d, std=0.1)
    sd[b + "mlp.fc1.weight"] = normal(m, d, std=d ** -0.5)
    sd[b + "mlp.fc1.bias"] = normal(m, std=0.1)
    sd[b + "mlp.fc2.weight"] = normal(d, m, std=m ** -0.5)
    sd[b + "mlp.fc2.bias"] = normal(d, std=0.1)
  return sd


def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_vit(sd: dict, images: np.ndarray, cfg: vit.ViTConfig) -> np.ndarray:
  """timm ``VisionTransformer.forward_features`` + token pooling, in float64."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  d, h, p, eps = cfg.width, cfg.num_heads, cfg.patch_size, cfg.ln_eps
  hd = d // h
  x = images.astype(np.float64).transpose(0, 3, 1, 2)  # NCHW, as torch sees it
  bsz, c, height, width = x.shape
  gh, gw = height // p, width // p
  # A stride-p, size-p conv is a matmul over (c, kh, kw)-flattened patches.
  patches = x.reshape(bsz, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
  patches = patches.reshape(bsz, gh * gw, c * p * p)
  t = patches @ sd["patch_embed.proj.weight"].reshape(d, -1).T
  t = t + sd["patch_embed.proj.bias"]
  cls = np.broadcast_to(sd["cls_token"], (bsz, 1, d))
  t = np.concatenate([cls, t], axis=1) + sd["pos_embed"]
  n = t.shape[1]
  for i in range(cfg.depth):
    g = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
    y = _layer_norm(t, g("norm1.weight"), g("norm1.bias"), eps)
    qkv = y @ g("attn.qkv.weight").T + g("attn.qkv.bias")
    q, k, v = qkv.reshape(bsz, n, 3, h, hd).transpose(2, 0, 3, 1, 4)
    logits = (q * hd ** -0.5) @ k.swapaxes(-1, -2)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, d)
    t = t + o @ g("attn.proj.weight").T + g("attn.proj.bias")
    y = _layer_norm(t, g("norm2.weight"), g("norm2.bias"), eps)
    y = y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
    y = 0.5 * y * (1 + _erf(y / math.sqrt(2)))
    t = t + y @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
  return _layer_norm(t, sd["norm.weight"], sd["norm.bias"], eps)[:, 0]


def features(cfg, params, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(jax.jit(vit.VisionTransformer(cfg).apply)(
        {"params": params}, images))


@pytest.fixture(scope="module")
def timm_case(tmp_path_factory):
  sd = random_timm_state_dict(TINY)
  path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
  safetensors.numpy.save_file(sd, path)
  images = np.random.default_rng(1).uniform(
      0, 1, (3, TINY.image_size, TINY.image_size, 3)).astype(np.float32)
  return sd, path, images, numpy_vit(sd, images, TINY)


@pytest.mark.parametrize("qkv", ["fused", "split"])
def test_forward_matches_numpy_timm(timm_case, qkv):
  sd, path, images, want = timm_case
  cfg = dataclasses.replace(TINY, qkv=qkv)
  got = features(cfg, convert.load_timm_safetensors(path, cfg), images)
  assert got.shape == (3, TINY.width) and got.dtype == np.float32
  # The reference must not be degenerate, or the tolerance would prove nothing.
  assert np.abs(want[0] - want[1]).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_f32(timm_case):
  _, path, images, want = timm_case
  cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16)
  params = convert.load_timm_safetensors(path, cfg)
  got = np.asarray(jax.jit(vit.VisionTransformer(cfg).apply)(
      {"params": params}, images))
  assert got.dtype == np.float32 and np.isfinite(got).all()
  assert jax.tree.leaves(params)[0].dtype == np.float32
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert 0 < rel < 0.05, rel


def test_vit_b16_parameter_count():
  fused = vit.abstract_params(vit.vit_b16())
  split = vit.abstract_params(vit.vit_b16(qkv="split"))
  # timm vit_base_patch16_224 with num_classes=0 (docs/semantics.md §1).
  assert vit.count_params(fused) == 85_798_656
  assert vit.count_params(split) == 85_798_656
  assert vit.count_params(vit.abstract_params(vit.vit_s16())) == 21_665_664


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_parameter_tree_names_and_shapes():
  d, m, h, hd = 64, 128, 4, 16
  ln = {"scale": (d,), "bias": (d,)}
  dense = lambda i, o: {"kernel": (i, o), "bias": (o,)}  # noqa: E731
  mlp = {"fc1": dense(d, m), "fc2": dense(m, d)}
  fused_attn = {"qkv": dense(d, 3 * d), "proj": dense(d, d)}
  head = {"kernel": (d, h, hd), "bias": (h, hd)}
  split_attn = {"query": head, "key": head, "value": head,
                "out": {"kernel": (h, hd, d), "bias": (d,)}}
  for qkv, attn in (("fused", fused_attn), ("split", split_attn)):
    block = {"norm1": ln, "attn": attn, "norm2": ln, "mlp": mlp}
    want = {"patch_embed": {"kernel": (8, 8, 3, d), "bias": (d,)},
            "cls_token": (1, 1, d), "pos_embed": (1, 17, d),
            "blocks_0": block, "blocks_1": block, "norm": ln}
    cfg = dataclasses.replace(TINY, qkv=qkv)
    assert _shapes(vit.abstract_params(cfg)) == want


def test_random_init_is_finite_and_trainable():
  # One block and the 'rbg' PRNG keep XLA's CPU compile of the initialisers
  # short; threefry's is several times slower and tests nothing more here.
  cfg = dataclasses.replace(TINY, depth=1)
  params = vit.init_params(cfg, jax.random.key(0, impl="rbg"))
  assert _shapes(params) == _shapes(vit.abstract_params(cfg))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  target = rng.standard_normal((2, cfg.width)).astype(np.float32)

  def loss(p):
    f = vit.VisionTransformer(cfg).apply({"params": p}, images)
    return jnp.sum(f * target), f

  grads, feats = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert np.isfinite(feats).all()
  assert float(jnp.abs(feats[0] - feats[1]).max()) > 1e-3
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all(), path
    assert float(jnp.abs(g).max()) > 0, path


def test_rejects_wrong_image_size():
  params = vit.abstract_params(TINY)
  with pytest.raises(ValueError, match="expected images of shape"):
    jax.eval_shape(vit.VisionTransformer(TINY).apply, {"params": params},
                   jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32))


def test_config_validation():
  with pytest.raises(ValueError, match="qkv"):
    vit.ViTConfig(qkv="packed")
  with pytest.raises(ValueError, match="num_heads"):
    vit.ViTConfig(width=100, num_heads=3)
  assert hash(vit.vit_ti16()) == hash(vit.vit_ti16())


def test_gelu_matches_float64_erf_including_tails():
  x = np.linspace(-12.0, 12.0, 4001).astype(np.float32)
  want = 0.5 * x.astype(np.float64) * (1 + _erf(x.astype(np.float64) / math.sqrt(2)))
  got = np.asarray(jax.jit(vit._gelu)(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  # The derivative Φ(x) + x·φ(x), through autodiff of the erf form.
  dgot = np.asarray(jax.vmap(jax.grad(vit._gelu))(jnp.asarray(x)))
  xd = x.astype(np.float64)
  dwant = 0.5 * (1 + _erf(xd / math.sqrt(2))) + xd * np.exp(-xd * xd / 2) / math.sqrt(2 * math.pi)
  np.testing.assert_allclose(dgot, dwant, rtol=1e-5, atol=2e-6)
