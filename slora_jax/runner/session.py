"""What one seed's run fixes before its first step, and what it carries.

`open_session` builds the `Session` (data, backbone, compiled steps, the
checkpointer: nothing in it changes during the run); `Progress` is the state
that does change (adapters, head, optimiser state, where the loop is, the
finished tasks' records). The task loop (`slora_jax.runner.train`) passes a
`Progress` from one named step to the next and gets a new one back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

import slora_jax as sl
from slora_jax import head as head_lib
from slora_jax.runner import backbone as backbone_lib
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import dry_run
from slora_jax.runner import evaluators
from slora_jax.runner import experiment_data
from slora_jax.runner import metrics
from slora_jax.runner import parallel
from slora_jax.runner import steps as steps_lib
from slora_jax.runner import writers as writers_lib
from slora_jax.runner.data import manifest as manifest_lib

__all__ = ["Cursor", "Session", "Progress", "open_session", "fingerprint",
           "NOT_FINGERPRINTED"]


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
  writer: writers_lib.MetricWriter | None  # process 0 only
  fingerprint: dict
  task_of_class: jax.Array
  width: int
  t_start: float

  @property
  def num_phases(self) -> int:
    """Training phases: one per task, or one for a single-phase method."""
    return len(self.data.train_tasks)


# The fields of the validated config that cannot change a number the run
# computes, so a resume may change them; every other field is in the
# fingerprint (tests/test_checkpoint.py classifies every field).
NOT_FINGERPRINTED = {
    "seeds": "each seed runs in its own seed_<seed>/ and its seed is in the "
             "fingerprint",
    "benchmark": "names the published numbers `compare` reads",
    "log_every_steps": "how often the loss is shown and logged",
    "distributed": "how processes start (README: another topology resumes "
                   "correctly)",
    "stop_after_steps": "a simulated preemption (tests)",
    "model.pretrain.cache_dir": "where the pre-trained backbone is cached; "
                                "the cache is keyed by its settings",
    "data.num_workers": "decoding threads never change a batch",
    "data.prefetch": "batches read ahead never change a batch",
    "data.worker_processes": "worker processes assemble the same batches",
    "checkpoint.keep": "how many checkpoints stay on disk",
    "checkpoint.every_steps": "where a run can resume; a resumed run reaches "
                              "the uninterrupted numbers",
    "log.tensorboard": "where metrics are written",
    "log.wandb_project": "where metrics are written",
    "log.wandb_entity": "where metrics are written",
    "log.wandb_mode": "where metrics are written",
}

# 2: every field not in NOT_FINGERPRINTED (1: a few fields of each section).
FINGERPRINT_VERSION = 2


def _drop(tree: dict, dotted: str) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    tree = tree[p]
  del tree[leaf]


def fingerprint(exp: config_lib.Experiment, seed: int, order,
                task_sizes) -> dict:
  """The settings a checkpoint must agree with to be resumed: every config
  field that can change a number, sections as sorted JSON."""
  settings = config_lib.settings_dict(exp)
  for dotted in NOT_FINGERPRINTED:
    _drop(settings, dotted)
  out = {"version": FINGERPRINT_VERSION, "seed": seed,
         "class_order": [int(c) for c in order],
         "task_sizes": [int(s) for s in task_sizes]}
  for key, value in settings.items():
    if isinstance(value, dict):
      if value:
        out[key] = json.dumps(value, sort_keys=True)
    else:
      out[key] = value
  return out


def _writer(exp: config_lib.Experiment, seed: int,
            workdir: str) -> writers_lib.MetricWriter | None:
  if jax.process_index() != 0:
    return None
  writer = writers_lib.create(exp.log, workdir, seed)
  if writer is not None:
    writer.write_hparams(writers_lib.flat_hparams(
        config_lib.settings_dict(exp) | {"seed": seed}))
  return writer


def open_session(exp: config_lib.Experiment, seed: int, workdir: str) -> Session:
  """Validates the data, builds the backbone and compiles nothing yet."""
  t_start = time.perf_counter()
  data = experiment_data.prepare(exp.data, exp.train, seed,
                                 single_phase=exp.method.single_phase)
  warning = manifest_lib.known_counts_warning(data.manifest,
                                              exp.raw.get("benchmark"))
  if warning and jax.process_index() == 0:
    logging.warning("%s", warning)
  if exp.dry_run:
    data.eval_limit = dry_run.eval_samples(exp.train)
  mesh = parallel.make_mesh()
  model_cfg, model, params, info = backbone_lib.build(exp.model, exp.data)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  phases = len(data.train_tasks)
  template = sl.init_adapters(
      params, exp.adapter.rules(model_cfg.qkv),
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
      eval_step=evaluators.make_eval_step(
          lambda a, x: head_lib.apply_head(a["head"], apply_fn(a["params"], x)),
          n_cls, data.task_sizes),
      merge=jax.jit(sl.merge),
      ckpt=ckpt_lib.Checkpointer(workdir, keep=exp.checkpoint.keep),
      writer=_writer(exp, seed, workdir),
      fingerprint=fingerprint(exp, seed, data.class_order, data.task_sizes),
      task_of_class=jnp.asarray(metrics.class_to_task(data.task_sizes)),
      width=model_cfg.width, t_start=t_start)
