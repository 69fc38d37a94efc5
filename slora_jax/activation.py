"""SD-LoRA on activations: the training-time form of `apply_adapters`.

`apply_adapters` adds ΔW to the kernels. That is the right form for inference
(`merge`) but an expensive one to differentiate: the model's backward pass then
forms the kernel gradient xᵀ·dy for every adapted kernel — for timm's fused
qkv that is the whole (d, 3d) product, although only the adapter factors and
the magnitudes train. `apply_with_adapters` runs the same function without it:

* earlier directions are merged into the kernels *without* a gradient path, so
  the model's backward computes only dx through them;
* the current pair enters on the activations, ``y += c·(x Aᵀ) Bᵀ`` on its
  columns, so its gradient costs O(N·d·r);
* the magnitudes' gradient ⟨xᵀdy, D_i⟩ = Σ_n (x A_iᵀ)·(dy B_i) is supplied by a
  custom VJP (`_magnitude_tap`) that visits only the *occupied* slots, in
  chunks, with a loop whose trip count is the stored-direction count: one
  compiled step serves every task, and task 0 of a 100-slot run costs what
  task 0 of a 1-slot run costs.

Values and gradients equal those of ``apply_fn(apply_adapters(params, a))``
(tested). The hook is Flax Linen method interception, so the model code stays
unaware of adapters; the targets must be kernels of Linen modules whose
``__call__`` contracts the trailing ``in_dims`` axes of the input (``nn.Dense``,
``nn.DenseGeneral`` with trailing axes). Anything else raises a clear error at
trace time; the weight form (`apply_adapters`) works for any model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slora_jax import adapters as ad_lib

__all__ = ["apply_with_adapters", "stored_delta", "magnitude_cotangent"]

# Occupied slots are visited in chunks: products over few stored columns run
# far below the matmul peak on CPU (60 columns: ~30 GFLOP/s, 250: ~55, on
# ViT-B shapes), so whole chunks of ~_BIG_COLUMNS cover the bulk and chunks of
# ~_SMALL_COLUMNS the rest, keeping the cost close to proportional to the
# number of stored directions.
_SMALL_COLUMNS = 128
_BIG_COLUMNS = 256
# Above this many stored columns per token, the magnitudes' gradient is
# cheaper through the kernel gradient G = xᵀdy (one 2·N·d_in·d_out product,
# then 2·d_in·d_out per column) than through x·Aᵀ and dy·B (4·N·d per column).
_G_ROUTE_COLUMNS_PER_TOKEN = 0.75


def _chunk(capacity: int, rank: int, columns: int) -> int:
  return max(1, min(capacity, columns // max(rank, 1)))


def _slots_loop(n, capacity, rank, body, init):
  """Folds ``body(start, k, weights, carry)`` over the chunks of slots < n.

  ``weights`` (k,) is 1 for the slots of the chunk this call must count and 0
  for the rest: past ``n``, or counted already (the last small chunk's start
  is clamped to stay inside the capacity, so it may overlap). The loops' trip
  counts depend on ``n`` at run time: one program for every task.
  """
  big = _chunk(capacity, rank, _BIG_COLUMNS)
  small = _chunk(capacity, rank, _SMALL_COLUMNS)
  n_big = (n // big) * big

  def big_step(i, carry):
    return body(i * big, big, jnp.ones((big,), jnp.float32), carry)

  def small_step(i, carry):
    first = n_big + i * small
    start = jnp.minimum(first, capacity - small)
    idx = start + jnp.arange(small)
    weights = ((idx >= first) & (idx < n)).astype(jnp.float32)
    return body(start, small, weights, carry)

  carry = jax.lax.fori_loop(0, n // big, big_step, init)
  trips = (n - n_big + small - 1) // small
  return jax.lax.fori_loop(0, trips, small_step, carry)


def _slots(x, start, k):
  return jax.lax.dynamic_slice_in_dim(x, start, k, 0)


def stored_delta(coef: jax.Array, a: jax.Array, b: jax.Array,
                 n: jax.Array) -> jax.Array:
  """Σ_{i<n} coef_i·(B_i A_i)ᵀ as ``(d_in, d_out)``, visiting occupied slots only.

  Args:
    coef: (C,) per-slot factors (magnitude × normalisation).
    a: (C, R, d_in) stored A factors.
    b: (C, d_out, R) stored B factors.
    n: int32 scalar, number of occupied slots (the first ``n``).
  """
  capacity, rank, d_in = a.shape
  d_out = b.shape[1]

  def body(start, k, weights, acc):
    w = _slots(coef, start, k) * weights
    return acc + jnp.einsum("cri,cor->io", _slots(a, start, k) * w[:, None, None],
                            _slots(b, start, k))

  return _slots_loop(n, capacity, rank, body, jnp.zeros((d_in, d_out), a.dtype))


def _add_at(x, start, part):
  k = part.shape[0]
  return jax.lax.dynamic_update_slice_in_dim(x, _slots(x, start, k) + part,
                                             start, 0)


def magnitude_cotangent(x: jax.Array, g: jax.Array, a: jax.Array,
                        b: jax.Array, n: jax.Array) -> jax.Array:
  """(C,) ⟨xᵀg, B_i A_i⟩ for the occupied slots i < n, zero for the others.

  ``x`` (N, d_in) are a map's inputs and ``g`` (N, d_out) the cotangent of its
  outputs. Few stored directions go through the activations, x·A_iᵀ and
  g·B_i; many through G = xᵀg, whichever costs fewer FLOPs at run time.
  """
  capacity, rank, d_in = a.shape
  d_out = b.shape[1]
  tokens = x.shape[0]

  def through_activations(_):
    def body(start, k, weights, dcoef):
      u = jnp.einsum("ni,cri->ncr", x, _slots(a, start, k))
      v = jnp.einsum("no,cor->ncr", g, _slots(b, start, k))
      return _add_at(dcoef, start, jnp.einsum("ncr,ncr->c", u, v) * weights)
    return _slots_loop(n, capacity, rank, body, jnp.zeros((capacity,), x.dtype))

  def through_kernel_gradient(_):
    grad_w = x.T @ g
    def body(start, k, weights, dcoef):
      part = jnp.einsum("io,cri,cor->c", grad_w, _slots(a, start, k),
                        _slots(b, start, k))
      return _add_at(dcoef, start, part * weights)
    return _slots_loop(n, capacity, rank, body, jnp.zeros((capacity,), x.dtype))

  # FLOPs: activations 4·N·(d_in+d_out)/2 per column, G 2·N·d_in·d_out once
  # plus 2·d_in·d_out per column; the switch is at the measured crossover.
  use_g = n * rank >= _G_ROUTE_COLUMNS_PER_TOKEN * tokens
  return jax.lax.cond(use_g, through_kernel_gradient, through_activations, None)


@jax.custom_vjp
def _magnitude_tap(y, x, coef, a, b, n):
  """Identity on ``y``; its VJP adds d(loss)/d(coef) for the stored part.

  ``y`` is added to the output columns of a map whose kernel already holds
  Σ coef_i·D_i (with no gradient path), so ``y``'s cotangent is those
  columns' cotangent dy; this supplies coef's cotangent
  ⟨xᵀ dy, D_i⟩ = Σ_tokens (x A_iᵀ)·(dy B_i), for occupied slots only.
  """
  del x, coef, a, b, n
  return y


def _tap_fwd(y, x, coef, a, b, n):
  return y, (x, coef, a, b, n)


def _tap_bwd(res, g):
  x, coef, a, b, n = res
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  g2 = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  dcoef = magnitude_cotangent(x2, g2, a, b, n).astype(coef.dtype)
  return g, None, dcoef, None, None, None


_magnitude_tap.defvjp(_tap_fwd, _tap_bwd)


def _module_key(path: str) -> str:
  """The Linen module path owning kernel leaf ``path`` (``params/`` dropped)."""
  parts = path.split("/")
  if parts[0] == "params":
    parts = parts[1:]
  return "/".join(parts[:-1])


def apply_with_adapters(apply_fn: Callable[..., Any], params: Any,
                        adapters: ad_lib.AdapterState, *args, **kwargs) -> Any:
  """``apply_fn(params, *args, **kwargs)`` with the adapters on activations.

  Same value and gradients (w.r.t. ``adapters.trainable``) as
  ``apply_fn(apply_adapters(params, adapters), *args, **kwargs)``, without
  forming the adapted kernels' gradients. ``apply_fn`` must run a Flax Linen
  model whose module paths are the targets' paths (e.g.
  ``lambda p, x: model.apply({'params': p}, x)``).

  Raises:
    ValueError: at trace time, if a target's module was never called, or
      its input/output shapes do not fit a trailing-axes linear map.
  """
  spec = adapters.spec
  adapters = adapters.replace(frozen=jax.lax.stop_gradient(adapters.frozen))
  frozen = adapters.frozen
  n = frozen["num_stored"]
  coefs = ad_lib.slot_coefficients(adapters)

  by_module: dict[str, list] = {}
  stored = {}
  for t in spec.targets:
    prev = frozen["previous"][t.name]
    stored[t.name] = stored_delta(jax.lax.stop_gradient(coefs[t.name]),
                                  prev["A"], prev["B"], n)
    by_module.setdefault(_module_key(t.path), []).append(t)
  # Kernels with the earlier directions folded in; constants to autodiff.
  base = jax.lax.stop_gradient(ad_lib.apply_deltas(params, spec, stored))

  called: set[str] = set()

  def interceptor(next_fun, f_args, f_kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*f_args, **f_kwargs)
    key = "/".join(str(p) for p in context.module.path)
    tgts = by_module.get(key)
    if not tgts:
      return next_fun(*f_args, **f_kwargs)
    y = next_fun(*f_args, **f_kwargs)
    called.add(key)
    return _add_adapter_terms(adapters, tgts, f_args[0], y, coefs, n)

  with nn.intercept_methods(interceptor):
    out = apply_fn(base, *args, **kwargs)
  missing = sorted(set(by_module) - called)
  if missing:
    raise ValueError(
        f"apply_with_adapters: the Linen module(s) {missing} owning adapter "
        f"targets were never called by apply_fn; is it a Linen model whose "
        f"module paths match the parameter paths? Use the weight form "
        f"(apply_adapters) otherwise")
  return out


def _add_adapter_terms(adapters, tgts, x, y, coefs, n):
  t0, frozen = tgts[0], adapters.frozen
  lead = x.shape[:x.ndim - t0.in_dims]
  if (x.shape[len(lead):] != t0.kernel_shape[:t0.in_dims]
      or y.shape != lead + t0.kernel_shape[t0.in_dims:]):
    raise ValueError(
        f"apply_with_adapters: {t0.path} maps {x.shape} to {y.shape}, which "
        f"is not a linear map on the trailing {t0.in_dims} axis/axes with "
        f"kernel {t0.kernel_shape}; use the weight form (apply_adapters)")
  x2 = x.reshape(lead + (t0.d_in,))
  y2 = y.reshape(lead + (t0.d_out_total,))
  pieces = []
  for t in tgts:
    cur = adapters.trainable["current"][t.name]
    prev = frozen["previous"][t.name]
    scale = ad_lib._current_scale(adapters, cur["A"], cur["B"])
    h = jnp.einsum("...i,ri->...r", x2.astype(jnp.float32), cur["A"]) * scale
    d = jnp.einsum("...r,or->...o", h, cur["B"]).astype(y2.dtype)
    # d is added to the map's output columns, so its cotangent is theirs.
    d = _magnitude_tap(d, x2, coefs[t.name], prev["A"], prev["B"], n)
    pieces.append((t.cols, d))
  return ad_lib._add_columns(y2, pieces).reshape(y.shape)
