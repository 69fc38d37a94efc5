"""Torch-free, strict converters between checkpoints and `slora_jax.models.vit`.

Two on-disk layouts are supported:

* timm ``model.safetensors`` (PyTorch ``state_dict`` names and layouts), e.g.
  ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``, the SD-LoRA backbone;
  its ``pytorch_model.bin`` (the same ``state_dict``, pickled) is read by the
  runner with torch and converted here by `from_timm_state_dict`.
* The AugReg ``.npz`` layout of google-research/vision_transformer
  (``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/...``).

Every conversion goes through an explicit table of rules, one per leaf of the
fused-qkv parameter tree, that names the checkpoint key(s), their expected
shapes and the reshape in each direction. Loading is strict: a missing key, an
unconsumed key or a wrong shape raises `CheckpointMismatchError`; only the
classifier (``head``, ``pre_logits``) is skipped, because SD-LoRA trains its
own head on the final-norm class token. A file that cannot be read at all
(truncated, corrupt, another format) raises `UnreadableCheckpointError`, one
line naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import pathlib
import zipfile
from typing import Any, Callable

import jax
import numpy as np
import safetensors
import safetensors.numpy

from slora_jax.models import vit as vit_lib

__all__ = [
    "CheckpointMismatchError", "UnreadableCheckpointError", "load_pretrained",
    "load_timm_safetensors", "from_timm_state_dict", "save_timm_safetensors",
    "load_big_vision_npz", "save_big_vision_npz",
    "to_split_qkv", "to_fused_qkv", "to_timm_arrays",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

_TIMM_IGNORED = ("head.",)
_BIG_VISION_IGNORED = ("head/", "pre_logits/")
_MAX_REPORTED = 5


class CheckpointMismatchError(ValueError):
  """A checkpoint's keys or shapes do not fit the model configuration."""


class UnreadableCheckpointError(ValueError):
  """A weights file cannot be read: truncated, corrupt, or another format."""


def _unreadable(path, kind: str, why: str) -> UnreadableCheckpointError:
  why = " ".join(str(why).split()) or "unknown reason"
  return UnreadableCheckpointError(
      f"{path}: not a readable {kind} file ({why}); it may be truncated or "
      "corrupt: download it again")


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How checkpoint array(s) become one leaf of the fused-layout tree.

  Attributes:
    dst: ``/``-joined leaf path in the (fused) parameter tree.
    src: checkpoint keys feeding that leaf.
    src_shapes: their expected shapes, in checkpoint layout.
    load: ``load(*src_arrays) -> leaf``.
    save: ``save(leaf) -> tuple of src arrays`` (the inverse of ``load``).
    is_pos_embed: the source may be resized to another patch grid.
  """
  dst: str
  src: tuple[str, ...]
  src_shapes: tuple[tuple[int, ...], ...]
  load: Callable[..., np.ndarray]
  save: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  is_pos_embed: bool = False


def _same(dst: str, src: str, shape: tuple[int, ...], **kw) -> _Rule:
  return _Rule(dst, (src,), (shape,), lambda a: a, lambda a: (a,), **kw)


def _permuted(dst: str, src: str, shape: tuple[int, ...],
              axes: tuple[int, ...]) -> _Rule:
  """``leaf = src.transpose(axes)``; ``shape`` is the checkpoint's shape."""
  inverse = tuple(int(i) for i in np.argsort(axes))
  return _Rule(dst, (src,), (shape,), lambda a: a.transpose(axes),
               lambda a: (a.transpose(inverse),))


def _timm_rules(cfg: vit_lib.ViTConfig) -> list[_Rule]:
  d, m, p, c = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.in_chans

  def linear(dst, src, d_in, d_out):
    # torch Linear stores (out, in); Flax Dense stores (in, out).
    return [_permuted(f"{dst}/kernel", f"{src}.weight", (d_out, d_in), (1, 0)),
            _same(f"{dst}/bias", f"{src}.bias", (d_out,))]

  def norm(dst, src):
    return [_same(f"{dst}/scale", f"{src}.weight", (d,)),
            _same(f"{dst}/bias", f"{src}.bias", (d,))]

  rules = [
      # torch conv (out, in, kh, kw) -> Flax HWIO.
      _permuted("patch_embed/kernel", "patch_embed.proj.weight", (d, c, p, p),
                (2, 3, 1, 0)),
      _same("patch_embed/bias", "patch_embed.proj.bias", (d,)),
      _same("cls_token", "cls_token", (1, 1, d)),
      _same("pos_embed", "pos_embed", (1, cfg.seq_len, d), is_pos_embed=True),
  ]
  for i in range(cfg.depth):
    ours, theirs = f"blocks_{i}", f"blocks.{i}"
    rules += norm(f"{ours}/norm1", f"{theirs}.norm1")
    rules += linear(f"{ours}/attn/qkv", f"{theirs}.attn.qkv", d, 3 * d)
    rules += linear(f"{ours}/attn/proj", f"{theirs}.attn.proj", d, d)
    rules += norm(f"{ours}/norm2", f"{theirs}.norm2")
    rules += linear(f"{ours}/mlp/fc1", f"{theirs}.mlp.fc1", d, m)
    rules += linear(f"{ours}/mlp/fc2", f"{theirs}.mlp.fc2", m, d)
  rules += norm("norm", "norm")
  return rules


def _big_vision_rules(cfg: vit_lib.ViTConfig) -> list[_Rule]:
  d, m, p, c = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.in_chans
  h, hd = cfg.num_heads, cfg.head_dim

  def dense(dst, src, d_in, d_out):
    return [_same(f"{dst}/kernel", f"{src}/kernel", (d_in, d_out)),
            _same(f"{dst}/bias", f"{src}/bias", (d_out,))]

  def norm(dst, src):
    return [_same(f"{dst}/scale", f"{src}/scale", (d,)),
            _same(f"{dst}/bias", f"{src}/bias", (d,))]

  # Per-head (D, H, hd) / (H, hd) arrays flatten head-major, which is exactly
  # the column order inside each third of timm's fused qkv.
  def fuse_kernels(q, k, v):
    return np.concatenate([a.reshape(d, d) for a in (q, k, v)], axis=1)

  def split_kernel(w):
    return tuple(a.reshape(d, h, hd) for a in np.split(w, 3, axis=1))

  def fuse_biases(q, k, v):
    return np.concatenate([a.reshape(d) for a in (q, k, v)])

  def split_bias(b):
    return tuple(a.reshape(h, hd) for a in np.split(b, 3))

  enc = "Transformer"
  rules = [
      _same("patch_embed/kernel", "embedding/kernel", (p, p, c, d)),
      _same("patch_embed/bias", "embedding/bias", (d,)),
      _same("cls_token", "cls", (1, 1, d)),
      _same("pos_embed", f"{enc}/posembed_input/pos_embedding",
            (1, cfg.seq_len, d), is_pos_embed=True),
  ]
  for i in range(cfg.depth):
    ours, theirs = f"blocks_{i}", f"{enc}/encoderblock_{i}"
    att = f"{theirs}/MultiHeadDotProductAttention_1"
    qkv = ("query", "key", "value")
    rules += norm(f"{ours}/norm1", f"{theirs}/LayerNorm_0")
    rules += [
        _Rule(f"{ours}/attn/qkv/kernel",
              tuple(f"{att}/{n}/kernel" for n in qkv), ((d, h, hd),) * 3,
              fuse_kernels, split_kernel),
        _Rule(f"{ours}/attn/qkv/bias",
              tuple(f"{att}/{n}/bias" for n in qkv), ((h, hd),) * 3,
              fuse_biases, split_bias),
        _Rule(f"{ours}/attn/proj/kernel", (f"{att}/out/kernel",),
              ((h, hd, d),), lambda w: w.reshape(d, d),
              lambda w: (w.reshape(h, hd, d),)),
        _same(f"{ours}/attn/proj/bias", f"{att}/out/bias", (d,)),
    ]
    rules += norm(f"{ours}/norm2", f"{theirs}/LayerNorm_2")
    rules += dense(f"{ours}/mlp/fc1", f"{theirs}/MlpBlock_3/Dense_0", d, m)
    rules += dense(f"{ours}/mlp/fc2", f"{theirs}/MlpBlock_3/Dense_1", m, d)
  rules += norm("norm", f"{enc}/encoder_norm")
  return rules


# ----------------------------------------------------------------------------
# Tree helpers.


def _flatten(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in leaves}


def _unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for name, leaf in flat.items():
    *parents, last = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def _describe(cfg: vit_lib.ViTConfig) -> str:
  return (f"ViT(image={cfg.image_size}, patch={cfg.patch_size}, "
          f"width={cfg.width}, depth={cfg.depth}, heads={cfg.num_heads}, "
          f"mlp={cfg.mlp_dim})")


def _raise_mismatch(source: str, cfg: vit_lib.ViTConfig,
                    problems: list[str]) -> None:
  # One line (entry points print it as `error: ...`): the first problems,
  # each naming the key and both shapes, then the fix.
  shown = problems[:_MAX_REPORTED]
  more = len(problems) - len(shown)
  text = "; ".join(shown + ([f"... and {more} more"] if more else []))
  raise CheckpointMismatchError(
      f"{source} does not match {_describe(cfg)} ({len(problems)} "
      f"problem(s)): {text}; use weights made for this architecture, or set "
      "the model config (name, patch_size, width, depth, num_heads, mlp_dim) "
      "to the checkpoint's")


def _check_params(params: Any, cfg: vit_lib.ViTConfig, source: str) -> None:
  """Raises CheckpointMismatchError unless ``params`` has the config's tree."""
  got = {k: tuple(v.shape) for k, v in _flatten(params).items()}
  want = {k: tuple(v.shape)
          for k, v in _flatten(vit_lib.abstract_params(cfg)).items()}
  problems = [f"{k}: missing (model expects shape {want[k]})"
              for k in sorted(want.keys() - got.keys())]
  problems += [f"{k}: unexpected parameter (shape {got[k]})"
               for k in sorted(got.keys() - want.keys())]
  problems += [f"{k}: parameters have shape {got[k]}, model expects {want[k]}"
               for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
  if problems:
    _raise_mismatch(source, cfg, problems)


# ----------------------------------------------------------------------------
# Fused <-> split attention layouts.


def to_split_qkv(params: Any, num_heads: int) -> dict:
  """Rewrites fused ``attn/{qkv,proj}`` into ``attn/{query,key,value,out}``.

  Args:
    params: a ``qkv='fused'`` parameter tree.
    num_heads: attention heads.

  Returns:
    The ``qkv='split'`` tree (host numpy arrays) computing the same function.
  """
  tree = _unflatten(_flatten(jax.tree.map(np.asarray, params)))
  for name, block in tree.items():
    if not name.startswith("blocks_"):
      continue
    attn = block["attn"]
    if set(attn) != {"qkv", "proj"}:
      raise ValueError(f"{name}/attn is not fused (has {sorted(attn)})")
    w, b = attn["qkv"]["kernel"], attn["qkv"]["bias"]
    d = w.shape[0]
    if w.shape != (d, 3 * d) or d % num_heads:
      raise ValueError(f"{name}/attn/qkv/kernel has shape {w.shape}, which "
                       f"does not split into 3 x {num_heads} heads")
    hd = d // num_heads
    w = w.reshape(d, 3, num_heads, hd)
    b = b.reshape(3, num_heads, hd)
    new = {n: {"kernel": w[:, j], "bias": b[j]}
           for j, n in enumerate(("query", "key", "value"))}
    new["out"] = {"kernel": attn["proj"]["kernel"].reshape(num_heads, hd, d),
                  "bias": attn["proj"]["bias"]}
    block["attn"] = new
  return tree


def to_fused_qkv(params: Any) -> dict:
  """Inverse of `to_split_qkv`: DenseGeneral q/k/v/out back into timm's layout.

  Args:
    params: a ``qkv='split'`` parameter tree.

  Returns:
    The ``qkv='fused'`` tree (host numpy arrays) computing the same function.
  """
  tree = _unflatten(_flatten(jax.tree.map(np.asarray, params)))
  for name, block in tree.items():
    if not name.startswith("blocks_"):
      continue
    attn = block["attn"]
    if set(attn) != {"query", "key", "value", "out"}:
      raise ValueError(f"{name}/attn is not split (has {sorted(attn)})")
    parts = [attn[n] for n in ("query", "key", "value")]
    d = parts[0]["kernel"].shape[0]
    block["attn"] = {
        "qkv": {"kernel": np.concatenate(
                    [p["kernel"].reshape(d, -1) for p in parts], axis=1),
                "bias": np.concatenate([p["bias"].reshape(-1) for p in parts])},
        "proj": {"kernel": attn["out"]["kernel"].reshape(-1, d),
                 "bias": attn["out"]["bias"]},
    }
  return tree


# ----------------------------------------------------------------------------
# Generic strict conversion.


def _pos_embed_resizable(found: tuple[int, ...], want: tuple[int, ...]) -> bool:
  if len(found) != 3 or found[0] != 1 or found[2] != want[2]:
    return False
  n = found[1] - 1
  return n > 0 and math.isqrt(n) ** 2 == n


def _resize_pos_embed(pos: np.ndarray, want: tuple[int, ...],
                      key: str) -> np.ndarray:
  d = want[2]
  old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(want[1] - 1)
  log.warning("%s: resizing the position embedding from a %dx%d to a %dx%d "
              "patch grid (bilinear; class token kept)", key, old, old, new,
              new)
  grid = np.asarray(pos[0, 1:], np.float32).reshape(old, old, d)
  grid = np.asarray(jax.image.resize(grid, (new, new, d), method="bilinear"))
  return np.concatenate([np.asarray(pos[:, :1], np.float32),
                         grid.reshape(1, new * new, d)], axis=1)


def _from_checkpoint(flat: dict[str, np.ndarray], rules: list[_Rule],
                     cfg: vit_lib.ViTConfig, source: str,
                     ignored: tuple[str, ...]) -> dict:
  problems, arrays = [], {}
  for rule in rules:
    for key, want in zip(rule.src, rule.src_shapes):
      if key not in flat:
        problems.append(f"{key}: missing from checkpoint "
                        f"(model expects shape {want})")
        continue
      a = flat[key]
      if (rule.is_pos_embed and a.shape != want
          and _pos_embed_resizable(a.shape, want)):
        a = _resize_pos_embed(a, want, key)
      if a.shape != want:
        problems.append(
            f"{key}: checkpoint has shape {a.shape}, model expects {want}")
      arrays[key] = a
  consumed = {k for rule in rules for k in rule.src}
  skipped = []
  for key in sorted(flat.keys() - consumed):
    if key.startswith(ignored):
      skipped.append(key)
    else:
      problems.append(f"{key}: unexpected key in checkpoint (shape "
                      f"{flat[key].shape}); the model has no such parameter")
  if problems:
    _raise_mismatch(source, cfg, problems)
  if skipped:
    log.info("%s: ignoring classifier keys %s", source, skipped)
  # np.array copies, detaching the result from memory-mapped file buffers.
  fused = {r.dst: np.array(r.load(*(arrays[k] for k in r.src)), np.float32)
           for r in rules}
  tree = _unflatten(fused)
  if cfg.qkv == "split":
    tree = to_split_qkv(tree, cfg.num_heads)
  _check_params(tree, cfg, f"converted {source}")
  return tree


def _to_checkpoint(params: Any, cfg: vit_lib.ViTConfig,
                   rules: list[_Rule]) -> dict[str, np.ndarray]:
  _check_params(params, cfg, "parameters to save")
  tree = jax.tree.map(np.asarray, jax.device_get(params))
  if cfg.qkv == "split":
    tree = to_fused_qkv(tree)
  flat = _flatten(tree)
  out = {}
  for rule in rules:
    arrays = rule.save(flat[rule.dst])
    for key, want, a in zip(rule.src, rule.src_shapes, arrays):
      if a.shape != want:  # A bug in a rule, never a user error.
        raise AssertionError(f"{key}: produced {a.shape}, expected {want}")
      out[key] = np.ascontiguousarray(a, dtype=np.float32)
  return out


def _file(path: PathLike):
  """pathlib for a local file; etils.epath (Orbax's path type) for gs:// etc."""
  if "://" in os.fspath(path):
    from etils import epath  # pylint: disable=import-outside-toplevel
    return epath.Path(os.fspath(path))
  return pathlib.Path(path)


def _existing_file(path: PathLike):
  path = _file(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  return path


# ----------------------------------------------------------------------------
# Public loaders and savers.


def load_timm_safetensors(path: PathLike, config: vit_lib.ViTConfig) -> dict:
  """Loads a timm ViT ``model.safetensors`` into the `vit` parameter tree.

  ``head.*`` is ignored; a real ``fc_norm`` (average-pool models) is rejected.

  Args:
    path: the ``.safetensors`` file.
    config: the target model; ``config.qkv`` picks the attention layout.

  Returns:
    The parameter tree as float32 host numpy arrays.

  Raises:
    FileNotFoundError: no file at ``path``.
    CheckpointMismatchError: missing, unexpected or wrongly shaped keys.
  """
  path = _existing_file(path)
  try:
    flat = (safetensors.numpy.load_file(path) if isinstance(path, pathlib.Path)
            else safetensors.numpy.load(path.read_bytes()))
  except safetensors.SafetensorError as e:
    raise _unreadable(path, ".safetensors", e) from e
  return _from_timm(flat, path, config)


def from_timm_state_dict(flat: dict[str, np.ndarray], config: vit_lib.ViTConfig,
                         source: str = "state_dict") -> dict:
  """Converts a timm ViT ``state_dict`` (names -> numpy arrays) strictly.

  For weights read by other means, e.g. the runner's ``pytorch_model.bin``
  reader (torch); ``source`` names them in errors.

  Raises:
    CheckpointMismatchError: missing, unexpected or wrongly shaped keys.
  """
  return _from_timm(flat, source, config)


def _from_timm(flat: dict[str, np.ndarray], path, config) -> dict:
  norms = sorted(k for k in flat if k.startswith("fc_norm."))
  if norms:
    raise CheckpointMismatchError(
        f"{path}: {norms[0]}: the checkpoint has a pooled-feature norm "
        f"(fc_norm, keys {norms}); only class-token models whose fc_norm is "
        "Identity are supported")
  return _from_checkpoint(flat, _timm_rules(config), config, str(path),
                          _TIMM_IGNORED)


def to_timm_arrays(params: Any, config: vit_lib.ViTConfig) -> dict:
  """``params`` as timm's state dict of float32 numpy arrays (no head)."""
  return _to_checkpoint(params, config, _timm_rules(config))


def save_timm_safetensors(params: Any, path: PathLike,
                          config: vit_lib.ViTConfig) -> None:
  """Writes ``params`` as a timm ``model.safetensors`` (without a head).

  Args:
    params: a parameter tree for ``config`` (fused or split as it says).
    path: the output file.
    config: the model configuration.

  Raises:
    CheckpointMismatchError: ``params`` does not fit ``config``.
  """
  flat = to_timm_arrays(params, config)
  # 'format: pt' is what timm/transformers expect of torch-origin files.
  _file(path).write_bytes(safetensors.numpy.save(flat,
                                                 metadata={"format": "pt"}))


def load_big_vision_npz(path: PathLike, config: vit_lib.ViTConfig) -> dict:
  """Loads an AugReg / vision_transformer ViT ``.npz`` into the `vit` tree.

  ``head/*`` and ``pre_logits/*`` are ignored.

  Args:
    path: the ``.npz`` file (``/``-joined Flax parameter names as keys).
    config: the target model; ``config.qkv`` picks the attention layout.

  Returns:
    The parameter tree as float32 host numpy arrays.

  Raises:
    FileNotFoundError: no file at ``path``.
    CheckpointMismatchError: missing, unexpected or wrongly shaped keys.
  """
  path = _existing_file(path)
  data = io.BytesIO(path.read_bytes())
  if data.getvalue()[:4] != b"PK\x03\x04":
    # np.load would take it for a pickle and suggest allow_pickle: never.
    raise _unreadable(path, ".npz", "no zip header: not an .npz archive")
  try:
    with np.load(data, allow_pickle=False) as npz:
      flat = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise _unreadable(path, ".npz", f"{type(e).__name__}: {e}") from e
  return _from_checkpoint(flat, _big_vision_rules(config), config, str(path),
                          _BIG_VISION_IGNORED)


def save_big_vision_npz(params: Any, path: PathLike,
                        config: vit_lib.ViTConfig) -> None:
  """Writes ``params`` in the AugReg ``.npz`` layout (without a head).

  Args:
    params: a parameter tree for ``config``.
    path: the output file, written as given (no ``.npz`` is appended).
    config: the model configuration.

  Raises:
    CheckpointMismatchError: ``params`` does not fit ``config``.
  """
  flat = _to_checkpoint(params, config, _big_vision_rules(config))
  # Through a file object so numpy does not append '.npz' to the name.
  with _file(path).open("wb") as f:
    np.savez(f, **flat)


def load_pretrained(path: PathLike, config: vit_lib.ViTConfig) -> dict:
  """Loads ``.safetensors`` (timm) or ``.npz`` (AugReg) weights by file suffix.

  Args:
    path: the checkpoint file.
    config: the target model.

  Returns:
    The parameter tree as float32 host numpy arrays.

  Raises:
    UnreadableCheckpointError: an unknown suffix, or a file that cannot be read.
    FileNotFoundError: no file at ``path``.
    CheckpointMismatchError: the checkpoint does not fit ``config``.
  """
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == ".safetensors":
    return load_timm_safetensors(path, config)
  if suffix == ".npz":
    return load_big_vision_npz(path, config)
  if suffix == ".bin":
    # A pickle: this torch-free module reads none.
    raise UnreadableCheckpointError(
        f"{path}: a PyTorch .bin pickle; slora_jax.models reads no pickles: "
        "use the weights' model.safetensors, or the runner, which reads .bin "
        "files with torch's weights-only unpickler")
  raise UnreadableCheckpointError(
      f"{path}: unknown checkpoint format {suffix!r}; expected '.safetensors' "
      "(timm) or '.npz' (AugReg ViT)")
