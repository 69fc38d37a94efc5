"""Saving an adapter state alone: small (no backbone) and readable anywhere.

A saved state is a directory with two files, readable without JAX or Orbax:

* ``adapters.safetensors``: the adapter arrays (and any ``extra`` arrays, e.g.
  a head), keyed by their path in the state, e.g.
  ``frozen/previous/<target>/A`` (C, R, d_in), ``trainable/magnitudes/
  previous`` (C,), ``frozen/num_stored``, ``extra/head/kernel``;
* ``adapters.json``: what rebuilds the state without the model that made it:
  the targets (names, kernel paths and shapes, column slices), capacity, ranks,
  the `Policy`, the number of stored directions (tasks), the shapes of
  ``extra`` and free-form ``metadata``. It is written last, so its presence
  marks a complete save.

``load_adapters(path)`` needs neither the runner nor the model's parameters;
it also reads the earlier format (``arrays/``, an Orbax checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from slora_jax import adapters as adapters_lib
from slora_jax import policy as policy_lib
from slora_jax import targets as targets_lib

__all__ = ["FORMAT", "SavedAdapters", "save_adapters", "load_adapters",
           "read_adapters"]

FORMAT = "slora_jax.adapters/2"
_ORBAX_FORMAT = "slora_jax.adapters/1"   # arrays/ by Orbax (still read)
_ARRAYS = "arrays"
_TENSORS = "adapters.safetensors"
_SPEC = "adapters.json"


class SavedAdapters(NamedTuple):
  """What `read_adapters` returns."""
  adapters: adapters_lib.AdapterState
  extra: Any           # the ``extra`` tree given to `save_adapters`, or None
  metadata: dict


def _path(path):
  from etils import epath  # Orbax's own path type: local or gs:// alike.
  return epath.Path(path).absolute() if "://" not in str(path) else epath.Path(path)


def _shapes(tree) -> Any:
  return jax.tree.map(lambda x: {"shape": list(x.shape),
                                 "dtype": jnp.dtype(x.dtype).name}, tree)


def _is_leaf_spec(x) -> bool:
  return isinstance(x, dict) and set(x) == {"shape", "dtype"}


def _abstract(shapes) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s["shape"]),
                                                     jnp.dtype(s["dtype"])),
                      shapes, is_leaf=_is_leaf_spec)


def _spec_dict(adapters: adapters_lib.AdapterState) -> dict:
  spec = adapters.spec
  return {"targets": [dataclasses.asdict(t) for t in spec.targets],
          "capacity": spec.capacity, "max_rank": spec.max_rank,
          # The current pair's width (max_rank; older saves: the task's rank).
          "rank": adapters.trainable["current"][
              spec.targets[0].name]["A"].shape[0],
          "policy": dataclasses.asdict(spec.policy)}


def _template(d: dict) -> adapters_lib.AdapterState:
  targets = tuple(targets_lib.Target(
      name=t["name"], path=t["path"], kernel_shape=tuple(t["kernel_shape"]),
      in_dims=t["in_dims"], cols=tuple(t["cols"]) if t["cols"] else None,
      layout=t.get("layout", "in_out"))
      for t in d["targets"])
  state = adapters_lib.init_adapters(
      None, targets, capacity=d["capacity"], max_rank=d["max_rank"],
      policy=policy_lib.Policy(**d["policy"]))
  # Saves from before the pair was max_rank wide hold it at the task's rank.
  return state.replace(trainable={
      **state.trainable, "current": adapters_lib.zero_current(targets,
                                                              d["rank"])})


def _flat(tree, prefix: str = "") -> dict:
  """``{"a/b/c": leaf}`` of a nested dict (target names may hold "/")."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _host(x) -> np.ndarray:
  # A replicated array of several processes: every copy is the whole array.
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x, order="C")   # (ascontiguousarray makes 0-d 1-d)


def _filled(template, flat: dict, prefix: str = ""):
  """``template`` (nested dict) with its leaves taken from ``flat``."""
  return {k: (_filled(v, flat, f"{prefix}{k}/") if isinstance(v, dict)
              else jnp.asarray(flat[f"{prefix}{k}"]))
          for k, v in template.items()}


def save_adapters(path, adapters: adapters_lib.AdapterState, *,
                  extra: Any = None, metadata: dict | None = None,
                  overwrite: bool = False) -> str:
  """Writes ``adapters`` (and ``extra`` arrays) to the directory ``path``.

  Args:
    path: a directory (local or any scheme `etils.epath` knows, e.g. gs://).
    adapters: the state to save.
    extra: an optional nested dict of arrays saved beside it (e.g. the head).
    metadata: JSON-able provenance stored in ``adapters.json``.
    overwrite: replace a state already saved there (else FileExistsError).

  Returns:
    The directory, as a string.
  """
  out = _path(path)
  if any((out / f).exists() for f in (_SPEC, _TENSORS, _ARRAYS)):
    if not overwrite:
      raise FileExistsError(f"{out} already holds saved adapters; pass "
                            "overwrite=True or another path")
    (out / _SPEC).unlink(missing_ok=True)
    if (out / _ARRAYS).exists():
      (out / _ARRAYS).rmtree()
  out.mkdir(parents=True, exist_ok=True)
  tree = {"trainable": adapters.trainable, "frozen": adapters.frozen,
          "extra": extra if extra is not None else {}}
  flat = {k: _host(v) for k, v in _flat(tree).items()}
  (out / _TENSORS).write_bytes(safetensors.numpy.save(flat))
  doc = {"format": FORMAT, **_spec_dict(adapters),
         "num_stored": int(flat["frozen/num_stored"]),
         "extra": _shapes(extra) if extra is not None else None,
         "metadata": metadata or {}}
  (out / _SPEC).write_text(json.dumps(doc, indent=1, sort_keys=True))
  return str(out)


def read_adapters(path) -> SavedAdapters:
  """Restores what `save_adapters` wrote: (adapters, extra, metadata).

  Raises:
    FileNotFoundError: ``path`` holds no complete save.
    ValueError: ``adapters.json`` is not of this format.
  """
  src = _path(path)
  try:
    doc = json.loads((src / _SPEC).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{src} holds no saved adapters ({_SPEC} is "
                            "missing)") from None
  if doc.get("format") not in (FORMAT, _ORBAX_FORMAT):
    raise ValueError(f"{src / _SPEC} is not a {FORMAT} file "
                     f"(format {doc.get('format')!r})")
  template = _template(doc)
  extra = _abstract(doc["extra"]) if doc["extra"] is not None else {}
  shaped = {"trainable": template.trainable, "frozen": template.frozen,
            "extra": extra}
  if doc["format"] == FORMAT:
    tree = _filled(shaped, safetensors.numpy.load((src / _TENSORS).read_bytes()))
  else:
    tree = _orbax_restore(src / _ARRAYS, shaped)
  adapters = adapters_lib.pad_current(
      template.replace(trainable=tree["trainable"], frozen=tree["frozen"]))
  return SavedAdapters(adapters, tree["extra"] if doc["extra"] is not None
                       else None, doc["metadata"])


def _orbax_restore(directory, shaped):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, shaped)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(directory, abstract)


def load_adapters(path) -> adapters_lib.AdapterState:
  """The adapter state saved at ``path`` by `save_adapters`."""
  return read_adapters(path).adapters
