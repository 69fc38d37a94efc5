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
import difflib
import math
import re
from typing import Any, Sequence

import jax
import numpy as np

__all__ = [
    "Target", "Rule", "kernel", "fused_slices", "find_targets",
    "leaf_path", "vit_qv_rules", "nearest_paths", "check_targets",
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


def _describe(rule: Rule) -> str:
  if rule.parts == 1:
    extra = f", in_dims={rule.in_dims}" if rule.in_dims != 1 else ""
    return f"kernel({rule.pattern!r}{extra})"
  return (f"fused_slices({rule.pattern!r}, parts={rule.parts}, "
          f"take={rule.take!r})")


def _cut(name: str, shape: tuple[int, ...], rule: Rule) -> list[Target] | str:
  """The targets ``rule`` makes of leaf ``name``, or why it cannot."""
  if len(shape) <= rule.in_dims:
    return (f"{name} has shape {shape}: no output axis after its first "
            f"{rule.in_dims} input axis/axes, so it is no 2-D kernel")
  if rule.parts == 1:
    return [Target(name, name, shape, rule.in_dims)]
  width = math.prod(shape[rule.in_dims:])
  if width % rule.parts:
    return (f"{name} has {width} output features, which do not split into "
            f"{rule.parts} equal parts")
  step = width // rule.parts
  bad = [i for i, _ in rule.take if not 0 <= i < rule.parts]
  if bad:
    return f"take indices {bad} are outside the {rule.parts} parts"
  return [Target(f"{name}[{part}]", name, shape, rule.in_dims,
                 (idx * step, (idx + 1) * step)) for idx, part in rule.take]


def find_targets(params: Any, rules: Sequence[Rule]) -> tuple[Target, ...]:
  """Lists the targets that ``rules`` select in ``params``, in block order.

  The first matching rule wins for each leaf.

  Raises:
    ValueError: one error listing every rule that is not a valid regex,
      matches no parameter, or matches a leaf it cannot cut into 2-D maps
      (no output axis, a fused width that does not split), each with the
      nearest parameter paths.
  """
  compiled, problems = [], []
  for r in rules:
    try:
      compiled.append((re.compile(r.pattern), r))
    except re.error as e:
      problems.append(f"{_describe(r)}: not a valid regular expression ({e})")
  leaves = [(leaf_path(p), tuple(np.shape(x)))
            for p, x in jax.tree_util.tree_leaves_with_path(params)]
  used, found = set(), []
  for name, shape in leaves:
    for rx, rule in compiled:
      if rx.fullmatch(name):
        used.add(id(rule))
        cut = _cut(name, shape, rule)
        if isinstance(cut, str):
          problems.append(f"{_describe(rule)} matches {cut}; nearest kernels: "
                          f"{nearest_paths(rule.pattern, leaves)}")
        else:
          found.extend(cut)
        break
  for rx, rule in compiled:
    if id(rule) not in used:
      problems.append(f"{_describe(rule)} matched no parameter; nearest "
                      f"paths: {nearest_paths(rule.pattern, leaves)}")
  if problems:
    raise ValueError("adapter targets: " + "; ".join(problems))
  found.sort(key=lambda t: (_natural_key(t.path), t.cols or (0, 0)))
  return tuple(found)


def nearest_paths(pattern: str, leaves, n: int = 3) -> list[str]:
  """The ``n`` leaf paths most like ``pattern`` (its regex syntax dropped),
  2-D-able kernels first. ``leaves`` is a tree or ``(path, shape)`` pairs."""
  if not isinstance(leaves, list):
    leaves = [(leaf_path(p), tuple(np.shape(x)))
              for p, x in jax.tree_util.tree_leaves_with_path(leaves)]
  plain = re.sub(r"\\[dDwWsS]|[\\^$.|?*+()\[\]{}]", "", pattern)
  kernels = [p for p, shape in leaves if len(shape) >= 2] or [p for p, _ in leaves]
  return difflib.get_close_matches(plain, kernels, n=n, cutoff=0.0)


def check_targets(params: Any, targets: Sequence[Target]) -> None:
  """Raises ValueError unless every target's kernel is in ``params`` with
  its shape (e.g. adapters saved for another model), naming the nearest."""
  shapes = {leaf_path(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_leaves_with_path(params)}
  problems = []
  for t in targets:
    if t.path not in shapes:
      problems.append(f"{t.path} does not exist; nearest paths: "
                      f"{nearest_paths(t.path, list(shapes.items()))}")
    elif shapes[t.path] != t.kernel_shape:
      problems.append(f"{t.path} has shape {shapes[t.path]}, the adapters "
                      f"expect {t.kernel_shape}")
  if problems:
    raise ValueError("adapter targets do not fit these parameters: "
                     + "; ".join(dict.fromkeys(problems)))
