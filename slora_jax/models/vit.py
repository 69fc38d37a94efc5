"""A Flax Linen Vision Transformer that reproduces timm's ``VisionTransformer``.

Same function as timm's ViT with ``global_pool='token'``, ``fc_norm`` Identity,
no head and no dropout: pre-norm blocks, exact-erf GELU, a class token plus a
learned position embedding added to every token (class token included), and
the class token after the final LayerNorm as the feature.

Parameter tree (``D`` width, ``M`` MLP width, ``N`` patches, ``p`` patch)::

  patch_embed/{kernel (p, p, C, D), bias (D,)}
  cls_token (1, 1, D)
  pos_embed (1, 1 + N, D)
  blocks_{i}/norm1/{scale, bias}
  blocks_{i}/attn/qkv/{kernel (D, 3D), bias (3D,)}      # qkv='fused'
  blocks_{i}/attn/proj/{kernel (D, D), bias (D,)}
  blocks_{i}/attn/{query,key,value}/{kernel (D, H, hd), bias (H, hd)}
  blocks_{i}/attn/out/{kernel (H, hd, D), bias (D,)}    # qkv='split'
  blocks_{i}/norm2/{scale, bias}
  blocks_{i}/mlp/fc1/{kernel (D, M), bias (M,)}
  blocks_{i}/mlp/fc2/{kernel (M, D), bias (D,)}
  norm/{scale, bias}

The fused qkv columns are ordered q | k | v and head-major inside each third,
as in timm's ``reshape(B, N, 3, H, hd)``; `slora_jax.models.convert` moves
weights between the two layouts and from timm / AugReg checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ViTConfig", "VisionTransformer", "vit_b16", "vit_s16", "vit_ti16",
    "init_params", "abstract_params", "count_params", "PRESETS", "DTYPES",
    "preset", "dtype_from_name",
]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Static ViT hyper-parameters (frozen and hashable: a valid jit static).

  Attributes:
    image_size: input height and width in pixels.
    patch_size: side of the square patches (the patch-embedding conv stride).
    in_chans: input channels.
    width: token dimension D.
    depth: number of transformer blocks.
    num_heads: attention heads; must divide ``width``.
    mlp_dim: hidden width of the MLP.
    ln_eps: LayerNorm epsilon (timm ViTs use 1e-6).
    qkv: ``'fused'`` (one ``(D, 3D)`` Dense, as timm) or ``'split'``
      (``DenseGeneral`` query/key/value/out, as Flax attention).
    dtype: compute dtype of convs, matmuls and LayerNorm outputs. Parameters
      are always float32; the residual stream, the attention softmax and the
      returned features stay float32 whatever this is.
  """
  image_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  ln_eps: float = 1e-6
  qkv: str = "fused"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.qkv not in ("fused", "split"):
      raise ValueError(f"qkv must be 'fused' or 'split', got {self.qkv!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}")

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def seq_len(self) -> int:
    """Tokens per image, class token included."""
    return self.num_patches + 1

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def vit_b16(**overrides) -> ViTConfig:
  """ViT-B/16 (timm ``vit_base_patch16_224``); keywords override fields."""
  return ViTConfig(**overrides)


def vit_s16(**overrides) -> ViTConfig:
  """ViT-S/16: width 384, 6 heads, MLP 1536."""
  return ViTConfig(**{"width": 384, "num_heads": 6, "mlp_dim": 1536,
                      **overrides})


def vit_ti16(**overrides) -> ViTConfig:
  """ViT-Ti/16: width 192, 3 heads, MLP 768."""
  return ViTConfig(**{"width": 192, "num_heads": 3, "mlp_dim": 768,
                      **overrides})


# The one registry of named sizes and compute dtypes: the runner's config,
# the benchmark and the reference importer all resolve names here.
PRESETS = {"vit_b16": vit_b16, "vit_s16": vit_s16, "vit_ti16": vit_ti16}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_from_name(name: str):
  """The jnp dtype called ``name`` in `DTYPES`; ValueError names the choices."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
  return DTYPES[name]


def preset(name: str, **overrides) -> ViTConfig:
  """The `ViTConfig` of preset ``name`` (a key of `PRESETS`), fields overridden."""
  if name not in PRESETS:
    raise ValueError(f"unknown ViT preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  return PRESETS[name](**overrides)


# Initialisers only matter for training from scratch: pretrained weights
# replace them. These follow timm's "jax" init closely enough to train.
_dense_init = nn.initializers.xavier_uniform()
_embed_init = nn.initializers.truncated_normal(stddev=0.02)


def _layer_norm(cfg: ViTConfig, name: str, dtype=None) -> nn.LayerNorm:
  # Two-pass variance as in PyTorch: the fast E[x²]-E[x]² form loses digits
  # on the large residual activations of pretrained ViTs.
  return nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype or cfg.dtype,
                      use_fast_variance=False, name=name)


def _attention(q, k, v, scale):
  """Softmax attention on ``(B, H, T, hd)`` arrays; logits in float32.

  Written out rather than `jax.nn.dot_product_attention` on ``(B, T, H, hd)``:
  with heads ahead of tokens XLA:CPU emits both batched products without
  transposes around them, and at ViT-B/16 batch 4 one block's attention takes
  17 ms instead of 23 ms forward and 43 ms instead of 74 ms forward+backward
  (docs/benchmark.md). The softmax's division is applied to the ``(T, hd)``
  output rather than the ``(T, T)`` weights (a third of the elements at
  ViT-B/16; forward 3.7 -> 2.7 ms per block). The function is the same
  (outputs agree to 2e-6).
  """
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k,
                      preferred_element_type=jnp.float32)
  # Shifting by the row maximum changes nothing but the range of exp.
  e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return (o * (1 / e.sum(-1, keepdims=True))).astype(v.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with fused or split projections."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array, num_queries: int | None = None) -> jax.Array:
    """Attends from the first ``num_queries`` tokens (all if None) to all."""
    cfg = self.config
    b, n, d = x.shape
    h, hd = cfg.num_heads, cfg.head_dim
    if cfg.qkv == "fused":
      qkv = nn.Dense(3 * d, dtype=cfg.dtype, kernel_init=_dense_init,
                     name="qkv")(x)
      q, k, v = qkv.reshape(b, n, 3, h, hd).transpose(2, 0, 3, 1, 4)
    else:
      proj = functools.partial(nn.DenseGeneral, (h, hd), dtype=cfg.dtype,
                               kernel_init=_dense_init)
      q, k, v = (proj(name=name)(x).transpose(0, 2, 1, 3)
                 for name in ("query", "key", "value"))
    if num_queries is not None:
      q = q[:, :, :num_queries]
    o = _attention(q, k, v, hd ** -0.5).transpose(0, 2, 1, 3)
    if cfg.qkv == "fused":
      return nn.Dense(d, dtype=cfg.dtype, kernel_init=_dense_init,
                      name="proj")(o.reshape(b, o.shape[1], d))
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=cfg.dtype,
                           kernel_init=_dense_init, name="out")(o)


def _gelu(x):
  """Exact GELU, x·Φ(x), written as PyTorch's ``F.gelu`` computes it.

  ``0.5·x·(1 + erf(x/√2))`` is the same function as `jax.nn.gelu`'s
  erfc form (outputs agree to 1e-6 on N(0, 2²) inputs) and XLA:CPU runs it,
  forward and backward, in 8 ms instead of 14 ms per ViT-B/16 block at batch 4
  (docs/benchmark.md).
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * (1 / math.sqrt(2))))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, kernel_init=_dense_init,
                 name="fc1")(x)
    x = _gelu(x)
    return nn.Dense(cfg.width, dtype=cfg.dtype, kernel_init=_dense_init,
                    name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block; the residual stream stays float32.

  With ``class_token_only`` it returns only the first token's output, ``(B, 1,
  D)``: keys and values still come from every token, but the attention row,
  projection and MLP are computed for the class token alone.
  """
  config: ViTConfig
  class_token_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    queries = 1 if self.class_token_only else None
    y = Attention(cfg, name="attn")(_layer_norm(cfg, "norm1")(x), queries)
    if self.class_token_only:
      x = x[:, :1]
    x = x + y.astype(x.dtype)
    y = Mlp(cfg, name="mlp")(_layer_norm(cfg, "norm2")(x))
    return x + y.astype(x.dtype)


class VisionTransformer(nn.Module):
  """timm-equivalent ViT returning the final-norm class token.

  Attributes:
    config: the `ViTConfig`.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Computes features.

    Args:
      images: ``(B, image_size, image_size, in_chans)`` float, NHWC.

    Returns:
      ``(B, width)`` float32 features (class token after the final norm).
    """
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"expected images of shape (B, {expected[0]}, "
                       f"{expected[1]}, {expected[2]}), got {images.shape}")
    p, d = cfg.patch_size, cfg.width
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
                kernel_init=nn.initializers.lecun_normal(), name="patch_embed")(
                    images)
    b = x.shape[0]
    # Keep the residual stream in float32 (as AMP does) so that bf16 compute
    # does not accumulate rounding over the blocks.
    x = x.reshape(b, cfg.num_patches, d).astype(jnp.float32)
    cls = self.param("cls_token", _embed_init, (1, 1, d))
    pos = self.param("pos_embed", _embed_init, (1, cfg.seq_len, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos
    for i in range(cfg.depth):
      # Only the class token leaves the model, and after the last block's
      # attention every op is per token: that block computes the class
      # token's row alone (about 6% of a ViT-B/16 step's FLOPs saved).
      x = Block(cfg, class_token_only=i == cfg.depth - 1,
                name=f"blocks_{i}")(x)
    # LayerNorm acts per token, so normalising only the class token equals
    # timm's norm-all-then-take-token-0 at a fraction of the cost.
    return _layer_norm(cfg, "norm", dtype=jnp.float32)(x[:, 0])


def _dummy_images(config: ViTConfig) -> jax.Array:
  return jnp.zeros((1, config.image_size, config.image_size, config.in_chans),
                   jnp.float32)


def init_params(config: ViTConfig, rng: jax.Array) -> dict:
  """Randomly initialised float32 parameters (the ``'params'`` collection).

  Args:
    config: the model configuration.
    rng: a PRNG key.

  Returns:
    The nested parameter dict described in the module docstring.
  """
  return _init(config, rng)


# Module-level and keyed on the (hashable) config so that repeated calls reuse
# the compiled initialiser.
@functools.partial(jax.jit, static_argnums=0)
def _init(config: ViTConfig, rng: jax.Array) -> dict:
  return VisionTransformer(config).init(rng, _dummy_images(config))["params"]


@functools.lru_cache(maxsize=32)
def _abstract_params_cached(config: ViTConfig):
  model = VisionTransformer(config)
  # Everything inside the traced function: a concrete key or image would
  # start the XLA backend, after which jax.distributed.initialize() fails
  # (the runner validates its config before it initialises).
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), _dummy_images(config)))["params"]


def abstract_params(config: ViTConfig) -> dict:
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
  # Copy the containers so callers cannot mutate the cached tree.
  return jax.tree.map(lambda s: s, _abstract_params_cached(config))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
