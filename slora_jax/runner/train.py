"""The class-incremental task loop: train, evaluate merged, checkpoint, report.

``train_and_evaluate(exp, workdir)`` runs every seed of a validated config
(`slora_jax.runner.config.from_config`) into ``workdir/seed_<seed>``. A run restarted with the same workdir resumes from
its latest checkpoint (mid-task included) and reaches the same numbers as an
uninterrupted one: data order, augmentation and adapter init are pure
functions of (seed, task, epoch, sample).

One seed's run is a short sequence of named steps (`run_seed`): open the
session, restore or start, then for every task train it, evaluate it and
finish it, and report. Each step takes the `Progress` and returns a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sl
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import dry_run
from slora_jax.runner import errors
from slora_jax.runner import evaluators
from slora_jax.runner import faults
from slora_jax.runner import interrupt
from slora_jax.runner import lock
from slora_jax.runner import parallel
from slora_jax.runner import paths
from slora_jax.runner import progress as progress_lib
from slora_jax.runner import report
from slora_jax.runner import results as results_lib
from slora_jax.runner.session import Cursor, Progress, Session, open_session

__all__ = ["train_and_evaluate", "run_seed"]


def train_and_evaluate(exp: config_lib.Experiment, workdir: str) -> list[dict]:
  """Runs every seed of ``exp``; returns their results payloads.

  ``workdir/config.json`` gets the full config once the first seed's data and
  checkpoint are accepted (a refused run leaves the workdir as it was). A
  second run on the same workdir is refused while this one runs.
  """
  parallel.maybe_initialize_distributed(exp.distributed)
  config_json = paths.join(workdir, "config.json")
  with lock.hold(workdir), interrupt.handling_signals():
    return [run_seed(exp, int(seed), paths.join(workdir, f"seed_{seed}"),
                     config_json) for seed in dry_run.executed(exp).seeds]


def run_seed(exp: config_lib.Experiment, seed: int, workdir: str,
             config_json: str | None = None) -> dict:
  """One full continual-learning run; returns the results payload.

  A workdir that is not writable is refused before anything else; a full
  disk or a read-only workdir met later becomes a one-line `WorkdirError`.
  ``config_json``: where to write the full config once the run is accepted.
  """
  ckpt_lib.check_workdir(workdir)                   # before data and compiles
  with _workdir_errors(workdir):
    session = open_session(dry_run.executed(exp), seed, workdir)
    print(report.session_line(session), flush=True)
    state = restore_or_start(session)
    if config_json and jax.process_index() == 0:
      results_lib.write_json(config_json, exp.raw)
    checked = []                # dry run: each task's evaluation and checkpoint
    with interrupt.deferred():  # SIGINT/SIGTERM: stop at a step, saved
      for t in range(state.cursor.task, session.num_phases):
        state, timing = train_task(session, state, t)
        record = evaluate_task(session, state, t, timing)
        state = finish_task(session, state, record)
        if exp.dry_run:
          checked.append(_dry_run_task(session, t))
        if t + 1 < session.num_phases:
          _stop_if_requested(session, state, f"the end of task {t + 1}/"
                             f"{session.num_phases}")
      extra = None
      if exp.dry_run:
        extra = {"dry_run": dry_run.report(exp, session, checked,
                                           dry_run.peak_host_bytes())}
      return finish_run(session, state, extra)


def _dry_run_task(s: Session, t: int) -> dict:
  """What a dry run checks of task ``t``: its evaluation and checkpoint."""
  hi = s.data.eval_hi(t)
  seen = s.data.test_labels[s.data.test_indices(hi)]
  return {"task": t, "seen_classes": hi, "eval_samples": len(seen),
          "eval_classes": len(np.unique(seen)),
          "checkpoint_bytes": dry_run.checkpoint_bytes(s.ckpt)}


@contextlib.contextmanager
def _workdir_errors(workdir: str):
  """Turns a full disk or a read-only workdir into a one-line error."""
  try:
    yield
  except errors.USER_ERRORS:
    raise
  except OSError as e:
    if ckpt_lib.is_disk_full(e):
      raise ckpt_lib.disk_full_error(
          workdir, e.filename, saved=ckpt_lib.has_checkpoint(workdir)) from e
    if e.errno == errno.EROFS:
      raise errors.WorkdirError(
          e.errno, f"the workdir {workdir} became read-only ({e.filename}); "
          "pass a writable --workdir, or copy the run to one to resume "
          "it") from e
    raise


# --- restore or start ---------------------------------------------------------

def _saved_state(adapters, head, tx, opt_state) -> dict:
  if opt_state is None:
    opt_state = tx.init(sl.trainable_params(adapters, head))
  return {"trainable": adapters.trainable, "frozen": adapters.frozen,
          "head": head, "opt_state": opt_state}


def restore_or_start(s: Session) -> Progress:
  """The newest intact checkpoint's progress, or a fresh start.

  A corrupt checkpoint is set aside with a one-line warning and the one
  before it is used (`Checkpointer.restore_intact`).
  """
  head = sl.init_head(jax.random.fold_in(jax.random.key(s.seed), 10**6),
                      s.width, s.data.num_classes)
  state = Progress(s.template, head, None, Cursor())

  def target_of(meta: dict):
    if not isinstance(meta.get("fingerprint"), dict):
      raise ckpt_lib.CorruptCheckpointError("its meta item lacks the "
                                            "config's fingerprint")
    # Another config's checkpoint is the user's to move, not corrupt.
    ckpt_lib.check_fingerprint(meta["fingerprint"], s.fingerprint)
    missing = [k for k in ("cursor", "rank", "done") if k not in meta]
    if missing:
      raise ckpt_lib.CorruptCheckpointError(
          f"its meta item lacks {', '.join(missing)}")
    # The abstract state: a task begun at the saved rank, optimiser included.
    shaped = sl.begin_task(s.template, jax.random.key(0), meta["rank"])
    return _saved_state(shaped, head, s.tx, None)

  found = s.ckpt.restore_intact(target_of, parallel.replicated(s.mesh))
  if found is not None:
    _, restored, saved = found
    cursor = Cursor(**saved["cursor"])
    state = Progress(
        s.template.replace(trainable=restored["trainable"],
                           frozen=restored["frozen"]),
        restored["head"], restored["opt_state"], cursor,
        done=tuple(saved["done"]), last_saved=cursor)
    # A status line, on stderr with the library's warnings: the report on
    # stdout reads the same whether or not the run was resumed. Tasks are
    # numbered from 1 here, as in every other line the run prints.
    print(f"resuming {_resume_point(s, cursor)} from {s.ckpt.directory}",
          file=sys.stderr, flush=True)
    faults.point("restore")
  adapters, head = parallel.replicate((state.adapters, state.head), s.mesh)
  return dataclasses.replace(state, adapters=adapters, head=head)


def _resume_point(s: Session, c: Cursor) -> str:
  """Where a resumed run goes on, numbered as the ``interrupted`` line."""
  n = s.num_phases
  if c.begun:
    return f"at task {c.task + 1}/{n}, step {c.step}/{s.data.steps(c.task)[1]}"
  return f"after task {c.task}/{n}" if c.task else "at the start"


# --- checkpoints and non-finite values ----------------------------------------

def _non_finite(s: Session, what: str, where: str,
                task: int) -> errors.NonFiniteLossError:
  # Not "resume at a lower rate": the checkpoints can hold steps taken at
  # the diverging rate (the task's periodic saves, earlier tasks at the same
  # lr), so that run would match neither rate, and the fingerprint refuses a
  # changed rate anyway. A fresh workdir is the one correct rerun.
  return errors.NonFiniteLossError(
      f"{what} at {where}; lower the learning rate (--config.train."
      f"{'init_lr' if task == 0 else 'lr'}) or check the data, then rerun "
      f"with another --workdir (the checkpoints in {s.ckpt.directory} were "
      "written at this rate and refuse another)")


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def save(s: Session, state: Progress, cursor: Cursor) -> Progress:
  """Checkpoints ``state`` at ``cursor`` (refusing NaN/Inf parameters)."""
  tree = _saved_state(state.adapters, state.head, s.tx, state.opt_state)
  if not bool(_all_finite(tree)):
    # A step's loss is computed before its update: check what is saved too.
    raise _non_finite(s, "the trained parameters became NaN or "
                      "infinite", cursor.describe(s.num_phases),
                      cursor.task if cursor.begun else cursor.task - 1)
  # Arrays made outside a jit (end_task, a fresh optimiser) sit on one
  # device; with several processes Orbax saves only global arrays.
  s.ckpt.save(parallel.replicate(tree, s.mesh), {"cursor": dataclasses.asdict(cursor),
                     "fingerprint": s.fingerprint,
                     "rank": state.adapters.rank, "done": list(state.done)})
  return dataclasses.replace(state, cursor=cursor, last_saved=cursor)


def _stop_if_requested(s: Session, state: Progress, where: str,
                       cursor: Cursor | None = None, check=None) -> None:
  """Saves at ``cursor`` and raises `Interrupted` if a process got a signal.

  Every process calls it at the same places, so they agree on the step.
  ``check``: run before the save (the NaN check of the last step).
  """
  signum = interrupt.requested(s.mesh)
  if signum is None:
    return
  if cursor is not None and state.last_saved != cursor:
    if check is not None:
      check()
    save(s, state, cursor)
  if s.writer:
    s.writer.flush()
  raise interrupt.Interrupted(signum, where)


# --- one task -----------------------------------------------------------------

def _begin(s: Session, state: Progress, t: int) -> Progress:
  """A new direction (or the carried-on LoRA) and a fresh optimiser."""
  adapters = state.adapters
  if s.exp.method.direction_per_task or t == 0:
    adapters = sl.begin_task(
        adapters, jax.random.fold_in(jax.random.key(s.seed), t), s.exp.rank(t))
  opt_state = s.tx.init(sl.trainable_params(adapters, state.head))
  return dataclasses.replace(state, adapters=adapters, opt_state=opt_state,
                             cursor=Cursor(t, 0, True))


def _check_step(s: Session, state: Progress, m: dict, task: int, step: int,
                bar=None) -> None:
  """Reads a step's metrics (a sync): raises on NaN, logs and shows them."""
  loss = float(m["loss"])
  if not math.isfinite(loss):
    total = s.data.steps(task)[1]
    raise _non_finite(s, f"the training loss became {loss}",
                      f"task {task + 1}/{s.num_phases}, step {step + 1}/"
                      f"{total}", task)
  every = max(1, s.exp.log_every_steps)
  if bar is not None:
    bar.update(1)
    if step % every == 0:
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(m['accuracy']):.2f}")
      if s.writer is not None:
        epoch = step // s.data.steps(task)[0]
        s.writer.write_scalars(global_step(s, task, step + 1), {
            **{f"train/{k}": float(v) for k, v in m.items()},
            "train/lr": s.exp.train.learning_rate(task, epoch),
            "train/task": task + 1, **_alphas(state.adapters)})


def global_step(s: Session, task: int, steps: int) -> int:
  """Training steps of the whole run after ``steps`` steps of ``task``: the
  metric writers' one step axis across tasks."""
  return sum(s.data.steps(k)[1] for k in range(task)) + steps


def _alphas(adapters: sl.AdapterState) -> dict[str, float]:
  """``alpha/task<i>``: each trained direction's magnitude (1-based tasks)."""
  mags = adapters.trainable["magnitudes"]
  n = int(sl.num_stored(adapters))
  out = {f"alpha/task{i + 1}": float(a)
         for i, a in enumerate(np.asarray(mags["previous"])[:n])}
  out[f"alpha/task{n + 1}"] = float(mags["current"])
  return out


def train_task(s: Session, state: Progress, t: int):
  """Trains phase ``t`` to its last step; returns (progress, timing)."""
  if not (state.cursor.task == t and state.cursor.begun):
    state = _begin(s, state, t)
  lo, hi = s.data.train_tasks[t]
  steps_per_epoch, total = s.data.steps(t)
  start, t0 = state.cursor.step, time.perf_counter()
  bar = progress_lib.Bar(f"task {t + 1}/{s.num_phases}", total, start,
                         s.exp.train.batch_size)
  ad, hd, opt, prev, taken = state.adapters, state.head, state.opt_state, None, 0
  with s.data.train_batches(t, start_step=start) as batches:
    for step, local in zip(range(start, total), batches):
      lr = s.exp.train.learning_rate(t, step // steps_per_epoch)
      ad, hd, opt, m = s.train_step(ad, hd, opt, s.backbone,
                                    parallel.global_batch(local, s.mesh),
                                    lo, hi, lr)
      faults.point("train_step")
      state = dataclasses.replace(state, adapters=ad, head=hd, opt_state=opt,
                                  steps_here=state.steps_here + 1)
      if prev is not None:  # the previous step's metrics: stays asynchronous
        _check_step(s, state, prev, t, step - 1, bar)
      prev, taken = m, taken + 1
      if 0 < s.exp.stop_after_steps <= state.steps_here:
        # Simulated preemption (tests): leave without saving, as a kill would.
        raise SystemExit(f"stopped after {state.steps_here} steps "
                         "(config.stop_after_steps)")
      if (step + 1) % s.exp.checkpoint.every_steps == 0 and step + 1 < total:
        _check_step(s, state, m, t, step)                 # no NaN is saved
        state = save(s, state, Cursor(t, step + 1, True))
      if step + 1 < total:  # the last step's state is saved below anyway
        _stop_if_requested(
            s, state, f"task {t + 1}/{s.num_phases}, step {step + 1}/{total}",
            Cursor(t, step + 1, True),
            functools.partial(_check_step, s, state, m, t, step))
    if prev is not None:
      _check_step(s, state, prev, t, total - 1, bar)
  bar.close()
  timing = {"wall_time_s": time.perf_counter() - t0, "steps": total - start}
  return save(s, state, Cursor(t, total, True)), timing   # eval pending


def evaluate_task(s: Session, state: Progress, t: int, timing: dict) -> dict:
  """Evaluates the merged model after phase ``t``; returns the task's record."""
  te = time.perf_counter()
  merged = s.merge(s.backbone, state.adapters)
  eval_hi = s.data.eval_hi(t)
  sums = None
  for local in s.data.eval_batches(eval_hi):
    sums = evaluators.add(sums, s.eval_step(
        {"params": merged, "head": state.head},
        parallel.global_batch(local, s.mesh), eval_hi))
    faults.point("eval_step")
    # Evaluation restarts on resume from the checkpoint of the trained task.
    _stop_if_requested(s, state, f"task {t + 1}/{s.num_phases}, evaluation")
  record = {
      "task": t, **evaluators.task_record(sums, s.data.eval_tasks(t)),
      **timing, "eval_time_s": time.perf_counter() - te,
      "train_images_per_s": timing["steps"] * s.exp.train.batch_size /
                            max(timing["wall_time_s"], 1e-9),
      "alpha_current": float(state.adapters.trainable["magnitudes"]["current"]),
  }
  print(report.task_line(record, s.num_phases), flush=True)
  if s.writer:
    s.writer.write_scalars(global_step(s, t, s.data.steps(t)[1]), {
        **evaluators.scalars(record), **_alphas(state.adapters)})
    s.writer.flush()
  return record


def finish_task(s: Session, state: Progress, record: dict) -> Progress:
  """Freezes the task's direction, writes results.json and checkpoints."""
  adapters = state.adapters
  if s.exp.method.direction_per_task:
    adapters, info = sl.end_task(
        adapters, knowledge_distillation=s.exp.method.knowledge_distillation)
    record = {**record, "kd_absorbed": bool(info["absorbed"]),
              "kd_residual": float(info["residual"])}
  state = dataclasses.replace(state, adapters=adapters,
                              done=state.done + (record,))
  if jax.process_index() == 0:   # one writer; all processes hold the same
    results_lib.write_results(s.workdir,
                              report.payload(s, state.done, adapters))
  faults.point("results_written")
  state = save(s, state, Cursor(record["task"] + 1, 0, False))
  faults.point("between_tasks")
  return state


def finish_run(s: Session, state: Progress, extra: dict | None = None) -> dict:
  """Writes the final results and plot, closes the run, prints the summary.

  ``extra``: further results.json sections (a dry run's ``dry_run``).
  """
  payload = {**report.payload(s, state.done, state.adapters), **(extra or {})}
  path = paths.join(s.workdir, results_lib.RESULTS_FILENAME)
  if jax.process_index() == 0:
    path = results_lib.write_results(s.workdir, payload)
    results_lib.plot_results(payload, paths.join(s.workdir, "results.png"))
  faults.point("final")
  s.ckpt.close()
  if s.writer:
    s.writer.close()
  print(report.final_lines(payload, s.seed, time.perf_counter() - s.t_start,
                           path), flush=True)
  if "dry_run" in payload:
    print(dry_run.format_lines(payload["dry_run"]), flush=True)
  return payload
