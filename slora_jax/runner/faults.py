"""Fault injection for the kill tests; inert unless ``SLORA_JAX_KILL_AT`` is set.

``SLORA_JAX_KILL_AT=<point>:<n>`` makes the process send itself SIGKILL the
n-th time it reaches ``point`` (n defaults to 1), so a test can stop a real run
at an exact place, as a preempted VM would, and check that the restart
resumes. The points are named where `point` is called (slora_jax/runner/train.py,
slora_jax/runner/checkpoint.py): ``train_step``, ``checkpoint_write`` (an Orbax
save whose temporary directory is complete on disk but not yet committed),
``eval_step``, ``results_written``, ``between_tasks``, ``restore``, ``final``.

``SLORA_JAX_SIGNAL_AT=<point>:<n>:<SIGNAL>[,...]`` (e.g. ``train_step:3:SIGINT``)
sends the process that signal instead, at each listed place: the interrupt
tests' Ctrl-C and preemption at a known step.
"""

from __future__ import annotations

import collections
import os
import signal
import sys

__all__ = ["ENV", "SIGNAL_ENV", "point", "active"]

ENV = "SLORA_JAX_KILL_AT"
SIGNAL_ENV = "SLORA_JAX_SIGNAL_AT"

_reached: collections.Counter = collections.Counter()


def _targets() -> list[tuple[str, int, signal.Signals]]:
  """(point, occurrence, signal) for every armed place."""
  out = []
  spec = os.environ.get(ENV, "")
  if spec:
    name, _, n = spec.partition(":")
    out.append((name, int(n or 1), signal.SIGKILL))
  for spec in filter(None, os.environ.get(SIGNAL_ENV, "").split(",")):
    name, n, sig = spec.split(":")
    out.append((name, int(n), signal.Signals[sig]))
  return out


def active(name: str | None = None) -> bool:
  """Whether a kill or signal is armed (at ``name``, if given)."""
  return any(name is None or t[0] == name for t in _targets())


def point(name: str) -> None:
  """Marks a named place; signals the process on an armed occurrence."""
  targets = [t for t in _targets() if t[0] == name]
  if not targets:
    return
  _reached[name] += 1
  for _, n, sig in targets:
    if _reached[name] == n:
      # Flush so the test sees how far the run got; SIGKILL skips every
      # handler, finaliser and atexit hook, exactly like a preemption.
      sys.stdout.flush()
      sys.stderr.flush()
      os.kill(os.getpid(), sig)
