"""Imports a run of the official PyTorch SD-LoRA code as an `AdapterState`.

After task t the reference writes, under its ``filepath`` (docs/semantics.md §4):

* ``lora_w_a_{t}.pt`` / ``lora_w_b_{t}.pt``: pickled Python lists of
  ``2·depth`` bias-free ``torch.nn.Linear`` modules, q then v per block (entry
  2ℓ is q of block ℓ, 2ℓ+1 is v); A weights are ``(r, d)``, B weights ``(d, r)``
  and the update of a projection is ``x @ A_wᵀ @ B_wᵀ``;
* ``CLs_weight{t}.pt`` / ``CLs_bias{t}.pt``: the head over every class seen so
  far, ``(classes, d)`` and ``(classes,)``.

The function evaluated after task T-1 (docs/semantics.md §3.8) has directions
0..T-2 as *previous* ones, each divided by ‖B‖_F·‖A‖_F per projection, and task
T-1 as the raw *current* direction scaled by α_cur. Our state holds exactly
that: T-1 stored slots plus the current pair, so `slora_jax.merge` and the
eval step compute the reference's function. Our (A, B) arrays use torch's
weight layouts, so ``ΔW = Aᵀ·Bᵀ`` in our input-major kernels needs no
transpose of the factors; only the head's weight is transposed.

The reference never saves its magnitudes (docs/semantics.md §3.3): they must be
given (e.g. the values its log printed) or default to its initial value 0.8.

Reading the ``.pt`` files needs PyTorch, imported lazily: nothing else in
slora_jax depends on it. Pickles can run arbitrary code, so the files are read
with torch's weights-only unpickler, allowing ``torch.nn.Linear`` and the
tensor globals torch allows by default, and nothing else.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import pathlib
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from slora_jax import adapters as adapters_lib
from slora_jax import policy as policy_lib
from slora_jax import serialization
from slora_jax import targets as targets_lib
from slora_jax.models import convert
from slora_jax.models import vit as vit_lib

__all__ = [
    "ReferenceImportError", "ReferenceRun", "find_tasks", "read_reference_run",
    "build_state", "save_imported", "load_imported", "target_names",
    "magnitudes_from_string", "check_out_dir", "read_state_dict", "FORMAT",
]

FORMAT = "slora_jax.reference_import/1"
# What a complete or partial import leaves in its directory.
_SAVED = ("adapters.json", "arrays")
_A = re.compile(r"lora_w_a_(\d+)\.pt")


class ReferenceImportError(ValueError):
  """The reference run cannot be imported; the message is one line."""


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
  """The arrays of a reference run up to one task, in torch layouts.

  Attributes:
    a: per task, the A weights of its entries, each ``(r, d_in)``.
    b: per task, the B weights of its entries, each ``(d_out, r)``.
    head_weight: ``(classes, d)`` head weight after the last task.
    head_bias: ``(classes,)`` head bias.
    a_files, b_files: file names of ``a`` and ``b`` (for error messages).
    head_files: names of the head weight and bias files.
  """
  a: tuple[tuple[np.ndarray, ...], ...]
  b: tuple[tuple[np.ndarray, ...], ...]
  head_weight: np.ndarray
  head_bias: np.ndarray
  a_files: tuple[str, ...] = ()
  b_files: tuple[str, ...] = ()
  head_files: tuple[str, str] = ("CLs_weight", "CLs_bias")

  @property
  def num_tasks(self) -> int:
    return len(self.a)


# --- reading the .pt files ----------------------------------------------------

def find_tasks(run_dir) -> int:
  """Number of tasks T whose ``lora_w_a_{t}.pt`` files are present (0..T-1).

  Raises:
    ReferenceImportError: if ``run_dir`` is missing, has no such file, or the
      task indices have a gap.
  """
  run_dir = pathlib.Path(run_dir)
  if not run_dir.is_dir():
    raise ReferenceImportError(f"run directory {run_dir} does not exist")
  found = sorted(int(m.group(1)) for m in
                 (_A.fullmatch(p.name) for p in run_dir.iterdir()) if m)
  if not found:
    raise ReferenceImportError(
        f"no lora_w_a_<task>.pt file in {run_dir}: not a reference run "
        f"directory (its 'filepath')")
  missing = sorted(set(range(found[-1] + 1)) - set(found))
  if missing:
    raise ReferenceImportError(
        f"{run_dir}: lora_w_a_{missing[0]}.pt is missing but lora_w_a_"
        f"{found[-1]}.pt is present; tasks must be 0..T-1 without gaps")
  return len(found)


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ReferenceImportError(
        "reading the reference's .pt files needs PyTorch, which is not "
        "installed: pip install torch (a CPU build is enough)") from e
  if not hasattr(torch.serialization, "safe_globals"):
    # The allow-list below needs torch ≥ 2.5; older loaders would have to be
    # told to trust the whole pickle, which this tool never does.
    raise ReferenceImportError(
        f"torch {torch.__version__} is too old to read the reference's files "
        f"safely: pip install 'torch>=2.5'")
  return torch


def _pickle_globals(path: pathlib.Path) -> set[str]:
  """``module.name`` of every global a plain pickle names, found statically.

  pickletools only parses opcodes, it never imports or calls anything. Used
  to name the offending global of a file that is not a torch archive.
  """
  names, strings = set(), []
  try:
    with open(path, "rb") as f:
      for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL":
          names.add(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
          names.add(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
          strings.append(arg)
  except Exception:  # pylint: disable=broad-except
    pass  # not (only) a pickle: whatever was found so far is reported
  return names


def _refuse(path, names) -> ReferenceImportError:
  return ReferenceImportError(
      f"refusing to load {path}: it references {', '.join(sorted(names))}, "
      f"which is not among what the reference saves (torch.nn.Linear modules "
      f"and tensors); the file may run code when unpickled")


def _safe_load(path: pathlib.Path):
  """``torch.load`` that unpickles only tensors and ``torch.nn.Linear``."""
  torch = _torch()
  linear = torch.nn.Linear
  allowed = {f"{linear.__module__}.{linear.__qualname__}"}
  if not zipfile.is_zipfile(path):
    # torch.save has written zip archives since 1.6 (the reference uses 2.4):
    # anything else is not its output, so it is never unpickled.
    names = _pickle_globals(path) - allowed
    if names:
      raise _refuse(path, names)
    raise ReferenceImportError(f"{path} is not a torch.save archive")
  try:
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(
        str(path))) - allowed
  except Exception as e:  # pylint: disable=broad-except
    raise ReferenceImportError(
        f"{path} is not a readable torch.save archive ({_first_line(e)})") from e
  if unsafe:
    raise _refuse(path, unsafe)
  # The static scan misses globals built on the stack; the weights-only
  # unpickler below is what enforces the allow-list.
  try:
    with torch.serialization.safe_globals([linear]), warnings.catch_warnings():
      warnings.simplefilter("ignore")  # protocol notes; failures raise anyway
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    if m:
      raise _refuse(path, [m.group(1)]) from e
    raise ReferenceImportError(
        f"refusing to load {path}: torch's weights-only unpickler rejected it "
        f"({_weights_only_reason(e)})") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ReferenceImportError(
        f"cannot read {path}: {type(e).__name__}: {_first_line(e)}") from e


def read_state_dict(data: bytes, name: str) -> dict[str, np.ndarray]:
  """A ``torch.save``'d ``state_dict`` (timm's ``pytorch_model.bin``) as arrays.

  Unpickled like the reference's files, by torch's weights-only unpickler,
  here with nothing beyond its default allow-list (tensors and plain
  containers). ``name`` (the file) is for the one-line messages.

  Raises:
    convert.UnreadableCheckpointError: torch is missing, the data is not a
      ``torch.save`` archive of tensors, or it names a global off the list.
  """
  unreadable = convert.UnreadableCheckpointError
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise unreadable(
        f"{name}: reading a PyTorch .bin file needs torch, which is not "
        "installed: pip install torch (a CPU build is enough), or use the "
        "weights' model.safetensors") from e
  buf = io.BytesIO(data)
  # torch.save has written zip archives since torch 1.6.
  why = None if zipfile.is_zipfile(buf) else "not a zip archive"
  if why is None:
    buf.seek(0)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      lines = [l.strip() for l in str(e).splitlines() if "GLOBAL" in l]
      raise unreadable(
          f"refusing to load {name}: torch's weights-only unpickler rejected "
          f"it ({lines[0] if lines else _weights_only_reason(e)}); a weights "
          "file holds only tensors, and this one may run code when "
          "unpickled") from e
    except Exception as e:  # pylint: disable=broad-except
      why = f"{type(e).__name__}: {_first_line(e)}"
  if why:
    raise unreadable(f"{name}: not a readable torch.save archive ({why}); it "
                     "may be truncated or corrupt: download it again")
  if not (isinstance(state, dict)
          and all(isinstance(v, torch.Tensor) for v in state.values())):
    raise unreadable(f"{name} holds a {type(state).__name__}, not a "
                     "state_dict (names -> tensors) as timm's "
                     "pytorch_model.bin does")
  return {k: _numpy(v) for k, v in state.items()}


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _weights_only_reason(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  for i, line in enumerate(lines):
    if "WeightsUnpickler error" in line:
      rest = line.split("WeightsUnpickler error:", 1)[1].strip()
      return rest or (lines[i + 1] if i + 1 < len(lines) else line)
  return lines[0] if lines else type(e).__name__


def _linear_weights(path: pathlib.Path) -> tuple[np.ndarray, ...]:
  torch = _torch()
  obj = _safe_load(path)
  if not isinstance(obj, (list, tuple)):
    raise ReferenceImportError(
        f"{path} holds a {type(obj).__name__}, expected a list of "
        f"torch.nn.Linear modules")
  out = []
  for i, m in enumerate(obj):
    if type(m) is not torch.nn.Linear:  # pylint: disable=unidiomatic-typecheck
      raise ReferenceImportError(
          f"{path} entry {i} is a {type(m).__name__}, expected torch.nn.Linear")
    if m.bias is not None:
      raise ReferenceImportError(
          f"{path} entry {i} has a bias; the reference's LoRA factors have none")
    out.append(_numpy(m.weight))
  return tuple(out)


def _numpy(t) -> np.ndarray:
  return t.detach().cpu().float().numpy().astype(np.float32, copy=True)


def _tensor(path: pathlib.Path) -> np.ndarray:
  torch = _torch()
  obj = _safe_load(path)
  if not isinstance(obj, torch.Tensor):
    raise ReferenceImportError(
        f"{path} holds a {type(obj).__name__}, expected a tensor")
  return _numpy(obj)


def read_reference_run(run_dir, task: int | None = None) -> ReferenceRun:
  """Reads the files of tasks 0..``task`` (default: the last one present).

  Only the head of ``task`` is read: it covers every class seen so far.

  Raises:
    ReferenceImportError: missing files, unreadable or unsafe pickles, or
      contents that are not what the reference writes.
  """
  run_dir = pathlib.Path(run_dir)
  num = find_tasks(run_dir)
  last = num - 1 if task is None else int(task)
  if not 0 <= last < num:
    raise ReferenceImportError(
        f"task {task} is not in {run_dir}, which has tasks 0..{num - 1}")
  needed = [f"lora_w_b_{t}.pt" for t in range(last + 1)]
  needed += [f"CLs_weight{last}.pt", f"CLs_bias{last}.pt"]
  for name in needed:
    if not (run_dir / name).is_file():
      raise ReferenceImportError(f"{run_dir / name} is missing")
  a_files = tuple(f"lora_w_a_{t}.pt" for t in range(last + 1))
  b_files = tuple(f"lora_w_b_{t}.pt" for t in range(last + 1))
  a = tuple(_linear_weights(run_dir / f) for f in a_files)
  b = tuple(_linear_weights(run_dir / f) for f in b_files)
  head_files = (f"CLs_weight{last}.pt", f"CLs_bias{last}.pt")
  weight, bias = (_tensor(run_dir / f) for f in head_files)
  return ReferenceRun(a, b, weight, bias, a_files, b_files, head_files)


# --- building our state -------------------------------------------------------

def target_names(config: vit_lib.ViTConfig) -> list[str]:
  """Our target name of each reference entry: ``[q0, v0, q1, v1, ...]``."""
  if config.qkv == "fused":
    fmt = ("blocks_{}/attn/qkv/kernel[q]", "blocks_{}/attn/qkv/kernel[v]")
  else:
    fmt = ("blocks_{}/attn/query/kernel", "blocks_{}/attn/value/kernel")
  return [f.format(l) for l in range(config.depth) for f in fmt]


def _entry(i: int) -> str:
  return f"{'qv'[i % 2]} of block {i // 2}"


def _check_shapes(run: ReferenceRun, config: vit_lib.ViTConfig) -> list[int]:
  """Validates every entry against the model; returns the rank of each task."""
  entries, d = 2 * config.depth, config.width
  a_files = run.a_files or tuple(f"A of task {t}" for t in range(run.num_tasks))
  b_files = run.b_files or tuple(f"B of task {t}" for t in range(run.num_tasks))
  if run.num_tasks < 1:
    raise ReferenceImportError("the reference run has no task")
  if len(run.b) != run.num_tasks:
    raise ReferenceImportError(
        f"{run.num_tasks} A lists but {len(run.b)} B lists")
  ranks = []
  for t in range(run.num_tasks):
    for files, lists in ((a_files, run.a), (b_files, run.b)):
      if len(lists[t]) != entries:
        raise ReferenceImportError(
            f"{files[t]} has {len(lists[t])} entries, expected {entries} "
            f"(q and v of the model's {config.depth} blocks)")
    rank = run.a[t][0].shape[0] if run.a[t][0].ndim == 2 else -1
    for i in range(entries):
      a, b = run.a[t][i], run.b[t][i]
      if a.shape != (rank, d):
        raise ReferenceImportError(
            f"{a_files[t]} entry {i} ({_entry(i)}) has shape {a.shape}, "
            f"expected {(rank, d) if rank > 0 else ('r', d)}")
      if b.shape != (d, rank):
        raise ReferenceImportError(
            f"{b_files[t]} entry {i} ({_entry(i)}) has shape {b.shape}, "
            f"expected {(d, rank)} to match {a_files[t]} entry {i} "
            f"of shape {a.shape}")
      if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ReferenceImportError(
            f"{a_files[t]} / {b_files[t]} entry {i} has non-finite values")
    ranks.append(rank)
  w, bias = run.head_weight, run.head_bias
  if w.ndim != 2 or w.shape[1] != d:
    raise ReferenceImportError(
        f"{run.head_files[0]} has shape {w.shape}, expected (classes, {d})")
  if bias.shape != (w.shape[0],):
    raise ReferenceImportError(
        f"{run.head_files[1]} has shape {bias.shape}, expected "
        f"({w.shape[0]},) to match {run.head_files[0]} of shape {w.shape}")
  return ranks


def _magnitudes(magnitudes, num_tasks: int, policy) -> np.ndarray:
  if magnitudes is None:
    logging.warning(
        "the reference does not save its learned magnitudes; using its initial "
        "value %s for all %d", policy.magnitude_init, num_tasks)
    return np.full((num_tasks,), policy.magnitude_init, np.float32)
  mags = np.asarray(list(magnitudes), np.float64)
  if mags.shape != (num_tasks,) or not np.all(np.isfinite(mags)):
    raise ReferenceImportError(
        f"expected {num_tasks} finite magnitudes (α_prev[0..{num_tasks - 2}] "
        f"then α_cur), got {list(magnitudes)}")
  return mags.astype(np.float32)


def build_state(config: vit_lib.ViTConfig, run: ReferenceRun,
                magnitudes: Sequence[float] | None = None, *,
                capacity: int | None = None,
                ) -> tuple[adapters_lib.AdapterState, dict]:
  """The reference's state after its last task, as (adapters, head).

  Directions 0..T-2 are stored through `end_task` under the ``reference``
  policy (‖B‖_F·‖A‖_F normalisation, exactly what our training stores), and
  task T-1 is the current pair.

  Args:
    config: the ViT the adapters are for (width and depth must match).
    run: the arrays (`read_reference_run`, or built by hand).
    magnitudes: T values, α_prev[0..T-2] then α_cur; None: the reference's
      initial 0.8 for all (a warning is logged: the learned values are lost).
    capacity: stored-direction slots; default T (room for the current one).

  Returns:
    ``(AdapterState, head)`` with head ``{'kernel': (d, classes),
    'bias': (classes,)}``.
  """
  ranks = _check_shapes(run, config)
  num = run.num_tasks
  policy = policy_lib.reference()
  mags = _magnitudes(magnitudes, num, policy)
  capacity = num if capacity is None else int(capacity)
  if capacity < max(num - 1, 1):
    raise ReferenceImportError(
        f"capacity {capacity} cannot hold {num - 1} stored directions")
  names = target_names(config)
  state = adapters_lib.init_adapters(
      vit_lib.abstract_params(config), targets_lib.vit_qv_rules(config.qkv), capacity=capacity,
      max_rank=max(ranks), policy=policy)
  known = {t.name for t in state.spec.targets}
  if set(names) != known:
    raise ReferenceImportError(
        f"the model's adapter targets {sorted(known)[:2]}... do not match the "
        f"reference's q/v entries {names[:2]}...")

  def with_current(st, t, alpha):
    cur = {n: {"A": jnp.asarray(run.a[t][i]), "B": jnp.asarray(run.b[t][i])}
           for i, n in enumerate(names)}
    m = dict(st.trainable["magnitudes"], current=jnp.asarray(alpha, jnp.float32))
    return st.replace(trainable={"current": cur, "magnitudes": m})

  for t in range(num - 1):
    state, _ = adapters_lib.end_task(with_current(state, t, mags[t]))
  state = with_current(state, num - 1, mags[-1])
  prev = np.full((capacity,), policy.magnitude_init, np.float32)
  prev[:num - 1] = mags[:-1]
  state = state.replace(trainable=dict(
      state.trainable, magnitudes={"current": jnp.asarray(mags[-1]),
                                   "previous": jnp.asarray(prev)}))
  head = {"kernel": jnp.asarray(run.head_weight.T),
          "bias": jnp.asarray(run.head_bias)}
  return state, head


# --- saving and restoring -----------------------------------------------------

def _config_dict(config: vit_lib.ViTConfig) -> dict:
  d = dataclasses.asdict(config)
  d["dtype"] = jnp.dtype(config.dtype).name
  return d


def check_out_dir(out_dir, overwrite: bool = False) -> pathlib.Path:
  """The absolute ``out_dir``; raises if it holds an import and not ``overwrite``."""
  out = pathlib.Path(out_dir).absolute()
  if not overwrite and any((out / n).exists() for n in _SAVED):
    raise ReferenceImportError(
        f"{out} already holds an import; pass --overwrite or another --out")
  return out


def save_imported(out_dir, adapters: adapters_lib.AdapterState, head: dict,
                  config: vit_lib.ViTConfig, info: dict | None = None,
                  overwrite: bool = False) -> str:
  """Saves the import with `slora_jax.save_adapters`, the head as its extra.

  Args:
    out_dir: output directory; must not hold a previous import unless
      ``overwrite``.
    adapters, head: from `build_state`.
    config: the ViT they are for (kept in the metadata, ``model``).
    info: extra JSON-able provenance (source directory, magnitudes, ...).
    overwrite: replace an existing import in ``out_dir``.

  Returns:
    The absolute output directory.
  """
  out = check_out_dir(out_dir, overwrite)
  meta = {"format": FORMAT, "model": _config_dict(config),
          "num_classes": int(head["bias"].shape[0]),
          "policy": dataclasses.asdict(adapters.spec.policy), **(info or {})}
  return serialization.save_adapters(out, adapters, extra={"head": head},
                                     metadata=meta, overwrite=True)


def load_imported(out_dir) -> tuple[adapters_lib.AdapterState, dict, dict]:
  """Restores (adapters, head, meta) written by `save_imported`.

  ``meta['model']`` holds the `ViTConfig` fields; ``vit_lib.ViTConfig(**...)``
  of them (without ``dtype``) rebuilds the config the adapters fit.
  """
  out = pathlib.Path(out_dir).absolute()
  try:
    saved = serialization.read_adapters(out)
  except FileNotFoundError as e:
    raise ReferenceImportError(f"{out} holds no complete import ({e})") from e
  if saved.metadata.get("format") != FORMAT:
    raise ReferenceImportError(f"{out} is not a {FORMAT} import")
  return saved.adapters, saved.extra["head"], saved.metadata


def magnitudes_from_string(text: str) -> list[float]:
  """Parses ``'1.80,1.33,1.47'``; raises ReferenceImportError on bad values."""
  try:
    vals = [float(x) for x in text.split(",") if x.strip()]
  except ValueError as e:
    raise ReferenceImportError(
        f"--magnitudes must be comma-separated numbers, got {text!r}") from e
  if not vals or not all(math.isfinite(v) for v in vals):
    raise ReferenceImportError(
        f"--magnitudes must be finite numbers, got {text!r}")
  return vals
