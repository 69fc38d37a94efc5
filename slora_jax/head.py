"""The classifier head: one linear layer over the backbone feature.

The reference grows its head every task (old rows copied, new rows drawn
U(±√(3/d)), bias 0; docs/semantics.md §4). We allocate all classes of the run at
once with that init and select the classes in play with a mask, so the head's
shape, and the compiled train step, never change. Independent draws make the
two equivalent in distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["init_head", "apply_head", "class_mask", "masked_logits"]


def init_head(rng: jax.Array, dim: int, num_classes: int) -> dict:
  """Head ``{'kernel': (dim, num_classes), 'bias': (num_classes,)}``."""
  bound = (3.0 / dim) ** 0.5  # kaiming_uniform with the 'linear' gain
  return {"kernel": jax.random.uniform(rng, (dim, num_classes), jnp.float32,
                                       -bound, bound),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def apply_head(head: dict, features: jax.Array) -> jax.Array:
  """Logits over every allocated class, in float32."""
  return (features.astype(jnp.float32) @ head["kernel"]) + head["bias"]


def class_mask(lo, hi, num_classes: int) -> jax.Array:
  """Boolean mask of the classes in ``[lo, hi)`` (``lo``, ``hi`` may be traced)."""
  c = jnp.arange(num_classes)
  return (c >= lo) & (c < hi)


def masked_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Logits with the classes outside ``mask`` at -inf-like values.

  Cross-entropy over these equals cross-entropy over the kept slice (the
  reference's ``logits[:, known:]``), and masked classes get zero gradient.
  """
  return jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
