"""Metric writers chosen by ``config.log``: TensorBoard, Weights & Biases, both.

The interface is ``clu.metric_writers.MetricWriter``'s (``write_scalars(step,
scalars)``, ``write_hparams``, ``flush``, ``close``), without depending on
clu: its TensorBoard writer goes through TensorFlow's ``tf.summary`` and the
``tensorboard`` package (``from clu import metric_writers`` fails without
it, and clu 0.0.12 does not declare it), where ours is tensorboardX, which
`paths` teaches object stores; and clu has no W&B writer.

One global step counts every training step of the run (all tasks); the task
loop (`slora_jax.runner.train`) writes ``train/{loss,accuracy,lr}``,
``alpha/task<i>`` and ``eval/*`` at it. The config is written as
hyper-parameters (dotted keys). Writers open at the first scalar, so a run
refused before it trains writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

from slora_jax.runner import paths

__all__ = ["MetricWriter", "TensorBoardWriter", "WandbWriter", "MultiWriter",
           "flat_hparams", "create"]


class MetricWriter:
  """What the task loop writes to (clu.metric_writers' interface)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    raise NotImplementedError

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    raise NotImplementedError

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict:
  """``{"train.lr": 0.01, ...}``: scalars kept, tuples and None as text."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flat_hparams(v, f"{prefix}{k}."))
    elif isinstance(v, (bool, int, float, str)):
      out[f"{prefix}{k}"] = v
    else:
      out[f"{prefix}{k}"] = json.dumps(v)
  return out


class _QuietRecords:
  """tensorboardX's event file, which stops at its first OSError (a full
  disk, a lost mount): the run reports such an error itself, in one line,
  and TensorBoard events are not worth a traceback from tensorboardX's
  writer thread (which would then die and block the queue) or at exit."""

  def __init__(self, records):
    self._records, self.failed = records, False

  def _call(self, name: str, *args):
    if self.failed:
      return None
    try:
      return getattr(self._records, name)(*args)
    except OSError:
      self.failed = True
      return None

  def write_event(self, event):
    return self._call("write_event", event)

  def flush(self):
    return self._call("flush")

  def close(self):
    return self._call("close")


class TensorBoardWriter(MetricWriter):
  """tensorboardX events in ``directory``; hyper-parameters as the HParams
  plugin reads them (in the same run) and as a ``config`` text. Events are
  best effort: a write that fails ends them, quietly."""

  def __init__(self, directory: str):
    self._directory, self._writer, self._hparams = directory, None, None
    self._failed = False

  def _open(self):
    if self._writer is None and not self._failed:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      try:
        self._writer = SummaryWriter(paths.tensorboard_dir(self._directory))
      except OSError:
        self._failed = True
        return None
      # The event file's writer, shared by the flushes and the writer thread
      # (tensorboardX 2.6 internals; without them, its own behaviour).
      # pylint: disable=protected-access
      events = getattr(self._writer._get_file_writer(), "event_writer", None)
      worker = getattr(events, "_worker", None)
      if hasattr(events, "_ev_writer") and hasattr(worker, "_record_writer"):
        events._ev_writer = worker._record_writer = _QuietRecords(
            events._ev_writer)
      if self._hparams is not None:
        self._write_hparams(self._hparams)
    return self._writer

  def _write_hparams(self, hparams) -> None:
    from tensorboardX.summary import hparams as hp  # pylint: disable=import-outside-toplevel
    # Metric names let the HParams dashboard show them beside the settings.
    for summary in hp(dict(hparams), {"eval/top1": 0.0}):
      self._writer.file_writer.add_summary(summary)
    self._writer.add_text("config", "```\n" + json.dumps(
        dict(hparams), indent=1) + "\n```", 0)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    writer = self._open()
    if writer is None:
      return
    for k, v in scalars.items():
      writer.add_scalar(k, float(v), int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._hparams = dict(hparams)
    if self._writer is not None:
      self._write_hparams(self._hparams)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class WandbWriter(MetricWriter):
  """A W&B run; its id comes from the workdir and seed, so a resumed run
  continues the same W&B run. ``mode``: '' (W&B's default or WANDB_MODE),
  'online', 'offline'; W&B's own files go under WANDB_DIR (default: the
  workdir when local)."""

  def __init__(self, project: str, entity: str, mode: str, workdir: str,
               seed: int):
    run = _last_part(paths.dirname(workdir))   # workdir: RUN/seed_<seed>
    self._args = dict(project=project, entity=entity or None,
                      mode=mode or None, name=f"{run}-seed{seed}", group=run,
                      id=_run_id(workdir, seed), resume="allow")
    self._local = workdir if paths.is_local(workdir) else None
    self._run, self._hparams = None, {}

  def _open(self):
    if self._run is None:
      import wandb  # pylint: disable=import-outside-toplevel
      where = os.environ.get("WANDB_DIR") or self._local
      self._run = wandb.init(dir=where, config=self._hparams, **self._args)
    return self._run

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._open().log({k: float(v) for k, v in scalars.items()}, step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._hparams = dict(hparams)
    if self._run is not None:
      self._run.config.update(self._hparams, allow_val_change=True)

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()


def _last_part(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]


def _run_id(workdir: str, seed: int) -> str:
  where = workdir if not paths.is_local(workdir) else paths.absolute(workdir)
  return hashlib.sha1(f"{where}|{seed}".encode()).hexdigest()[:16]


class MultiWriter(MetricWriter):
  """Every call to each of ``writers``."""

  def __init__(self, writers):
    self._writers = tuple(writers)

  def write_scalars(self, step, scalars) -> None:
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams) -> None:
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


def create(log, workdir: str, seed: int) -> MetricWriter | None:
  """The writers ``log`` (`config.LogSettings`) asks for, or None."""
  writers = []
  if log.tensorboard:
    writers.append(TensorBoardWriter(paths.join(workdir, "tensorboard")))
  if log.wandb_project:
    writers.append(WandbWriter(log.wandb_project, log.wandb_entity,
                               log.wandb_mode, workdir, seed))
  if not writers:
    return None
  return writers[0] if len(writers) == 1 else MultiWriter(writers)
