"""SimpleCIL (Zhou et al., 2023): class-mean prototypes, cosine classifier.

The backbone stays frozen and nothing trains: after each task every new class
gets the mean of its training features as its classifier row, and logits are
``σ·cos(feature, row)`` with σ = 1 (the official ``CosineLinear`` sigma,
never trained). Rows of classes not seen yet are zero and score 0.
docs/methods.md gives the official code's arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["init_prototypes", "class_sums", "add_class_sums", "prototypes",
           "set_prototypes", "cosine_logits"]

_EPS = 1e-12                         # torch.nn.functional.normalize's floor
_HI = jax.lax.Precision.HIGHEST


def init_prototypes(num_classes: int, dim: int) -> jax.Array:
  """All-zero prototypes ``(num_classes, dim)``."""
  return jnp.zeros((num_classes, dim), jnp.float32)


def class_sums(features: jax.Array, labels: jax.Array, num_classes: int,
               valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(Σ features per class (C, d), count per class (C,))`` of one batch.

  ``valid`` (``(B,)`` bool) drops padded examples.
  """
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if valid is not None:
    onehot = onehot * valid[:, None]
  return (jnp.einsum("bc,bd->cd", onehot, features.astype(jnp.float32),
                     precision=_HI), onehot.sum(0))


def add_class_sums(a, b):
  """Adds two `class_sums` results (``a`` may be None)."""
  return b if a is None else (a[0] + b[0], a[1] + b[1])


def prototypes(sums: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Class means ``(C, d)``; zero rows for classes with no example."""
  total, count = sums
  return total / jnp.maximum(count, 1.0)[:, None]


def set_prototypes(protos: jax.Array, sums, classes: jax.Array) -> jax.Array:
  """``protos`` with the rows of ``classes`` (a bool ``(C,)`` mask) replaced
  by the means in ``sums``; other rows are kept (earlier tasks' classes)."""
  return jnp.where(classes[:, None], prototypes(sums), protos)


def _normalize(x):
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _EPS)


def cosine_logits(features: jax.Array, protos: jax.Array,
                  sigma: float | jax.Array = 1.0) -> jax.Array:
  """``σ · normalize(features) · normalize(protos)ᵀ``: ``(B, C)``."""
  return sigma * jnp.matmul(_normalize(features.astype(jnp.float32)),
                            _normalize(protos).T, precision=_HI)
