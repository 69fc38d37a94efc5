"""SD-LoRA with adapter gradients from activations: the training-time form of
`apply_adapters`.

`apply_adapters` adds ΔW to the kernels. That is the right form for inference
(`merge`) but an expensive one to differentiate: the model's backward pass then
forms the kernel gradient xᵀ·dy for every adapted kernel — for timm's fused
qkv that is the whole (d, 3d) product, although only the adapter factors and
the magnitudes train. `apply_with_adapters` runs the same function without it:

* the whole ΔW (earlier directions and the current pair) is merged into the
  kernels *without* a gradient path, so the forward is the plain model's and
  its backward computes only dx;
* a custom VJP on each adapted map's output (`_tap`) supplies the gradients
  from that map's input x and output cotangent dy: the current pair's through
  x·Aᵀ and dy·B (O(N·d·r), no d×d product), and the magnitudes'
  ⟨xᵀdy, D_i⟩ = Σ_n (x A_iᵀ)·(dy B_i) over the *occupied* slots only, in
  chunks, with loops whose trip counts come from the stored-direction count:
  one compiled step serves every task, and task 0 of a 100-slot run costs
  what task 0 of a 1-slot run costs.

Values and gradients equal those of ``apply_fn(apply_adapters(params, a))``
(tested). The model code stays unaware of adapters: Linen modules are hooked
by Flax method interception (found by path), NNX's ``Linear``,
``LinearGeneral`` and ``Einsum`` layers by wrapping their ``__call__`` while
``apply_fn`` runs (found by their kernel). The tap is exact only if the
layer's output depends on its kernel W as ``x·W`` (its input times the
kernel's 2-D view), so that is established for each target's layer, never
assumed from shapes alone: Linen ``Dense``/``DenseGeneral``/``Einsum`` and
NNX ``Linear``/``LinearGeneral``/``Einsum`` with their own products are known;
any other Linen module is *probed* at trace time (it is run on random
kernels and inputs, and ``f(x, W1) − f(x, W0)`` must equal ``x·(W1 − W0)``
within float rounding: a kernel used transposed, scaled or normalised fails).
A layer that is neither raises a clear error naming the kernel; the weight
form (`apply_adapters`) works for any model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slora_jax import adapters as ad_lib
from slora_jax import targets as targets_lib

__all__ = ["apply_with_adapters", "stored_delta", "magnitude_cotangent"]

# Occupied slots are visited in chunks. Each chunk costs a fixed overhead
# (its (d_in, d_out) accumulator update and several small ops: about as much
# as 4 slots' products at ViT-B batch 4) plus its products, which run far
# below the matmul peak over few columns (60: ~30 GFLOP/s, 250: ~55). So a
# loop over chunks of ~_BIG_COLUMNS covers the bulk, and the remainder is
# split by its binary digits (16, 8, 4, 2, 1 slots at rank 10), each run at
# most once: exactly the occupied slots, in at most log2 small chunks.
_BIG_COLUMNS = 256
# Above this many stored columns per token, the magnitudes' gradient is
# cheaper through the kernel gradient G = xᵀdy (one 2·N·d_in·d_out product,
# then 2·d_in·d_out per column) than through x·Aᵀ and dy·B (4·N·d per column).
_G_ROUTE_COLUMNS_PER_TOKEN = 0.75


def _chunk_sizes(capacity: int, rank: int) -> list[int]:
  big = max(1, min(capacity, _BIG_COLUMNS // max(rank, 1)))
  sizes = [big]
  size = 1 << ((big - 1).bit_length() - 1) if big > 1 else 0   # ≤ big - 1
  while size:
    sizes.append(size)
    size //= 2
  return sizes


def _slots_loop(n, capacity, rank, body, init):
  """Folds ``body(start, k, carry)`` over chunks covering slots ``[0, n)``.

  Chunks never overlap or pass ``n``. The loops' trip counts are computed
  from ``n`` at run time: one program serves every task.
  """
  carry, start, rest = init, jnp.zeros((), jnp.int32), n
  for size in _chunk_sizes(capacity, rank):
    carry = jax.lax.fori_loop(
        0, rest // size,
        lambda i, c, size=size, start=start: body(start + i * size, size, c),
        carry)
    start, rest = start + (rest // size) * size, rest % size
  return carry


def _slots(x, start, k):
  return jax.lax.dynamic_slice_in_dim(x, start, k, 0)


def stored_delta(coef: jax.Array, a: jax.Array, b: jax.Array,
                 n: jax.Array, init: jax.Array | None = None) -> jax.Array:
  """init + Σ_{i<n} coef_i·(B_i A_i)ᵀ as ``(d_in, d_out)``, visiting occupied
  slots only.

  Args:
    coef: (C,) per-slot factors (magnitude × normalisation).
    a: (C, R, d_in) stored A factors.
    b: (C, d_out, R) stored B factors.
    n: int32 scalar, number of occupied slots (the first ``n``).
    init: optional ``(d_in, d_out)`` term to add to (zeros if None).
  """
  capacity, rank, d_in = a.shape
  d_out = b.shape[1]

  def body(start, k, acc):
    w = _slots(coef, start, k)
    return acc + jnp.einsum("cri,cor->io", _slots(a, start, k) * w[:, None, None],
                            _slots(b, start, k))

  if init is None:
    init = jnp.zeros((d_in, d_out), a.dtype)
  return _slots_loop(n, capacity, rank, body, init.astype(a.dtype))


def _put(x, start, part):
  # Chunks never overlap, so each slot is written once, over a zero.
  return jax.lax.dynamic_update_slice_in_dim(x, part, start, 0)


def magnitude_cotangent(x: jax.Array, g: jax.Array, a: jax.Array,
                        b: jax.Array, n: jax.Array) -> jax.Array:
  """(C,) ⟨xᵀg, B_i A_i⟩ for the occupied slots i < n, zero for the others.

  ``x`` (N, d_in) are a map's inputs and ``g`` (N, d_out) the cotangent of its
  outputs. Few stored directions go through the activations, x·A_iᵀ and
  g·B_i; many through G = xᵀg, whichever costs fewer FLOPs at run time.
  """
  capacity, rank, _ = a.shape
  tokens = x.shape[0]

  def through_activations(_):
    def body(start, k, dcoef):
      u = jnp.einsum("ni,cri->ncr", x, _slots(a, start, k))
      v = jnp.einsum("no,cor->ncr", g, _slots(b, start, k))
      return _put(dcoef, start, jnp.einsum("ncr,ncr->c", u, v))
    return _slots_loop(n, capacity, rank, body, jnp.zeros((capacity,), x.dtype))

  def through_kernel_gradient(_):
    grad_w = x.T @ g
    def body(start, k, dcoef):
      part = jnp.einsum("io,cri,cor->c", grad_w, _slots(a, start, k),
                        _slots(b, start, k))
      return _put(dcoef, start, part)
    return _slots_loop(n, capacity, rank, body, jnp.zeros((capacity,), x.dtype))

  # FLOPs: activations 4·N·(d_in+d_out)/2 per column, G 2·N·d_in·d_out once
  # plus 2·d_in·d_out per column; the switch is at the measured crossover.
  use_g = n * rank >= _G_ROUTE_COLUMNS_PER_TOKEN * tokens
  return jax.lax.cond(use_g, through_kernel_gradient, through_activations, None)


def _tap(cols, y, x, current, stored, n):
  """Identity on ``y``; its VJP supplies the adapter factors' cotangents.

  ``y`` is the output of a map whose kernel already holds the whole ΔW (the
  current pair included) with no gradient path, so the model's own backward
  pass yields dx; this adds, per target (``cols``: its output columns), from
  that target's output cotangent dy and input x:

  * the current pair, ``ΔW += s·(B A)ᵀ``: with u = x·Aᵀ and v = dy·B,
    ds = Σ u⊙v, dA = s·vᵀx and dB = s·dyᵀu (O(N·d·r), no d×d product);
  * the stored slots' coefficients, ⟨xᵀdy, B_iA_i⟩ for occupied slots only
    (`magnitude_cotangent`).
  """
  del cols, x, current, stored, n
  return y


_tap = jax.custom_vjp(_tap, nondiff_argnums=(0,))


def _tap_fwd(cols, y, x, current, stored, n):
  return y, (x, current, stored, n)


def _tap_bwd(cols, res, g):
  x, current, stored, n = res
  x2 = x.astype(jnp.float32)
  g2 = g.reshape(x.shape[0], -1).astype(jnp.float32)
  width = g2.shape[1]
  ranks = [a.shape[0] for a, _, _ in current]
  offsets = [sum(ranks[:i]) for i in range(len(ranks) + 1)]
  # All targets of the map at once, on the full output width: B of each
  # target sits in its own rows (output columns) and rank columns of one
  # (width, Σr) factor. Three products then serve every target, and the
  # cotangent is never sliced into (N, d_out) copies.
  a_all = jnp.concatenate([a.astype(jnp.float32) for a, _, _ in current])
  b_all = jnp.concatenate(
      [b.astype(jnp.float32) if span is None else
       jnp.pad(b.astype(jnp.float32), ((span[0], width - span[1]), (0, 0)))
       for span, (_, b, _) in zip(cols, current)], axis=1)
  u = x2 @ a_all.T                                   # (N, Σr)
  v = g2 @ b_all                                     # (N, Σr)
  uv = jnp.sum(u * v, axis=0)
  d_a_all = jnp.einsum("nr,ni->ri", v, x2)           # (Σr, d_in)
  d_b_all = jnp.einsum("nr,no->ro", u, g2)           # (Σr, width)
  d_current, d_stored = [], []
  for i, (span, (a, b, scale), (coef, prev_a, prev_b)) in enumerate(
      zip(cols, current, stored)):
    lo, hi = offsets[i], offsets[i + 1]
    c0, c1 = (0, width) if span is None else span
    d_current.append(((scale * d_a_all[lo:hi]).astype(a.dtype),
                      (scale * d_b_all[lo:hi, c0:c1].T).astype(b.dtype),
                      jnp.sum(uv[lo:hi]).astype(scale.dtype)))
    # Slicing inside the branch: task 0 (nothing stored) never copies it.
    d_coef = jax.lax.cond(
        n > 0,
        lambda g2=g2, c0=c0, c1=c1, prev_a=prev_a, prev_b=prev_b:
            magnitude_cotangent(x2, g2[:, c0:c1], prev_a, prev_b, n),
        lambda: jnp.zeros(coef.shape, jnp.float32))
    d_stored.append((d_coef.astype(coef.dtype), None, None))
  return g, None, tuple(d_current), tuple(d_stored), None


_tap.defvjp(_tap_fwd, _tap_bwd)


# --- where the adapted maps are called -----------------------------------------
#
# Linen has method interception (`nn.intercept_methods`) and module paths that
# are the parameter paths. NNX has neither: its linear layers are wrapped for
# the duration of the call, and a layer is recognised by its kernel, which is
# the very array `apply_fn` received (nnx.merge puts it into the Param as is).

_NNX_HOOK: contextvars.ContextVar = contextvars.ContextVar(
    "slora_jax_nnx_hook", default=None)
_NNX_LOCK = threading.Lock()
_NNX_USERS = 0


def _nnx_layers():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _hooked(call):
  @functools.wraps(call)
  def wrapper(self, *args, **kwargs):
    y = call(self, *args, **kwargs)
    hook = _NNX_HOOK.get()
    return y if hook is None else hook(self, args, kwargs, y)
  wrapper.slora_jax_original = call
  return wrapper


@contextlib.contextmanager
def _nnx_interception(hook):
  """Runs ``hook(module, args, kwargs, y)`` after every NNX linear layer call
  in this context (thread- and nesting-safe: the wrappers stay installed
  while any context is open and call the hook of their own context only)."""
  global _NNX_USERS
  layers = _nnx_layers()
  with _NNX_LOCK:
    if _NNX_USERS == 0:
      for cls in layers:
        cls.__call__ = _hooked(cls.__dict__["__call__"])
    _NNX_USERS += 1
  token = _NNX_HOOK.set(hook)
  try:
    yield
  finally:
    _NNX_HOOK.reset(token)
    with _NNX_LOCK:
      _NNX_USERS -= 1
      if _NNX_USERS == 0:
        for cls in layers:
          cls.__call__ = cls.__dict__["__call__"].slora_jax_original


def _module_key(path: str) -> str:
  """The Linen module path owning kernel leaf ``path`` (``params/`` dropped)."""
  parts = path.split("/")
  if parts[0] == "params":
    parts = parts[1:]
  return "/".join(parts[:-1])


def _kernel_value(module):
  kernel = getattr(module, "kernel", None)
  return kernel.get_value() if hasattr(kernel, "get_value") else kernel


def _inputs(args, kwargs):
  return args[0] if args else kwargs["inputs"]


# Attributes through which a known layer could compute something other than
# its plain product (a quantised dot_general, a promote_dtype that scales).
_PRODUCT_HOOKS = ("dot_general", "dot_general_cls", "promote_dtype",
                  "einsum_op")


def _default_of(module, name):
  field = getattr(type(module), "__dataclass_fields__", {}).get(name)
  if field is not None:                                   # Linen: a dataclass
    return field.default
  param = inspect.signature(type(module).__init__).parameters.get(name)
  return inspect.Parameter.empty if param is None else param.default


def _known_product(module, linen: bool) -> bool:
  """True if ``module`` is a Flax layer whose map of its kernel we know."""
  if linen:
    calls = (nn.Dense.__call__, nn.DenseGeneral.__call__, nn.Einsum.__call__)
    if getattr(type(module), "__call__", None) not in calls:
      return False
  return all(getattr(module, a) is _default_of(module, a)
             or getattr(module, a) == _default_of(module, a)
             for a in _PRODUCT_HOOKS if hasattr(module, a))


def apply_with_adapters(apply_fn: Callable[..., Any], params: Any,
                        adapters: ad_lib.AdapterState, *args, **kwargs) -> Any:
  """``apply_fn(params, *args, **kwargs)`` with the adapters, differentiated
  through activations.

  Same value and gradients (w.r.t. ``adapters.trainable``) as
  ``apply_fn(apply_adapters(params, adapters), *args, **kwargs)``, without
  forming the adapted kernels' gradients. ``apply_fn`` runs a Flax model on
  the parameters it is given:

  * Linen: ``lambda p, x: model.apply({'params': p}, x)``; the targets'
    modules are found by path: ``Dense``, ``DenseGeneral`` and ``Einsum``,
    and any other module whose output is verified, by probing it at trace
    time, to change with its kernel as input·kernel (e.g. Hugging Face
    GPT-2's ``Conv1D`` under ``layout='out_in'``);
  * NNX: ``lambda s, x: nnx.merge(graphdef, s)(x)``; ``nnx.Linear``,
    ``nnx.LinearGeneral`` and ``nnx.Einsum`` layers are found by their kernel
    (so ``apply_fn`` must not re-trace them, e.g. through ``nnx.jit``).

  Raises:
    ValueError: at trace time, if a target's layer was never called, or it
      is not a known layer and its map is not verified to be input·kernel
      (transposed, scaled, ...), or its contraction is not a linear map of
      the target's ``in_dims`` input axes.
  """
  spec = adapters.spec
  base, tap_state = _prepare(params, adapters)
  by_path: dict[str, list] = {}
  for t in spec.targets:
    by_path.setdefault(t.path, []).append(t)
  by_module = {_module_key(p): p for p in by_path}
  by_kernel = {id(leaf): (leaf, targets_lib.leaf_path(p)) for p, leaf in
               jax.tree_util.tree_leaves_with_path(base)
               if targets_lib.leaf_path(p) in by_path}
  called: set[str] = set()

  def tap(path, module, call_args, call_kwargs, y):
    called.add(path)
    return _tap_call(by_path[path], module, call_args, call_kwargs, y,
                     tap_state)

  def linen_hook(next_fun, f_args, f_kwargs, context):
    y = next_fun(*f_args, **f_kwargs)
    if _PROBING.get():
      return y
    path = by_module.get("/".join(str(p) for p in context.module.path))
    if context.method_name != "__call__" or path is None:
      return y
    t0 = by_path[path][0]
    if not (_known_product(context.module, linen=True)
            and t0.layout == "in_out"):
      _probe_linen(context.module, f_args, f_kwargs, t0)
    return tap(path, context.module, f_args, f_kwargs, y)

  def nnx_hook(module, call_args, call_kwargs, y):
    value, path = by_kernel.get(id(_kernel_value(module)), (None, None))
    if value is None or value is not _kernel_value(module):
      return y
    t0 = by_path[path][0]
    if not _known_product(module, linen=False) or t0.layout != "in_out":
      raise _unsupported(
          path, f"{type(module).__name__} with layout={t0.layout!r} or a "
          f"replaced product function is not a plain x·kernel, so the "
          f"activation form cannot give its exact gradients")
    return tap(path, module, call_args, call_kwargs, y)

  with nn.intercept_methods(linen_hook), _nnx_interception(nnx_hook):
    out = apply_fn(base, *args, **kwargs)
  missing = sorted(set(by_path) - called)
  if missing:
    raise ValueError(
        f"apply_with_adapters: the layer(s) owning adapter targets {missing} "
        f"were never called by apply_fn. It must run a Linen model whose "
        f"module paths match the parameter paths, or an NNX model built by "
        f"nnx.merge from the parameters it receives, whose targets are "
        f"nnx.Linear/LinearGeneral/Einsum kernels; use the weight form "
        f"(apply_adapters) otherwise")
  return out


def _prepare(params, adapters):
  """The kernels holding the whole ΔW with no gradient path, and what the
  taps need to give the adapters their gradients."""
  spec = adapters.spec
  adapters = adapters.replace(frozen=jax.lax.stop_gradient(adapters.frozen))
  frozen = adapters.frozen
  n = frozen["num_stored"]
  coefs = ad_lib.slot_coefficients(adapters)
  sg = jax.lax.stop_gradient
  deltas, current = {}, {}
  for t in spec.targets:
    prev = frozen["previous"][t.name]
    cur = adapters.trainable["current"][t.name]
    scale = ad_lib.current_scale(adapters, cur["A"], cur["B"])
    current[t.name] = (cur["A"], cur["B"], scale)
    deltas[t.name] = stored_delta(
        sg(coefs[t.name]), prev["A"], prev["B"], n,
        init=ad_lib.current_delta(sg(cur["A"]), sg(cur["B"]), sg(scale)))
  # The whole ΔW folded into the kernels as a constant to autodiff: the
  # model's backward pass then costs what the plain model's does, and `_tap`
  # supplies the adapters' gradients.
  base = ad_lib.apply_deltas(params, spec, deltas)
  return base, (current, coefs, frozen, n)


# --- the layer's contraction as a (N, d_in) -> (N, d_out) map ------------------

def _unsupported(path, why):
  return ValueError(f"apply_with_adapters: {path}: {why}; use the weight form "
                    f"(apply_adapters)")


_PROBING: contextvars.ContextVar = contextvars.ContextVar(
    "slora_jax_probing", default=False)


def _probe_linen(module, call_args, call_kwargs, target):
  """Raises unless ``module``'s output depends on its kernel W as x·W.

  An unknown module is run twice, eagerly, on random parameters and a random
  input of its call's shapes, with kernels W0 and W1; then
  ``f(x, W1) − f(x, W0)`` must equal ``x·(W1 − W0)`` on the target's 2-D
  view, within a rounding bound of the sums involved. A kernel used
  transposed, scaled, normalised or passed through a nonlinearity fails.
  """
  name = target.path.rsplit("/", 1)[-1]
  x = _inputs(call_args, call_kwargs)
  others = [a for a in (*call_args[1:], *call_kwargs.values())
            if isinstance(a, jax.core.Tracer)]
  variables = module.variables
  if others or name not in variables.get("params", {}):
    raise _unsupported(target.path, f"{type(module).__name__} is no Flax "
                       f"Dense/DenseGeneral/Einsum and its map could not be "
                       f"probed (traced extra arguments or no '{name}' param)")
  rng = np.random.default_rng(0)
  rand = lambda a: rng.uniform(-1, 1, np.shape(a)).astype(np.float32)
  probe = jax.tree.map(rand, dict(variables))
  k0 = probe["params"][name]
  k1 = rand(k0)
  # A small batch: the map of the kernel cannot depend on the batch size.
  xp = rand(np.empty(((min(x.shape[0], 2),) + x.shape[1:]) if x.ndim > 1
                     else x.shape, np.int8))
  args = (xp,) + tuple(call_args[1:]) if call_args else ()
  kwargs = dict(call_kwargs, **({} if call_args else {"inputs": xp}))
  clone = module.clone(parent=None)
  token = _PROBING.set(True)
  try:
    with jax.ensure_compile_time_eval():
      ys = [np.asarray(clone.apply(
          {**probe, "params": {**probe["params"], name: k}}, *args, **kwargs),
          np.float64) for k in (k0, k1)]
  except Exception as e:   # pylint: disable=broad-exception-caught
    raise _unsupported(target.path, f"{type(module).__name__} is no Flax "
                       f"Dense/DenseGeneral/Einsum and probing its map failed "
                       f"({type(e).__name__})") from None
  finally:
    _PROBING.reset(token)
  _check_probe(target, module, xp, (k0, k1), ys)


def _view(target, k):
  """The kernel's (d_in, d_out_total) view."""
  if target.layout == "in_out":
    return k.reshape(target.d_in, target.d_out_total)
  return k.reshape(target.d_out_total, target.d_in).T


def _check_probe(target, module, x, kernels, ys):
  k0, k1 = (_view(target, np.asarray(k, np.float64)) for k in kernels)
  xs = np.asarray(x, np.float64).reshape(-1, target.d_in)
  want = xs @ (k1 - k0)
  got = ys[1] - ys[0]
  lead = x.shape[:x.ndim - target.in_dims]
  if (x.shape[len(lead):] != target.in_shape
      or got.shape != lead + target.out_shape):
    raise _unsupported(target.path, f"{type(module).__name__} is no Flax "
                       f"Dense/DenseGeneral/Einsum and maps "
                       f"{x.shape} to {got.shape}, not a linear map of "
                       f"{target.in_dims} input axis/axes with kernel "
                       f"{target.kernel_shape} (layout={target.layout!r})")
  # float32 sums of d_in products, each output and both kernels' products.
  eps = np.finfo(np.float32).eps
  bound = (target.d_in + 2) * eps * (np.abs(xs) @ (np.abs(k0) + np.abs(k1))
                                     + np.abs(ys[0]).reshape(want.shape)
                                     + np.abs(ys[1]).reshape(want.shape))
  if not np.all(np.abs(got.reshape(want.shape) - want) <= bound):
    raise _unsupported(
        target.path, f"{type(module).__name__} is no Flax Dense/DenseGeneral/"
        f"Einsum and its output does not change with the kernel as "
        f"input·kernel (layout={target.layout!r}): it uses the kernel in "
        f"another way (transposed, scaled, ...), so the activation form "
        f"cannot give its exact gradients")


def _einsum_perms(eq, x_ndim, in_dims, path):
  """Axis orders that make ``einsum(eq, x, kernel)`` a product of
  ``x (..., kernel inputs)`` with the kernel's ``(d_in, d_out)`` view."""
  eq = eq.replace(" ", "")
  lhs, rest = eq.split(",")
  rhs, out = rest.split("->")
  if "..." in rhs:
    raise _unsupported(path, f"einsum {eq!r} has an ellipsis on the kernel")
  if "..." in lhs:
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    fill = "".join(spare[:x_ndim - len(lhs) + 3])
    lhs, out = lhs.replace("...", fill), out.replace("...", fill)
  k_in, k_out = rhs[:in_dims], rhs[in_dims:]
  free = [c for c in lhs if c not in rhs]
  ok = (set(k_in) <= set(lhs) and not set(k_in) & set(out)
        and not set(k_out) & set(lhs) and sorted(out) == sorted(free + list(k_out))
        and len(set(lhs)) == len(lhs) and len(set(rhs)) == len(rhs))
  if not ok:
    raise _unsupported(
        path, f"einsum {eq!r} is not a product of the input with the kernel's "
        f"first {in_dims} axis/axes as inputs and the rest as outputs")
  return ([lhs.index(c) for c in free + list(k_in)],
          [out.index(c) for c in free + list(k_out)])


def _layer_perms(module, call_args, call_kwargs, x, path, in_dims):
  """(x axis order, y axis order) putting the contracted input axes and the
  kernel's output axes last, in kernel order."""
  eq = call_kwargs.get("einsum_str")
  if eq is None and len(call_args) > 1 and isinstance(call_args[1], str):
    eq = call_args[1]
  eq = eq or getattr(module, "einsum_str", None)
  if eq:
    return _einsum_perms(eq, x.ndim, in_dims, path)
  if getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None):
    raise _unsupported(path, "a layer with batch dimensions is not one map")
  # Dense, Linear and unknown modules: the trailing ``in_dims`` axes.
  axis = getattr(module, "axis", tuple(range(x.ndim - in_dims, x.ndim)))
  axis = tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
  if len(axis) != in_dims:
    raise _unsupported(path, f"the layer contracts {len(axis)} input axis/axes "
                       f"but the target has in_dims={in_dims}")
  return [a for a in range(x.ndim) if a not in axis] + list(axis), None


def _tap_call(tgts, module, call_args, call_kwargs, y, tap_state):
  """The layer's output ``y`` through `_tap`, seen as a map (N, d_in) ->
  (N, d_out) of its contracted input axes (a transposition where needed)."""
  current, coefs, frozen, n = tap_state
  t0 = tgts[0]
  x = _inputs(call_args, call_kwargs)
  x_perm, y_perm = _layer_perms(module, call_args, call_kwargs, x, t0.path,
                                t0.in_dims)
  y_perm = y_perm or list(range(y.ndim))
  xt = x if x_perm == sorted(x_perm) else jnp.transpose(x, x_perm)
  yt = y if y_perm == sorted(y_perm) else jnp.transpose(y, y_perm)
  lead = xt.shape[:xt.ndim - t0.in_dims]
  if (xt.shape[len(lead):] != t0.in_shape
      or yt.shape != lead + t0.out_shape):
    raise _unsupported(
        t0.path, f"the layer maps {x.shape} to {y.shape}, which is not a "
        f"linear map of {t0.in_dims} input axis/axes with kernel "
        f"{t0.kernel_shape}")
  cols = tuple(t.cols for t in tgts)
  cur = tuple(current[t.name] for t in tgts)
  stored = tuple((coefs[t.name], frozen["previous"][t.name]["A"],
                  frozen["previous"][t.name]["B"]) for t in tgts)
  out = _tap(cols, yt, xt.reshape(-1, t0.d_in), cur, stored, n)
  return out if yt is y else jnp.transpose(out, np.argsort(y_perm))
