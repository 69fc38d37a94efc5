"""InfLoRA (Liang & Li, CVPR 2024): designed, frozen A; trained B; merged.

Every adapted layer (a block's fused qkv kernel; its k and v columns are the
targets) gets, for task t, one ``A_t`` of shape ``(r, d_in)`` shared by its
targets and one trainable ``B_t`` of shape ``(d_out, r)`` per target:

    W_target = W0 + Σ_{i<t} (B_i A_i)ᵀ + (B_t A_t)ᵀ    (kernel layout, d_in×d_out)

Before task t, ``A_t`` is the top-r left singular vectors (over √3) of the
layer's mean input covariance with the earlier tasks' subspace (the DualGPM
memory) projected out; after it, ``B_t A_t`` is merged into the kernel and the
memory grows from the covariance of the trained model. docs/methods.md gives
the official code's arithmetic this follows, quirks included.

Array functions are jit-able; the memory update, whose basis widths depend on
the data, is NumPy on the host (it runs once per task).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from slora_jax import adapters as adapters_lib
from slora_jax import policy as policy_lib
from slora_jax import targets as targets_lib

__all__ = [
    "DEFAULT_RULES", "Memory", "find_targets", "layer_paths", "capture_inputs",
    "input_moments", "add_moments", "mean_covariances", "design_a", "zero_b",
    "lora_deltas", "apply_lora", "threshold", "update_memory", "projector",
]

# k and v of every block's fused qkv kernel, as the official Attention_LoRA.
DEFAULT_RULES = (targets_lib.fused_slices(r"blocks_\d+/attn/qkv/kernel",
                                          take=((1, "k"), (2, "v"))),)
_HI = jax.lax.Precision.HIGHEST   # no TF32/bf16 passes in the statistics


def find_targets(params: Any, rules=DEFAULT_RULES):
  """The adapted maps (`slora_jax.Target`s) ``rules`` select, in block order."""
  return targets_lib.find_targets(params, rules)


def layer_paths(targets: Sequence[targets_lib.Target]) -> tuple[str, ...]:
  """The distinct kernel paths of ``targets``: one A (and memory) per path."""
  return tuple(dict.fromkeys(t.path for t in targets))


def capture_inputs(fn: Callable[[], Any], paths: Sequence[str]):
  """Calls ``fn()`` and records the inputs of the Linen layers owning ``paths``.

  Args:
    fn: runs a Linen model (e.g. ``lambda: model.apply(vars, images)``).
    paths: kernel paths such as ``blocks_0/attn/qkv/kernel``.

  Returns:
    ``(fn's output, {path: input array})``; works under jit.
  """
  owners = {p.rsplit("/", 1)[0]: p for p in paths}
  seen = {}

  def interceptor(next_fn, args, kwargs, context):
    scope = context.module.scope
    if context.method_name == "__call__" and scope is not None:
      path = owners.get("/".join(scope.path))
      if path is not None:
        seen[path] = args[0]
    return next_fn(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = fn()
  missing = set(paths) - set(seen)
  if missing:
    raise ValueError(f"no layer called for {sorted(missing)}")
  return out, seen


def input_moments(inputs: dict[str, jax.Array]) -> dict[str, tuple]:
  """``{path: (Σ x xᵀ over every token, token count)}`` of captured inputs."""
  out = {}
  for path, x in inputs.items():
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    out[path] = (jnp.einsum("nd,ne->de", x, x, precision=_HI),
                 jnp.asarray(x.shape[0], jnp.float32))
  return out


def add_moments(a: dict | None, b: dict) -> dict:
  """Sums two `input_moments` results (``a`` may be None)."""
  if a is None:
    return b
  return {p: (a[p][0] + b[p][0], a[p][1] + b[p][1]) for p in b}


def mean_covariances(moments: dict) -> dict[str, jax.Array]:
  """The mean uncentred covariance ``Σ x xᵀ / N`` per path."""
  return {p: s / n for p, (s, n) in moments.items()}


def design_a(cov: jax.Array, proj: jax.Array, retain: jax.Array | bool,
             rank: int) -> jax.Array:
  """A ``(rank, d)``: top left singular vectors of the projected cov., /√3.

  ``M = P·cov`` when the memory is of the 'retain' kind (``P`` projects onto
  what may still change), else ``M = cov − P·cov`` (``P`` onto what is
  protected; all zeros before the first memory). Each row's sign is fixed so
  that its largest entry is positive: SVD signs are arbitrary and B, trained
  from zero, absorbs any sign, so ``B·A`` does not depend on the choice.
  """
  pc = jnp.matmul(proj, cov, precision=_HI)
  m = jnp.where(retain, pc, cov - pc)
  u, _, _ = jnp.linalg.svd(m, full_matrices=False)
  a = u[:, :rank].T / math.sqrt(3.0)
  big = jnp.take_along_axis(a, jnp.argmax(jnp.abs(a), axis=1)[:, None], 1)
  return a * jnp.where(big < 0, -1.0, 1.0)


def zero_b(targets: Sequence[targets_lib.Target], rank: int) -> dict:
  """``{target name: zeros (d_out, rank)}``: B at the start of a task."""
  return {t.name: jnp.zeros((t.d_out, rank), jnp.float32) for t in targets}


def lora_deltas(targets, a: dict, b: dict) -> dict[str, jax.Array]:
  """``{name: Aᵀ Bᵀ}``: each target's update ``(B A)ᵀ`` in kernel layout."""
  return {t.name: jnp.einsum("rd,or->do", a[t.path], b[t.name], precision=_HI)
          for t in targets}


def apply_lora(params: Any, targets, a: dict, b: dict) -> Any:
  """``params`` with ``(B A)ᵀ`` added to each target's kernel columns.

  Differentiable in ``b`` (and ``a``); also the merge after a task.
  """
  # apply_deltas reads only the spec's targets.
  spec = adapters_lib.AdapterSpec(tuple(targets), 1, 1, policy_lib.reference())
  return adapters_lib.apply_deltas(params, spec, lora_deltas(targets, a, b))


def threshold(task: int, num_tasks: int, lamb: float, lame: float) -> float:
  """The memory's energy threshold after 0-based ``task``: lamb → lame."""
  return (lame - lamb) * task / num_tasks + lamb


@dataclasses.dataclass(frozen=True)
class Memory:
  """One layer's DualGPM memory.

  Attributes:
    basis: ``(d, k)`` orthonormal columns (float64).
    retain: False: the basis spans the protected subspace ('remove');
      True: it spans its complement ('retain').
  """
  basis: np.ndarray
  retain: bool


def projector(memory: Memory | None, d: int) -> tuple[np.ndarray, bool]:
  """``(U Uᵀ as float32, retain)`` for `design_a`; zeros before any memory."""
  if memory is None:
    return np.zeros((d, d), np.float32), False
  u = memory.basis
  return (u @ u.T).astype(np.float32), memory.retain


def update_memory(memory: Sequence[Memory | None], covs: Sequence[Any],
                  thresh: float, dual: bool = True) -> list[Memory]:
  """Grows each layer's memory from its covariance after a task (host NumPy).

  ``dual=True`` is DualGPM (InfLoRA's class-incremental runs); ``False`` the
  plain GPM of its DomainNet runs (never switches to 'retain').

  Raises:
    ValueError: where the official code fails its own assertion (a first
      memory wider than d/2 kept as 'retain').
  """
  out = []
  for mem, cov in zip(memory, covs):
    cov = np.asarray(cov, np.float64)
    if mem is None:
      out.append(_first_memory(cov, thresh, dual))
    elif not mem.retain:
      out.append(_grow_remove(mem, cov, thresh))
    else:
      out.append(_grow_retain(mem, cov, thresh))
  return [_summary(m, dual) for m in out]


def _svd(m, full=False):
  """NumPy's SVD (LAPACK gesdd, as the official code), and where gesdd
  reports no convergence, which it does on some covariance residuals (met
  on the demo's task 2), SciPy's gesvd of the same matrix."""
  try:
    return np.linalg.svd(m, full_matrices=full)
  except np.linalg.LinAlgError:
    return scipy.linalg.svd(m, full_matrices=full, lapack_driver="gesvd")


def _first_memory(cov, thresh, dual):
  u, s, _ = _svd(cov)
  ratio = s ** 2 / np.sum(s ** 2)
  r = int(np.sum(np.cumsum(ratio) < thresh))
  retain = dual and r >= cov.shape[0] / 2
  return Memory(u[:, :max(r, 1)], retain)


def _grow_remove(mem, cov, thresh):
  total = np.sum(_svd(cov)[1] ** 2)
  u0 = mem.basis
  u, s, _ = _svd(cov - u0 @ (u0.T @ cov))
  acc = (total - np.sum(s ** 2)) / total
  r = 0
  for ratio in s ** 2 / total:       # add directions until the energy is kept
    if acc >= thresh:
      break
    acc += ratio
    r += 1
  if r == 0:
    return mem
  grown = np.hstack([u0, u[:, :r]])
  return Memory(grown[:, :grown.shape[0]], False)


def _grow_retain(mem, cov, thresh):
  total = np.sum(_svd(cov)[1] ** 2)
  u0 = mem.basis
  u, s, _ = _svd(u0 @ (u0.T @ cov))
  acc = np.sum(s ** 2) / total
  r = 0
  for ratio in s ** 2 / total:       # take directions out of the free space
    if acc < 1 - thresh:
      break
    acc -= ratio
    r += 1
  if r == 0:
    return mem
  ur = u[:, :r]
  left = _svd(u0 - ur @ (ur.T @ u0), full=True)[0]
  return Memory(left[:, :u0.shape[1] - r], True)


def _summary(mem, dual):
  d, k = mem.basis.shape
  if dual and not mem.retain and k > d / 2:
    # Store the (smaller) complement instead.
    return Memory(_svd(mem.basis, full=True)[0][:, k:], True)
  if mem.retain and k > d / 2:
    raise ValueError(f"a 'retain' memory of {k} > {d}/2 directions: the "
                     "official update_DualGPM asserts against this")
  return mem
