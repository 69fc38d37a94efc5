"""What one seed's run fixes before its first step, and what it carries.

`open_session` builds the `Session` (data, backbone, the method and what it
sees of the run, compiled steps, the checkpointer: nothing in it changes
during the run); `Progress` is the state that does change (the train state:
the method's arrays and the optimiser state; the method's host state; where
the loop is; the finished tasks' records). The task loop (`slora_jax.runner.train`) passes a
`Progress` from one named step to the next and gets a new one back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from typing import Any, Callable

import jax

from slora_jax.runner import backbone as backbone_lib
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import dry_run
from slora_jax.runner import evaluators
from slora_jax.runner import experiment_data
from slora_jax.runner import methods as methods_lib
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
  """The run's changing state; every loop step returns a new one.

  ``state``: the train-state pytree (the method's arrays and the optimiser
  state); ``host``: the method's host-side state (`methods.base.MethodState`).
  """
  state: steps_lib.TrainState
  host: dict
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
  method: methods_lib.Method
  run: methods_lib.base.Run              # what the method sees of the run
  train_step: Callable                   # (state, batch, task, backbone)
  eval_step: Callable
  eval_arrays: Callable                  # jitted method.eval_arrays
  ckpt: ckpt_lib.Checkpointer
  writer: writers_lib.MetricWriter | None  # process 0 only
  fingerprint: dict
  t_start: float

  @property
  def num_phases(self) -> int:
    """Training phases: one per task, or one for a single-phase method."""
    return len(self.data.train_tasks)

  @property
  def width(self) -> int:
    return self.run.width

  def steps(self, t: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of phase ``t`` under the method's
    epochs (0: no training), capped by ``train.max_steps_per_task``."""
    spe, total = self.data.steps(t)     # the data plan has the method's epochs
    return spe, (total if self.method.epochs(self.exp) else 0)


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

# 3: the train-state checkpoint of the method plug-ins (arrays, optimiser
# state, host state) and the running method's methods.<name> section;
# 2: every field not in NOT_FINGERPRINTED (1: a few fields of each section).
FINGERPRINT_VERSION = 3


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
  # The data plan takes the method's epochs (a method without training
  # still reads its data: one epoch's plan).
  train = dataclasses.replace(exp.train,
                              epochs=max(1, exp.method.epochs(exp)))
  data = experiment_data.prepare(exp.data, train, seed,
                                 single_phase=exp.method.single_phase)
  warning = manifest_lib.known_counts_warning(data.manifest,
                                              exp.raw.get("benchmark"))
  if warning and jax.process_index() == 0:
    logging.warning("%s", warning)
  if exp.dry_run:
    data.eval_limit = dry_run.eval_samples(exp.train)
  mesh = parallel.make_mesh()
  model_cfg, model, params, info = backbone_lib.build(exp.model, exp.data)
  method = exp.method
  run = methods_lib.base.Run(
      exp=exp, settings=exp.methods.get(method.name), seed=seed, model=model,
      model_config=model_cfg, backbone_template=params, width=model_cfg.width,
      num_classes=data.num_classes, num_phases=len(data.train_tasks))
  logits = functools.partial(method.logits, run)
  return Session(
      exp=exp, seed=seed, workdir=workdir, data=data, mesh=mesh,
      backbone=parallel.replicate(params, mesh), backbone_info=info,
      method=method, run=run,
      train_step=steps_lib.make_train_step(method, run),
      eval_step=evaluators.make_eval_step(logits, data.num_classes,
                                          data.task_sizes),
      eval_arrays=jax.jit(functools.partial(method.eval_arrays, run)),
      ckpt=ckpt_lib.Checkpointer(workdir, keep=exp.checkpoint.keep),
      writer=_writer(exp, seed, workdir),
      fingerprint=fingerprint(exp, seed, data.class_order, data.task_sizes),
      t_start=t_start)
