"""What one seed's run fixes before its first step, and what it carries.

`open_session` builds the `Session` (data, backbone, compiled steps, the
checkpointer: nothing in it changes during the run); `Progress` is the state
that does change (adapters, head, optimiser state, where the loop is, the
finished tasks' records). The task loop (`slora_jax.runner.train`) passes a
`Progress` from one named step to the next and gets a new one back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

import slora_jax as sl
from slora_jax.runner import backbone as backbone_lib
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import dry_run
from slora_jax.runner import experiment_data
from slora_jax.runner import metrics
from slora_jax.runner import parallel
from slora_jax.runner import paths
from slora_jax.runner import steps as steps_lib

__all__ = ["Cursor", "Session", "Progress", "open_session", "fingerprint"]


@dataclasses.dataclass(frozen=True)
class Cursor:
  """Where the loop is: ``begun`` is False between tasks (after end_task)."""
  task: int = 0
  step: int = 0
  begun: bool = False

  def describe(self, num_tasks: int) -> str:
    if not self.begun:
      return f"task {self.task}/{num_tasks} finished" if self.task else "start"
    return f"task {self.task + 1}/{num_tasks}, step {self.step}"


@dataclasses.dataclass(frozen=True)
class Progress:
  """The run's changing state; every loop step returns a new one."""
  adapters: sl.AdapterState
  head: dict
  opt_state: Any
  cursor: Cursor
  done: tuple[dict, ...] = ()            # one record per evaluated task
  last_saved: Cursor | None = None       # the cursor of the latest checkpoint
  steps_here: int = 0                    # steps taken by this process


@dataclasses.dataclass(frozen=True)
class Session:
  """Everything fixed for one seed's run."""
  exp: config_lib.Experiment
  seed: int
  workdir: str
  data: experiment_data.ExperimentData
  mesh: jax.sharding.Mesh
  backbone: Any                          # frozen ViT parameters, replicated
  backbone_info: dict
  template: sl.AdapterState              # the empty adapter state
  tx: Any
  train_step: Callable
  eval_step: Callable
  merge: Callable
  ckpt: ckpt_lib.Checkpointer
  writer: EventWriter | None             # process 0 only
  fingerprint: dict
  task_of_class: jax.Array
  width: int
  t_start: float

  @property
  def num_phases(self) -> int:
    """Training phases: one per task, or one for a single-phase method."""
    return len(self.data.train_tasks)


def fingerprint(exp: config_lib.Experiment, seed: int, order,
                task_sizes) -> dict:
  """The settings a checkpoint must agree with to be resumed."""
  section = config_lib.section_json
  return {"method": exp.method.name, "semantics": exp.semantics, "seed": seed,
          "class_order": [int(c) for c in order],
          "task_sizes": [int(s) for s in task_sizes],
          "model": section(exp.model),
          "data": section(exp.data, ("source", "name", "root", "image_size")),
          "adapter": section(exp.adapter),
          "train": section(exp.train,
                           ("batch_size", "epochs", "max_steps_per_task"))}


def _rules(adapter: config_lib.AdapterSettings, model_cfg):
  if adapter.targets == "qv":
    return sl.vit_qv_rules(model_cfg.qkv)
  return tuple(sl.kernel(p) for p in adapter.targets.split(","))


class EventWriter:
  """TensorBoard events of process 0, opened at the first scalar: a run
  refused before it trains (e.g. another config's checkpoint) writes none."""

  def __init__(self, directory: str):
    self._directory, self._writer = directory, None

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(self._directory)
    self._writer.add_scalar(tag, value, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _writer(workdir: str) -> EventWriter | None:
  if jax.process_index() != 0:
    return None
  return EventWriter(paths.tensorboard_dir(paths.join(workdir, "tensorboard")))


def open_session(exp: config_lib.Experiment, seed: int, workdir: str) -> Session:
  """Validates the data, builds the backbone and compiles nothing yet."""
  t_start = time.perf_counter()
  data = experiment_data.prepare(exp.data, exp.train, seed,
                                 single_phase=exp.method.single_phase)
  if exp.dry_run:
    data.eval_limit = dry_run.eval_samples(exp.train)
  mesh = parallel.make_mesh()
  model_cfg, model, params, info = backbone_lib.build(exp.model, exp.data)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  phases = len(data.train_tasks)
  template = sl.init_adapters(
      params, _rules(exp.adapter, model_cfg),
      capacity=exp.method.capacity(exp.adapter.capacity, phases),
      max_rank=max(exp.rank(t) for t in range(phases)), policy=exp.policy())
  tx = steps_lib.make_optimizer(momentum=exp.train.momentum,
                                train_magnitudes=exp.method.trains_magnitudes,
                                train_adapters=exp.method.trains_adapters)
  n_cls = data.num_classes
  return Session(
      exp=exp, seed=seed, workdir=workdir, data=data, mesh=mesh,
      backbone=parallel.replicate(params, mesh), backbone_info=info,
      template=template, tx=tx,
      train_step=steps_lib.make_train_step(apply_fn, n_cls, tx),
      eval_step=steps_lib.make_eval_step(apply_fn, n_cls, data.num_tasks),
      merge=jax.jit(sl.merge),
      ckpt=ckpt_lib.Checkpointer(workdir, keep=exp.checkpoint.keep),
      writer=_writer(workdir),
      fingerprint=fingerprint(exp, seed, data.class_order, data.task_sizes),
      task_of_class=jnp.asarray(metrics.class_to_task(data.task_sizes)),
      width=model_cfg.width, t_start=t_start)
