"""Choosing which kernels of a Flax parameter tree get adapters.

A *target* is one adapted linear map: a whole 2-D ``Dense`` kernel, a
``DenseGeneral`` kernel whose leading ``in_dims`` axes are inputs, a kernel
stored output-first (``layout='out_in'``: Hugging Face GPT-2's ``Conv1D``,
PyTorch-converted weights), or a slice of a fused kernel's output axis (the q
and v thirds of timm's ``(d, 3d)`` qkv kernel). Targets are found by regular
expressions that must match the *whole* ``/``-joined leaf path
(``re.fullmatch``), which is the same for Linen ``params`` dicts and
``nnx.State`` trees (whose leaf paths end in ``/value``; that suffix is
ignored).
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
    in_dims: number of kernel axes that are inputs.
    cols: ``(start, stop)`` on the flattened output axis, or None for all.
    layout: ``'in_out'``: the first ``in_dims`` axes are the inputs (Flax);
      ``'out_in'``: the last ``in_dims`` are, the outputs come first.
  """
  name: str
  path: str
  kernel_shape: tuple[int, ...]
  in_dims: int = 1
  cols: tuple[int, int] | None = None
  layout: str = "in_out"

  @property
  def in_shape(self) -> tuple[int, ...]:
    k = self.kernel_shape
    return k[:self.in_dims] if self.layout == "in_out" else k[-self.in_dims:]

  @property
  def out_shape(self) -> tuple[int, ...]:
    k = self.kernel_shape
    return k[self.in_dims:] if self.layout == "in_out" else k[:-self.in_dims]

  @property
  def d_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def d_out_total(self) -> int:
    return math.prod(self.out_shape)

  @property
  def d_out(self) -> int:
    return self.d_out_total if self.cols is None else self.cols[1] - self.cols[0]


@dataclasses.dataclass(frozen=True)
class Rule:
  """A path pattern and how to cut the matched kernels into targets.

  Attributes:
    pattern: regex that must match the whole leaf path (``re.fullmatch``).
    in_dims: number of input axes of the matched kernels.
    parts: for fused kernels, the number of equal output blocks (3 for qkv).
    take: indices of the blocks to adapt, with names, e.g. ((0, 'q'), (2, 'v')).
    layout: ``'in_out'`` (Flax: inputs first) or ``'out_in'`` (outputs
      first); None is ``'in_out'`` unless a fused kernel's shape makes it
      ambiguous (then it must be said).
    any_shape: also adapt leaves that are no linear map of a layer's input
      (convolution kernels of 4+ axes, embedding tables) as the matrix their
      axes reshape to; off by default.
  """
  pattern: str
  in_dims: int = 1
  parts: int = 1
  take: tuple[tuple[int, str], ...] = ()
  layout: str | None = None
  any_shape: bool = False

  def __post_init__(self):
    if self.layout not in _LAYOUTS + (None,):
      raise ValueError(f"layout must be one of {_LAYOUTS}, got {self.layout!r}")
    if self.in_dims < 1:
      raise ValueError(f"in_dims must be at least 1, got {self.in_dims}")


_LAYOUTS = ("in_out", "out_in")


def kernel(pattern: str, in_dims: int = 1, *, layout: str | None = None,
           any_shape: bool = False) -> Rule:
  """Adapts every whole kernel whose path matches ``pattern``.

  ``pattern`` is a regular expression matched against the *whole* path
  (``re.fullmatch``): ``attention/self/query/kernel`` matches no BERT kernel,
  ``.*attention/self/query/kernel`` matches every layer's. With
  ``layout='in_out'`` (Flax's; the default) the first ``in_dims`` axes are
  inputs and the rest outputs; ``'out_in'`` is a kernel stored outputs first, ``(out, in)``
  (Hugging Face GPT-2's ``Conv1D``, PyTorch's ``Linear``). ``any_shape``
  opts in to leaves that are no layer's linear map (conv kernels with 4+
  axes, embedding tables), adapted as their reshaped matrix.
  """
  return Rule(pattern=pattern, in_dims=in_dims, layout=layout,
              any_shape=any_shape)


def fused_slices(pattern: str, parts: int = 3,
                 take: Sequence[tuple[int, str]] = ((0, "q"), (2, "v")),
                 in_dims: int = 1, *, layout: str | None = None) -> Rule:
  """Adapts blocks of fused kernels' output axis (default: q and v of qkv).

  ``pattern`` must match the whole path (``re.fullmatch``); ``layout`` says
  which axes are outputs, as in `kernel`: GPT-2's ``c_attn`` ``(3d, d)``
  needs ``layout='out_in'``. A kernel whose input axis is ``parts`` times
  its output axis is ambiguous (GPT-2's ``c_attn`` read as Flax's layout
  looks so): it is refused unless ``layout`` is given.
  """
  return Rule(pattern=pattern, in_dims=in_dims, parts=parts, take=tuple(take),
              layout=layout)


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
  extra = f", in_dims={rule.in_dims}" if rule.in_dims != 1 else ""
  extra += f", layout={rule.layout!r}" if rule.layout else ""
  if rule.parts == 1:
    return f"kernel({rule.pattern!r}{extra})"
  return (f"fused_slices({rule.pattern!r}, parts={rule.parts}, "
          f"take={rule.take!r}{extra})")


def _not_a_map(name: str, shape: tuple[int, ...], rule: Rule) -> str | None:
  """Why leaf ``name`` is no layer's linear map (its kind), or None."""
  if len(shape) <= rule.in_dims:
    return "no output axis"
  if rule.any_shape:
    return None
  if name.rsplit("/", 1)[-1] == "embedding":
    return "an embedding table"
  if len(shape) >= 4 and rule.in_dims == 1:
    return "a convolution kernel"
  return None


_ADVICE = {
    "no output axis": "narrow the pattern to kernels (e.g. '.*/kernel') or "
                      "lower in_dims",
    "an embedding table": "narrow the pattern (e.g. '.*/kernel'), or pass "
                          "any_shape=True to adapt the table as a matrix",
    "a convolution kernel": "narrow the pattern, or pass any_shape=True for "
                            "a low-rank update of the kernel reshaped to "
                            "(its first axis, the rest)",
}


def _cut(name: str, shape: tuple[int, ...], rule: Rule) -> list[Target] | str:
  """The targets ``rule`` makes of leaf ``name``, or why it cannot."""
  layout = rule.layout or "in_out"
  probe = Target(name, name, shape, rule.in_dims, layout=layout)
  if rule.parts == 1:
    return [probe]
  width = probe.d_out_total
  if rule.layout is None and probe.d_in == rule.parts * width:
    return (f"{name} has shape {shape}: its input axis is {rule.parts} times "
            f"its output axis, so the fused axis may be the input (a kernel "
            f"stored (out, in), like GPT-2's c_attn, needs layout='out_in'); "
            f"say layout='in_out' if it is stored (in, out)")
  if width % rule.parts:
    return (f"{name} has {width} output features, which do not split into "
            f"{rule.parts} equal parts")
  step = width // rule.parts
  bad = [i for i, _ in rule.take if not 0 <= i < rule.parts]
  if bad:
    return f"take indices {bad} are outside the {rule.parts} parts"
  return [Target(f"{name}[{part}]", name, shape, rule.in_dims,
                 (idx * step, (idx + 1) * step), layout)
          for idx, part in rule.take]


def _shape_problems(rule: Rule, kinds: dict[str, list], leaves) -> list[str]:
  """One sentence per kind of leaf that ``rule`` matched but cannot adapt."""
  out = []
  for kind, hits in kinds.items():
    one = len(hits) == 1
    count = "1 leaf" if one else f"{len(hits):,} leaves"
    name, shape = hits[0]
    others = ", ".join(f"{n} {s}" for n, s in hits[1:3])
    others += f" and {len(hits) - 3:,} more" if len(hits) > 3 else ""
    if kind == "no output axis":
      what = (f"{count} with no output axis ({name} has shape {shape}: no "
              f"output axis after {rule.in_dims} input axis/axes, so it is no "
              f"2-D kernel{'; also ' + others if others else ''})")
    else:
      what = (f"{count} that {'is' if one else 'are'} {kind}, no linear map "
              f"({name} {shape}{', ' + others if others else ''})")
    out.append(f"{_describe(rule)} matches {what}; {_ADVICE[kind]}; nearest "
               f"kernels: {nearest_paths(rule.pattern, leaves)}")
  return out


def find_targets(params: Any, rules: Sequence[Rule]) -> tuple[Target, ...]:
  """Lists the targets that ``rules`` select in ``params``, in block order.

  The first matching rule wins for each leaf.

  Raises:
    ValueError: one error listing every rule that is not a valid regex,
      matches no parameter (saying so when it matches part of a path: rules
      match whole paths), matches leaves that are no linear map (one
      sentence per rule and kind: no output axis, a convolution kernel, an
      embedding table) or that it cannot cut (a fused width that does not
      split, or a fused axis that looks like the input), each with the
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
  used, found, unfit = set(), [], {}
  for name, shape in leaves:
    for rx, rule in compiled:
      if rx.fullmatch(name):
        used.add(id(rule))
        kind = _not_a_map(name, shape, rule)
        cut = kind or _cut(name, shape, rule)
        if kind:
          unfit.setdefault(id(rule), (rule, {}))[1].setdefault(
              kind, []).append((name, shape))
        elif isinstance(cut, str):
          problems.append(f"{_describe(rule)} matches {cut}; nearest kernels: "
                          f"{nearest_paths(rule.pattern, leaves)}")
        else:
          found.extend(cut)
        break
  for rule, kinds in unfit.values():
    problems.extend(_shape_problems(rule, kinds, leaves))
  for rx, rule in compiled:
    if id(rule) not in used:
      problems.append(f"{_describe(rule)} matched no parameter"
                      f"{_partial_match(rx, leaves)}; nearest paths: "
                      f"{nearest_paths(rule.pattern, leaves)}")
  if problems:
    raise ValueError("adapter targets: " + "; ".join(problems))
  found.sort(key=lambda t: (_natural_key(t.path), t.cols or (0, 0)))
  return tuple(found)


def _partial_match(rx, leaves) -> str:
  """A hint when ``rx`` matches part of a path: rules match whole paths."""
  hits = [name for name, _ in leaves if rx.search(name)]
  if not hits:
    return ""
  return (f" (rules match whole paths, re.fullmatch; it matches part of "
          f"{len(hits):,} path(s) such as {hits[0]!r}: start it with '.*' "
          f"to match those)")


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
