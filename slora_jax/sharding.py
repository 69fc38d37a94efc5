"""Shardings for an adapter state whose kernels are sharded over a mesh.

`apply_adapters`, `merge` and `apply_with_adapters` keep each kernel's
sharding (ΔW is added to the kernel where it lies). The factors follow their
kernel's 2-D view ``(d_in, d_out)``: a factor's ``d_in`` axis (A's last) is
sharded as the kernel's input axis, its ``d_out`` axis (B's first after any
slot axis) as the kernel's output axis, and the small axes (rank, slot) and
every scalar (magnitudes, scales, the count) are replicated. So ``x·Aᵀ``
contracts over the axis the kernel's own product contracts over, and ``dy·B``
over the one its output is split along.

A kernel axis counts as sharded for the view only if it is the first of its
group (input axes, output axes) and no later axis of the group is sharded:
only then is the flattened axis split into the same contiguous blocks. A
factor axis whose length the mesh axis does not divide (e.g. the q third of
a fused qkv kernel over 5 devices) is replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from slora_jax import adapters as adapters_lib
from slora_jax import targets as targets_lib

__all__ = ["adapter_shardings", "shard_adapters"]


def _group_axis(spec: tuple, mesh, length: int):
  """The mesh axis (or axes) splitting a flattened group of kernel axes."""
  if not spec or spec[0] is None or any(s is not None for s in spec[1:]):
    return None
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  size = math.prod(mesh.shape[n] for n in names)
  return spec[0] if length % size == 0 else None


def _target_specs(target: targets_lib.Target, sharding) -> tuple:
  if not isinstance(sharding, NamedSharding):
    return None, None
  spec = tuple(sharding.spec) + (None,) * (len(target.kernel_shape)
                                          - len(sharding.spec))
  mesh = sharding.mesh
  k = target.in_dims if target.layout == "in_out" else -target.in_dims
  ins, outs = (spec[:k], spec[k:]) if k > 0 else (spec[k:], spec[:k])
  return (_group_axis(ins, mesh, target.d_in),
          _group_axis(outs, mesh, target.d_out))


def adapter_shardings(adapters: adapters_lib.AdapterState,
                      params: Any) -> adapters_lib.AdapterState:
  """An `AdapterState`-shaped tree of `NamedSharding`s for ``adapters``,
  derived from the shardings of ``params``' target kernels (see the module
  docstring). Use it with ``jax.device_put`` or as ``out_shardings``.

  Raises:
    ValueError: if no target kernel has a `NamedSharding` (nothing to follow).
  """
  spec = adapters.spec
  kernels = {targets_lib.leaf_path(p): getattr(x, "sharding", None)
             for p, x in jax.tree_util.tree_leaves_with_path(params)}
  named = [kernels.get(t.path) for t in spec.targets]
  meshes = [s.mesh for s in named if isinstance(s, NamedSharding)]
  if not meshes:
    raise ValueError("adapter_shardings: no target kernel has a NamedSharding; "
                     "put params on a mesh first (jax.device_put)")
  mesh = meshes[0]
  rep = NamedSharding(mesh, P())
  current, previous = {}, {}
  for t, sharding in zip(spec.targets, named):
    d_in, d_out = _target_specs(t, sharding)
    current[t.name] = {"A": NamedSharding(mesh, P(None, d_in)),
                       "B": NamedSharding(mesh, P(d_out, None))}
    previous[t.name] = {"A": NamedSharding(mesh, P(None, None, d_in)),
                        "B": NamedSharding(mesh, P(None, d_out, None)),
                        "scale": rep}
  trainable = {"current": current,
               "magnitudes": jax.tree.map(lambda _: rep,
                                          adapters.trainable["magnitudes"])}
  frozen = {"previous": previous, "absorbed": rep, "num_stored": rep}
  return adapters.replace(trainable=trainable, frozen=frozen)


def shard_adapters(adapters: adapters_lib.AdapterState,
                   params: Any) -> adapters_lib.AdapterState:
  """``adapters`` placed by `adapter_shardings` (call after `init_adapters`
  and after each `begin_task`, whose new factors start unplaced)."""
  return jax.device_put(adapters, adapter_shardings(adapters, params))
