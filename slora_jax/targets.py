"""Choosing which kernels of a Flax parameter tree get adapters.

A *target* is one adapted linear map: a whole 2-D ``Dense`` kernel, a
``DenseGeneral`` kernel whose leading ``in_dims`` axes are inputs, or a column
slice of a fused kernel (the q and v thirds of timm's ``(d, 3d)`` qkv kernel).
Targets are found by regular expressions over ``/``-joined leaf paths, which
are the same for Linen ``params`` dicts and ``nnx.State`` trees (whose leaf
paths end in ``/value``; that suffix is ignored).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax

__all__ = [
    "Target", "Rule", "kernel", "fused_slices", "find_targets",
    "leaf_path", "vit_qv_rules",
]


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted linear map inside a kernel leaf.

  Attributes:
    name: unique id, e.g. ``blocks_0/attn/qkv/kernel[q]``.
    path: ``/``-joined path of the kernel leaf.
    kernel_shape: full shape of that kernel.
    in_dims: number of leading kernel axes that are inputs.
    cols: ``(start, stop)`` on the flattened output axis, or None for all.
  """
  name: str
  path: str
  kernel_shape: tuple[int, ...]
  in_dims: int = 1
  cols: tuple[int, int] | None = None

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[:self.in_dims])

  @property
  def d_out_total(self) -> int:
    return math.prod(self.kernel_shape[self.in_dims:])

  @property
  def d_out(self) -> int:
    return self.d_out_total if self.cols is None else self.cols[1] - self.cols[0]


@dataclasses.dataclass(frozen=True)
class Rule:
  """A path pattern and how to cut the matched kernels into targets.

  Attributes:
    pattern: regex that must match the whole leaf path.
    in_dims: leading input axes of the matched kernels.
    parts: for fused kernels, the number of equal column blocks (3 for qkv).
    take: indices of the blocks to adapt, with names, e.g. ((0, 'q'), (2, 'v')).
  """
  pattern: str
  in_dims: int = 1
  parts: int = 1
  take: tuple[tuple[int, str], ...] = ()


def kernel(pattern: str, in_dims: int = 1) -> Rule:
  """Adapts every whole kernel whose path matches ``pattern``."""
  return Rule(pattern=pattern, in_dims=in_dims)


def fused_slices(pattern: str, parts: int = 3,
                 take: Sequence[tuple[int, str]] = ((0, "q"), (2, "v")),
                 in_dims: int = 1) -> Rule:
  """Adapts column blocks of fused kernels (default: q and v of a qkv kernel)."""
  return Rule(pattern=pattern, in_dims=in_dims, parts=parts, take=tuple(take))


def vit_qv_rules(qkv: str = "fused") -> tuple[Rule, ...]:
  """The reference target set for `slora_jax.models.vit`: q and v of every block."""
  if qkv == "fused":
    return (fused_slices(r"blocks_\d+/attn/qkv/kernel"),)
  if qkv == "split":
    return (kernel(r"blocks_\d+/attn/(query|value)/kernel"),)
  raise ValueError(f"qkv must be 'fused' or 'split', got {qkv!r}")


def leaf_path(path) -> str:
  """The ``/``-joined name of a tree path, without nnx's trailing ``/value``."""
  name = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
  return name[:-len("/value")] if name.endswith("/value") else name


def _natural_key(s: str):
  # blocks_10 must sort after blocks_9 so target order is block order.
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def find_targets(params: Any, rules: Sequence[Rule]) -> tuple[Target, ...]:
  """Lists the targets that ``rules`` select in ``params``, in block order.

  The first matching rule wins for each leaf. Raises ValueError if a rule
  matches nothing or a fused kernel does not split evenly.
  """
  compiled = [(re.compile(r.pattern), r) for r in rules]
  used = [False] * len(rules)
  found = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = leaf_path(path)
    for i, (rx, rule) in enumerate(compiled):
      if not rx.fullmatch(name):
        continue
      used[i] = True
      shape = tuple(leaf.shape)
      if len(shape) <= rule.in_dims:
        raise ValueError(
            f"{name}: shape {shape} has no output axis for in_dims={rule.in_dims}")
      if rule.parts == 1:
        found.append(Target(name, name, shape, rule.in_dims))
      else:
        width = math.prod(shape[rule.in_dims:])
        if width % rule.parts:
          raise ValueError(f"{name}: {width} output features do not split into "
                           f"{rule.parts} equal parts")
        step = width // rule.parts
        for idx, part in rule.take:
          found.append(Target(f"{name}[{part}]", name, shape, rule.in_dims,
                              (idx * step, (idx + 1) * step)))
      break
  missing = [r.pattern for r, u in zip(rules, used) if not u]
  if missing:
    raise ValueError(f"target rule(s) {missing} matched no parameter; paths look "
                     f"like {_example_paths(params)}")
  found.sort(key=lambda t: (_natural_key(t.path), t.cols or (0, 0)))
  return tuple(found)


def _example_paths(params, n: int = 4) -> list[str]:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [leaf_path(p) for p, _ in leaves[:n]]
