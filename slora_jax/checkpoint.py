"""Orbax checkpoints of the continual-learning loop, behind two functions.

A checkpoint holds two items: ``state`` (adapter arrays, head, optimiser state,
RNG key data; never the frozen backbone) and ``meta`` (JSON: loop cursor,
results so far, the fingerprint of the config that wrote it). Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a kill in
the middle of a save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "ConfigMismatchError"]


class ConfigMismatchError(ValueError):
  """The workdir holds a checkpoint written by a different configuration."""


class Checkpointer:
  """Saves and restores (state, meta) pairs under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        # Saves are small (adapters, head) and a synchronous save makes the
        # saved cursor exactly the one the loop has reached.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def read_meta(self) -> dict | None:
    """The JSON item of the latest checkpoint, or None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    out = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return out["meta"]

  def save(self, state: Any, meta: dict) -> int:
    """Writes a new checkpoint; returns its index."""
    step = (self.latest_step() or 0) + 1
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()
    return step

  def restore(self, abstract_state: Any) -> tuple[Any, dict]:
    """Restores the latest checkpoint into the structure of ``abstract_state``."""
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return out["state"], out["meta"]

  def close(self):
    self._manager.close()


def check_fingerprint(saved: dict, current: dict) -> None:
  """Raises ConfigMismatchError naming the first field that differs."""
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      raise ConfigMismatchError(
          f"the checkpoint in this workdir was written with {key}="
          f"{_short(saved.get(key))}, but the config says {key}="
          f"{_short(current.get(key))}; use another --workdir or the original "
          f"config")


def _short(v) -> str:
  s = repr(v)
  return s if len(s) <= 80 else s[:77] + "..."
