"""The class-incremental task loop: train, evaluate merged, checkpoint, report.

``train_and_evaluate(config, workdir)`` runs every seed of ``config.seeds``
into ``workdir/seed_<seed>``. A run restarted with the same workdir resumes
from its latest checkpoint (mid-task included) and reaches the same numbers
as an uninterrupted one: data order, augmentation and adapter init are pure
functions of (seed, task, epoch, sample).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sl
from slora_jax.runner import backbone as backbone_lib
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import errors
from slora_jax.runner import experiment_data
from slora_jax.runner import faults
from slora_jax.runner import metrics
from slora_jax.runner import parallel
from slora_jax.runner import results as results_lib
from slora_jax.runner import steps as steps_lib

__all__ = ["train_and_evaluate", "run_seed", "METHODS"]

METHODS = ("sdlora", "sdlora_rr", "sdlora_kd", "seq_lora", "joint")


@dataclasses.dataclass
class Cursor:
  """Where the loop is: ``begun`` is False between tasks (after end_task)."""
  task: int = 0
  step: int = 0
  begun: bool = False


def train_and_evaluate(config, workdir: str) -> list[dict]:
  """Runs every seed in ``config.seeds``; returns their results payloads."""
  parallel.maybe_initialize_distributed(config.get("distributed", False))
  out = []
  for seed in config.seeds:
    out.append(run_seed(config, int(seed), os.path.join(workdir, f"seed_{seed}")))
  return out


def _policy(config) -> sl.Policy:
  a = config.adapter
  overrides = {k: a[k] for k in ("magnitude_init", "current_norm_floor",
                                 "kd_threshold", "kd_residual", "kd_offset")
               if a.get(k) is not None}
  if config.method in ("seq_lora", "joint"):
    # Plain LoRA: one direction, magnitude fixed at 1 (not trained).
    overrides.update(magnitude_init=1.0, reset_magnitudes=False)
  return sl.get_policy(config.semantics, **overrides)


def _rank(config, task: int) -> int:
  if config.method == "sdlora_rr":
    return sl.rank_schedule(task, tuple(tuple(x) for x in config.adapter.rank_schedule))
  return int(config.adapter.rank)


def _lr(config, task: int, epoch: int) -> float:
  t = config.train
  base, milestones, gamma = ((t.init_lr, t.init_milestones, t.init_lr_decay)
                             if task == 0 else (t.lr, t.milestones, t.lr_decay))
  return float(base * gamma ** sum(epoch >= m for m in milestones))


def fingerprint(config, seed: int, order, task_sizes) -> dict:
  """The settings a checkpoint must agree with to be resumed."""
  return {"method": config.method, "semantics": config.semantics, "seed": seed,
          "class_order": [int(c) for c in order],
          "task_sizes": [int(s) for s in task_sizes],
          "model": json.dumps(config.model.to_dict(), sort_keys=True, default=str),
          "data": json.dumps({k: config.data[k] for k in
                              ("source", "name", "root", "image_size")},
                             sort_keys=True, default=str),
          "adapter": json.dumps(config.adapter.to_dict(), sort_keys=True,
                                default=str),
          "train": json.dumps({k: config.train[k] for k in
                               ("batch_size", "epochs", "max_steps_per_task")},
                              sort_keys=True)}


def run_seed(config, seed: int, workdir: str) -> dict:
  """One full continual-learning run; returns the results payload.

  A workdir that is not writable is refused before anything else; a full
  disk or a read-only workdir met later becomes a one-line `WorkdirError`.
  """
  if config.method not in METHODS:
    raise ValueError(f"unknown method {config.method!r}; choose from {METHODS}")
  ckpt_lib.check_workdir(workdir)                   # before data and compiles
  try:
    return _run_seed(config, seed, workdir)
  except errors.USER_ERRORS:
    raise
  except OSError as e:
    if ckpt_lib.is_disk_full(e):
      raise ckpt_lib.disk_full_error(workdir, e.filename) from e
    if e.errno == errno.EROFS:
      raise errors.WorkdirError(
          e.errno, f"the workdir {workdir} became read-only ({e.filename}); "
          "pass a writable --workdir, or copy the run to one to resume "
          "it") from e
    raise


def _run_seed(config, seed: int, workdir: str) -> dict:
  t_start = time.perf_counter()
  data = experiment_data.prepare(config, seed)      # validates before compiling
  logging.info("seed %d: %d tasks, class sizes %s", seed, data.num_tasks,
               data.task_sizes)
  mesh = parallel.make_mesh()
  model_cfg, model, backbone, backbone_info = backbone_lib.build(config)
  backbone = parallel.replicate(backbone, mesh)
  apply_fn = lambda p, x: model.apply({"params": p}, x)

  train_tasks = data.train_tasks          # class ranges that are trained on
  policy = _policy(config)
  capacity = (1 if config.method in ("seq_lora", "joint")
              else int(config.adapter.capacity or len(train_tasks)))
  max_rank = max(_rank(config, t) for t in range(len(train_tasks)))
  template = sl.init_adapters(backbone, _rules(config, model_cfg),
                              capacity=capacity, max_rank=max_rank, policy=policy)
  n_cls = data.num_classes
  head = sl.init_head(jax.random.fold_in(jax.random.key(seed), 10**6),
                      model_cfg.width, n_cls)
  tx = steps_lib.make_optimizer(
      momentum=config.train.momentum,
      train_magnitudes=config.method not in ("seq_lora", "joint"))
  train_step = steps_lib.make_train_step(apply_fn, n_cls, tx)
  eval_step = steps_lib.make_eval_step(apply_fn, n_cls, data.num_tasks)
  merge = jax.jit(sl.merge)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep)
  fp = fingerprint(config, seed, data.class_order, data.task_sizes)
  cursor, adapters, opt_state, done = Cursor(), template, None, []
  saved = ckpt.read_meta()
  if saved is not None:
    ckpt_lib.check_fingerprint(saved["fingerprint"], fp)
    cursor = Cursor(**saved["cursor"])
    abstract = _state(_template_at(template, saved["rank"], head), head,
                      tx, _opt_or_none(tx, template, saved["rank"], head))
    state, _ = ckpt.restore(abstract)
    adapters = template.replace(trainable=state["trainable"], frozen=state["frozen"])
    head, opt_state = state["head"], state["opt_state"]
    done = saved["done"]
    logging.info("resuming at task %d step %d (%s)", cursor.task, cursor.step,
                 "in task" if cursor.begun else "between tasks")
    faults.point("restore")
  adapters, head = parallel.replicate((adapters, head), mesh)
  writer = _writer(workdir)

  num_tasks = len(data.train_tasks)
  last_saved = [cursor if saved is not None else None]

  def non_finite(what, where, task):
    kept = last_saved[0]
    kept = (f"the last good checkpoint ({_describe(kept, num_tasks)}) is kept "
            f"in {ckpt.directory}" if kept is not None
            else "no checkpoint was written before it")
    return errors.NonFiniteLossError(
        f"{what} at {where}; {kept}; lower the learning rate (--config.train."
        f"{'init_lr' if task == 0 else 'lr'}) or check the data, then rerun "
        "with the same --workdir to resume")

  def save(cur: Cursor):
    state = _state(adapters, head, tx, opt_state)
    if not bool(_all_finite(state)):
      # A step's loss is computed before its update: check what is saved too.
      raise non_finite("the trained parameters became NaN or infinite",
                       _describe(cur, num_tasks),
                       cur.task if cur.begun else cur.task - 1)
    ckpt.save(state, {"cursor": dataclasses.asdict(cur), "fingerprint": fp,
                      "rank": adapters.rank, "done": done})
    last_saved[0] = cur

  task_of_class = jnp.asarray(metrics.class_to_task(data.task_sizes))
  steps_here = 0
  for t in range(cursor.task, num_tasks):
    lo, hi = train_tasks[t]
    rank = _rank(config, t)
    steps_per_epoch, total = data.steps(t)
    if not (cursor.task == t and cursor.begun):
      if config.method in ("seq_lora", "joint") and t > 0:
        pass                    # the single LoRA carries on across tasks
      else:
        adapters = sl.begin_task(adapters, jax.random.fold_in(
            jax.random.key(seed), t), rank)
      opt_state = tx.init(sl.trainable_params(adapters, head))
      cursor = Cursor(t, 0, True)
    t0 = time.perf_counter()
    start = cursor.step
    bar = _progress(t, num_tasks, total, start, config.train.batch_size)

    def fail(loss, task, step, total=total):
      return non_finite(f"the training loss became {loss}",
                        f"task {task + 1}/{num_tasks}, step {step + 1}/{total}",
                        task)

    prev = None
    with data.train_batches(t, start_step=start) as batches:
      for s, local in zip(range(start, total), batches):
        batch = parallel.global_batch(local, mesh)
        lr = _lr(config, t, s // steps_per_epoch)
        adapters, head, opt_state, m = train_step(
            adapters, head, opt_state, backbone, batch, lo, hi, lr)
        faults.point("train_step")
        if prev is not None:  # read the previous step's metrics: stays async
          _log_step(prev, t, s - 1, bar, writer, config, fail)
        prev = m
        steps_here += 1
        if 0 < config.get("stop_after_steps", 0) <= steps_here:
          # Simulated preemption (tests): leave without saving, as a kill would.
          raise SystemExit(f"stopped after {steps_here} steps "
                           "(config.stop_after_steps)")
        if (s + 1) % config.checkpoint.every_steps == 0 and s + 1 < total:
          _log_step(m, t, s, None, None, config, fail)    # sync: no NaN saved
          save(Cursor(t, s + 1, True))
      if prev is not None:
        _log_step(prev, t, total - 1, bar, writer, config, fail)
    bar.close()
    train_time = time.perf_counter() - t0
    save(Cursor(t, total, True))                         # trained, eval pending

    te = time.perf_counter()
    merged = merge(backbone, adapters)
    eval_hi = data.eval_hi(t)
    counts = None
    for local in data.eval_batches(eval_hi):
      c = eval_step(merged, head, parallel.global_batch(local, mesh), eval_hi,
                    task_of_class)
      counts = c if counts is None else jax.tree.map(jnp.add, counts, c)
      faults.point("eval_step")
    counts = jax.tree.map(lambda x: np.asarray(x).round().astype(np.int64), counts)
    n_eval = data.eval_tasks(t)
    ev = metrics.evaluate_counts(counts["top1"][:n_eval], counts["count"][:n_eval],
                                 counts["top5"][:n_eval])
    done.append({
        "task": t, "top1_per_task": ev["top1_per_task"],
        "top5_per_task": ev.get("top5_per_task"),
        "top1_sample_weighted": ev["top1_sample_weighted"],
        "top1_task_mean": ev["top1_task_mean"],
        "top5_sample_weighted": ev["top5_sample_weighted"],
        "wall_time_s": train_time, "eval_time_s": time.perf_counter() - te,
        "steps": total - start,
        "train_images_per_s": (total - start) * config.train.batch_size /
                              max(train_time, 1e-9),
        "alpha_current": float(adapters.trainable["magnitudes"]["current"]),
    })
    logging.info("task %d: top-1 %.2f (seen classes), per task %s", t,
                 ev["top1_sample_weighted"], ev["top1_per_task"])
    print(f"task {t + 1}/{num_tasks}: top-1 {ev['top1_sample_weighted']:.2f}"
          f"  per task {ev['top1_per_task']}", flush=True)
    if writer:
      writer.add_scalar("eval/top1", ev["top1_sample_weighted"], t)
      writer.flush()

    if config.method not in ("seq_lora", "joint"):
      adapters, info = sl.end_task(
          adapters, knowledge_distillation=config.method == "sdlora_kd")
      done[-1]["kd_absorbed"] = bool(info["absorbed"])
      done[-1]["kd_residual"] = float(info["residual"])
    cursor = Cursor(t + 1, 0, False)
    payload = _payload(config, seed, data, done, backbone_info, adapters)
    results_lib.write_results(workdir, payload)
    faults.point("results_written")
    save(cursor)
    faults.point("between_tasks")

  payload = _payload(config, seed, data, done, backbone_info, adapters)
  path = results_lib.write_results(workdir, payload)
  results_lib.plot_results(payload, os.path.join(workdir, "results.png"))
  faults.point("final")
  ckpt.close()
  if writer:
    writer.close()
  s = payload["summary"]
  print("top-1 accuracy (%) on each task's classes, task-agnostic, merged "
        "weights:\n" + metrics.format_matrix(
            payload["acc_matrix"], metrics.group_labels(payload["task_sizes"])),
        flush=True)
  f = s.get("forgetting")
  forgetting = (f"  forgetting {f:.2f}" if f is not None and math.isfinite(f)
                else "")
  print(f"seed {seed}: Acc {s['acc']:.2f}  AAA {s['aaa']:.2f}{forgetting}  "
        f"({time.perf_counter() - t_start:.0f} s)  -> {path}", flush=True)
  return payload


def _rules(config, model_cfg):
  if config.adapter.targets == "qv":
    return sl.vit_qv_rules(model_cfg.qkv)
  return tuple(sl.kernel(p) for p in config.adapter.targets.split(","))


def _template_at(template, rank, head):
  return sl.begin_task(template, jax.random.key(0), rank)


def _opt_or_none(tx, template, rank, head):
  return tx.init(sl.trainable_params(_template_at(template, rank, head), head))


def _state(adapters, head, tx, opt_state):
  if opt_state is None:
    opt_state = tx.init(sl.trainable_params(adapters, head))
  return {"trainable": adapters.trainable, "frozen": adapters.frozen,
          "head": head, "opt_state": opt_state}


def _describe(cur: Cursor, num_tasks: int) -> str:
  if not cur.begun:
    return f"task {cur.task}/{num_tasks} finished" if cur.task else "start"
  return f"task {cur.task + 1}/{num_tasks}, step {cur.step}"


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def _log_step(m, task, step, bar, writer, config, fail):
  """Reads a step's metrics; ``fail(loss, task, step)`` makes the error."""
  loss = float(m["loss"])
  if not math.isfinite(loss):
    raise fail(loss, task, step)
  if bar is not None:
    bar.update(1)
    if step % max(1, config.log_every_steps) == 0:
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(m['accuracy']):.2f}")
  if writer is not None and step % max(1, config.log_every_steps) == 0:
    for k, v in m.items():
      writer.add_scalar(f"train/task{task}/{k}", float(v), step)


class _Bar:
  """tqdm when attached to a terminal, else a line every 10% (CI logs).

  Shows steps, the latest loss and accuracy, and images/s (steps/s × the
  global batch).
  """

  def __init__(self, desc, total, initial, batch_size):
    self._tqdm = None
    self.total, self.n, self.desc = total, initial, desc
    self._t0, self._n0, self._last = time.perf_counter(), initial, -1
    self._batch = batch_size
    self._post = {}
    if sys.stderr.isatty():
      import tqdm
      self._tqdm = tqdm.tqdm(total=total, initial=initial, desc=desc,
                             unit="step", dynamic_ncols=True)

  def _images_per_s(self):
    dt = max(time.perf_counter() - self._t0, 1e-9)
    return (self.n - self._n0) * self._batch / dt

  def update(self, k):
    self.n += k
    if self._tqdm is not None:
      self._tqdm.update(k)
      return
    tenth = int(10 * self.n / max(self.total, 1))
    if tenth != self._last:
      self._last = tenth
      post = " ".join(f"{k}={v}" for k, v in self._post.items())
      print(f"{self.desc}: {self.n}/{self.total} steps, "
            f"{self._images_per_s():.1f} img/s {post}", flush=True)

  def set_postfix(self, **kw):
    self._post = kw
    if self._tqdm is not None:
      self._tqdm.set_postfix(**kw, img_s=f"{self._images_per_s():.1f}")

  def close(self):
    if self._tqdm is not None:
      self._tqdm.close()


def _progress(task, num_tasks, total, start, batch_size):
  return _Bar(f"task {task + 1}/{num_tasks}", total, start, batch_size)


def _writer(workdir):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _payload(config, seed, data, done, backbone_info, adapters):
  rows = [d["top1_per_task"] for d in done]
  rows5 = [d["top5_per_task"] for d in done] if all(
      d.get("top5_per_task") is not None for d in done) else None
  per_task = [{k: d[k] for k in ("task", "wall_time_s", "train_images_per_s",
                                 "steps", "eval_time_s", "alpha_current")
               if k in d} | ({"kd_absorbed": d["kd_absorbed"]} if "kd_absorbed" in d
                            else {}) for d in done]
  task_sizes, extra = data.task_sizes, {}
  if config.method == "joint":
    # One training phase on every class: a 1x1 matrix over all classes, with
    # the per-group accuracies kept beside it (Acc = AAA = final top-1).
    task_sizes = [sum(data.task_sizes)]
    extra["joint_group_top1"] = rows[0] if rows else []
    rows = [[d["top1_sample_weighted"]] for d in done]
    rows5 = [[d["top5_sample_weighted"]] for d in done] if rows5 else None
  return results_lib.make_payload(
      **extra,
      config=config.to_dict(), seed=seed, class_order=data.class_order,
      task_sizes=task_sizes, method=config.method,
      semantics=dataclasses.asdict(adapters.spec.policy),
      acc_matrix=metrics.accuracy_matrix(rows) if rows else [],
      acc_matrix_top5=metrics.accuracy_matrix(rows5) if rows5 else None,
      curve_top1_sample_weighted=[d["top1_sample_weighted"] for d in done],
      curve_top1_task_mean=[d["top1_task_mean"] for d in done],
      curve_top5_sample_weighted=[d["top5_sample_weighted"] for d in done],
      per_task=per_task, backbone=backbone_info,
      stored_directions=int(sl.num_stored(adapters)))
