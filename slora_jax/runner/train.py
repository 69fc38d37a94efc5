"""The class-incremental task loop: train, evaluate merged, checkpoint, report.

``train_and_evaluate(exp, workdir)`` runs every seed of a validated config
(`slora_jax.runner.config.from_config`) into ``workdir/seed_<seed>``. A run restarted with the same workdir resumes from
its latest checkpoint (mid-task included) and reaches the same numbers as an
uninterrupted one: data order, augmentation and adapter init are pure
functions of (seed, task, epoch, sample).

One seed's run is a short sequence of named steps (`run_seed`): open the
session, restore or start, then for every task train it (the method's
`before_task`, then steps followed by `STEP_ACTIONS`), evaluate it and
finish it (the method's `after_task`, results.json, a checkpoint), and
report. Each step takes the `Progress` and returns a new one. Nothing here
knows a method's internals (`slora_jax/runner/methods/base.py`).
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
from slora_jax.runner import steps as steps_lib
from slora_jax.runner.methods.base import MethodState, Task
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

def _saved_tree(prog: Progress) -> dict:
  return {"arrays": prog.state.arrays, "opt_state": prog.state.opt_state,
          "host": prog.host}


def _fresh(s: Session) -> Progress:
  """The method's initial state and a (shaped) optimiser state."""
  ms = s.method.init(s.run, s.backbone)
  opt = steps_lib.init_opt_state(s.method, s.run, ms.arrays)
  return Progress(steps_lib.TrainState(ms.arrays, opt), ms.host, Cursor())


def restore_or_start(s: Session) -> Progress:
  """The newest intact checkpoint's progress, or a fresh start.

  A corrupt checkpoint is set aside with a one-line warning and the one
  before it is used (`Checkpointer.restore_intact`).
  """
  prog = _fresh(s)

  def target_of(meta: dict):
    if not isinstance(meta.get("fingerprint"), dict):
      raise ckpt_lib.CorruptCheckpointError("its meta item lacks the "
                                            "config's fingerprint")
    # Another config's checkpoint is the user's to move, not corrupt.
    ckpt_lib.check_fingerprint(meta["fingerprint"], s.fingerprint)
    missing = [k for k in ("cursor", "method", "done") if k not in meta]
    if missing:
      raise ckpt_lib.CorruptCheckpointError(
          f"its meta item lacks {', '.join(missing)}")
    shaped = s.method.abstract(s.run, meta["method"])
    opt = jax.eval_shape(functools.partial(steps_lib.init_opt_state,
                                           s.method, s.run), shaped.arrays)
    return {"arrays": shaped.arrays, "opt_state": opt, "host": shaped.host}

  found = s.ckpt.restore_intact(target_of, parallel.replicated(s.mesh))
  if found is not None:
    _, restored, saved = found
    cursor = Cursor(**saved["cursor"])
    prog = Progress(
        steps_lib.TrainState(restored["arrays"], restored["opt_state"]),
        jax.tree.map(np.asarray, restored["host"]), cursor,
        done=tuple(saved["done"]), last_saved=cursor)
    # A status line, on stderr with the library's warnings: the report on
    # stdout reads the same whether or not the run was resumed. Tasks are
    # numbered from 1 here, as in every other line the run prints.
    print(f"resuming {_resume_point(s, cursor)} from {s.ckpt.directory}",
          file=sys.stderr, flush=True)
    faults.point("restore")
  return dataclasses.replace(prog, state=parallel.replicate(prog.state, s.mesh))


def _resume_point(s: Session, c: Cursor) -> str:
  """Where a resumed run goes on, numbered as the ``interrupted`` line."""
  n = s.num_phases
  if c.begun:
    return f"at task {c.task + 1}/{n}, step {c.step}/{s.steps(c.task)[1]}"
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


def save(s: Session, prog: Progress, cursor: Cursor) -> Progress:
  """Checkpoints ``prog`` at ``cursor`` (refusing NaN/Inf parameters)."""
  tree = _saved_tree(prog)
  if not bool(_all_finite(tree)):
    # A step's loss is computed before its update: check what is saved too.
    raise _non_finite(s, "the trained parameters became NaN or "
                      "infinite", cursor.describe(s.num_phases),
                      cursor.task if cursor.begun else cursor.task - 1)
  # Arrays made outside a jit (end_task, a fresh optimiser, the host state)
  # sit on one device; with several processes Orbax saves only global arrays.
  meta = s.method.meta(MethodState(prog.state.arrays, prog.host))
  s.ckpt.save(parallel.replicate(tree, s.mesh), {
      "cursor": dataclasses.asdict(cursor), "fingerprint": s.fingerprint,
      "method": meta, "done": list(prog.done)})
  return dataclasses.replace(prog, cursor=cursor, last_saved=cursor)


def _stop_if_requested(s: Session, prog: Progress, where: str,
                       cursor: Cursor | None = None, check=None) -> None:
  """Saves at ``cursor`` and raises `Interrupted` if a process got a signal.

  Every process calls it at the same places, so they agree on the step.
  ``check``: run before the save (the NaN check of the last step).
  """
  signum = interrupt.requested(s.mesh)
  if signum is None:
    return
  if cursor is not None and prog.last_saved != cursor:
    if check is not None:
      check()
    save(s, prog, cursor)
  if s.writer:
    s.writer.flush()
  raise interrupt.Interrupted(signum, where)


# --- one task -----------------------------------------------------------------

def _task(s: Session, t: int) -> Task:
  """Phase ``t`` as the method sees it (its data as fresh global passes)."""
  lo, hi = s.data.train_tasks[t]
  spe, total = s.steps(t)

  def train_pass():
    with s.data.train_batches(t, start_step=0) as batches:
      for _, local in zip(range(spe), batches):
        yield parallel.global_batch(local, s.mesh)

  def plain_pass():
    for local in s.data.plain_train_batches(t):
      yield parallel.global_batch(local, s.mesh)

  return Task(t, lo, hi, spe, total, train_pass, plain_pass)


def _method_state(prog: Progress) -> MethodState:
  return MethodState(prog.state.arrays, prog.host)


def _begin(s: Session, prog: Progress, t: int) -> Progress:
  """The method's `before_task` and a fresh optimiser."""
  ms = s.method.before_task(s.run, _method_state(prog), _task(s, t),
                            s.backbone)
  opt = steps_lib.init_opt_state(s.method, s.run, ms.arrays)
  state = parallel.replicate(steps_lib.TrainState(ms.arrays, opt), s.mesh)
  return dataclasses.replace(prog, state=state, host=ms.host,
                             cursor=Cursor(t, 0, True))


@dataclasses.dataclass(frozen=True)
class StepDone:
  """What the periodic actions see of a finished step."""
  task: int
  step: int                  # 0-based index of the step just taken
  total: int
  metrics: dict              # this step's device-side metrics
  previous: dict | None      # the step before's (read without a stall)
  bar: progress_lib.Bar


def _check_metrics(s: Session, prog: Progress, m: dict, task: int, step: int,
                   bar=None) -> None:
  """Reads a step's metrics (a sync): raises on NaN, logs and shows them."""
  loss = float(m["loss"])
  if not math.isfinite(loss):
    total = s.steps(task)[1]
    raise _non_finite(s, f"the training loss became {loss}",
                      f"task {task + 1}/{s.num_phases}, step {step + 1}/"
                      f"{total}", task)
  every = max(1, s.exp.log_every_steps)
  if bar is not None:
    bar.update(1)
    if step % every == 0:
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(m['accuracy']):.2f}")
      if s.writer is not None:
        s.writer.write_scalars(global_step(s, task, step + 1), {
            **{f"train/{k}": float(v) for k, v in m.items()},
            "train/task": task + 1,
            **s.method.scalars(_method_state(prog))})


def _check_previous(s: Session, prog: Progress, d: StepDone) -> Progress:
  """NaN check, progress bar and logging of the step before this one: its
  metrics are ready by now, so reading them never stalls the device."""
  if d.previous is not None:
    _check_metrics(s, prog, d.previous, d.task, d.step - 1, d.bar)
  return prog


def _simulated_preemption(s: Session, prog: Progress, d: StepDone) -> Progress:
  del d
  if 0 < s.exp.stop_after_steps <= prog.steps_here:
    # Tests: leave without saving, as a kill would.
    raise SystemExit(f"stopped after {prog.steps_here} steps "
                     "(config.stop_after_steps)")
  return prog


def _periodic_checkpoint(s: Session, prog: Progress, d: StepDone) -> Progress:
  if (d.step + 1) % s.exp.checkpoint.every_steps or d.step + 1 >= d.total:
    return prog           # the last step's state is saved after the loop
  _check_metrics(s, prog, d.metrics, d.task, d.step)     # no NaN is saved
  return save(s, prog, Cursor(d.task, d.step + 1, True))


def _signals(s: Session, prog: Progress, d: StepDone) -> Progress:
  if d.step + 1 < d.total:
    _stop_if_requested(
        s, prog, f"task {d.task + 1}/{s.num_phases}, step {d.step + 1}/"
        f"{d.total}", Cursor(d.task, d.step + 1, True),
        functools.partial(_check_metrics, s, prog, d.metrics, d.task, d.step))
  return prog


# After every step, in this order.
STEP_ACTIONS = (_check_previous, _simulated_preemption, _periodic_checkpoint,
                _signals)


def global_step(s: Session, task: int, steps: int) -> int:
  """Training steps of the whole run after ``steps`` steps of ``task``: the
  metric writers' one step axis across tasks."""
  return sum(s.steps(k)[1] for k in range(task)) + steps


def train_task(s: Session, prog: Progress, t: int):
  """Trains phase ``t`` to its last step; returns (progress, timing)."""
  if not (prog.cursor.task == t and prog.cursor.begun):
    prog = _begin(s, prog, t)
  lo, hi = s.data.train_tasks[t]
  spe, total = s.steps(t)
  start, t0 = prog.cursor.step, time.perf_counter()
  bar = progress_lib.Bar(f"task {t + 1}/{s.num_phases}", total, start,
                         s.exp.train.batch_size)
  prev = None
  if total > start:
    schedule = s.method.schedule(s.run, _task(s, t))
    with s.data.train_batches(t, start_step=start) as batches:
      for step, local in zip(range(start, total), batches):
        task = steps_lib.task_args(t, lo, hi, schedule(step))
        state, m = s.train_step(prog.state, parallel.global_batch(local, s.mesh),
                                task, s.backbone)
        faults.point("train_step")
        prog = dataclasses.replace(prog, state=state,
                                   steps_here=prog.steps_here + 1)
        done = StepDone(t, step, total, m, prev, bar)
        for action in STEP_ACTIONS:
          prog = action(s, prog, done)
        prev = m
    if prev is not None:
      _check_metrics(s, prog, prev, t, total - 1, bar)
  bar.close()
  timing = {"wall_time_s": time.perf_counter() - t0, "steps": total - start}
  return save(s, prog, Cursor(t, total, True)), timing   # eval pending


def evaluate_task(s: Session, prog: Progress, t: int, timing: dict) -> dict:
  """Evaluates the merged model after phase ``t``; returns the task's record."""
  te = time.perf_counter()
  ev_arrays = s.eval_arrays(prog.state.arrays, s.backbone)
  eval_hi = s.data.eval_hi(t)
  sums = None
  for local in s.data.eval_batches(eval_hi):
    sums = evaluators.add(sums, s.eval_step(
        ev_arrays, parallel.global_batch(local, s.mesh), eval_hi))
    faults.point("eval_step")
    # Evaluation restarts on resume from the checkpoint of the trained task.
    _stop_if_requested(s, prog, f"task {t + 1}/{s.num_phases}, evaluation")
  record = {
      "task": t, **evaluators.task_record(sums, s.data.eval_tasks(t)),
      **timing, "eval_time_s": time.perf_counter() - te,
      "train_images_per_s": timing["steps"] * s.exp.train.batch_size /
                            max(timing["wall_time_s"], 1e-9),
      "method_fields": s.method.record(_method_state(prog)),
  }
  print(report.task_line(record, s.num_phases), flush=True)
  if s.writer:
    s.writer.write_scalars(global_step(s, t, s.steps(t)[1]), {
        **evaluators.scalars(record), **s.method.scalars(_method_state(prog))})
    s.writer.flush()
  return record


def finish_task(s: Session, prog: Progress, record: dict) -> Progress:
  """The method's `after_task`; writes results.json and checkpoints."""
  t = record["task"]
  ms, extra = s.method.after_task(s.run, _method_state(prog), _task(s, t),
                                  s.backbone)
  state = parallel.replicate(
      steps_lib.TrainState(ms.arrays, prog.state.opt_state), s.mesh)
  record = {**record, "method_fields": {**record.get("method_fields", {}),
                                        **extra}}
  prog = dataclasses.replace(prog, state=state, host=ms.host,
                             done=prog.done + (record,))
  if jax.process_index() == 0:   # one writer; all processes hold the same
    results_lib.write_results(s.workdir, _payload(s, prog))
  faults.point("results_written")
  prog = save(s, prog, Cursor(t + 1, 0, False))
  faults.point("between_tasks")
  return prog


def _payload(s: Session, prog: Progress) -> dict:
  return report.payload(s, prog.done, s.method.payload(_method_state(prog)))


def finish_run(s: Session, prog: Progress, extra: dict | None = None) -> dict:
  """Writes the final results and plot, closes the run, prints the summary.

  ``extra``: further results.json sections (a dry run's ``dry_run``).
  """
  payload = {**_payload(s, prog), **(extra or {})}
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
