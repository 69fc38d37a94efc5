"""Fault injection for the kill tests; inert unless ``SLORA_JAX_KILL_AT`` is set.

``SLORA_JAX_KILL_AT=<point>:<n>`` makes the process send itself SIGKILL the
n-th time it reaches ``point`` (n defaults to 1), so a test can stop a real run
at an exact place, as a preempted VM would, and check that the restart
resumes. The points are named where `point` is called (slora_jax/runner/train.py,
slora_jax/runner/checkpoint.py): ``train_step``, ``checkpoint_write`` (an Orbax
save whose temporary directory is complete on disk but not yet committed),
``eval_step``, ``results_written``, ``between_tasks``, ``restore``, ``final``.
"""

from __future__ import annotations

import collections
import os
import signal
import sys

__all__ = ["ENV", "point", "active"]

ENV = "SLORA_JAX_KILL_AT"

_reached: collections.Counter = collections.Counter()


def _target() -> tuple[str, int] | None:
  spec = os.environ.get(ENV, "")
  if not spec:
    return None
  name, _, n = spec.partition(":")
  return name, int(n or 1)


def active(name: str | None = None) -> bool:
  """Whether a kill is armed (at ``name``, if given)."""
  target = _target()
  return target is not None and (name is None or target[0] == name)


def point(name: str) -> None:
  """Marks a named place; SIGKILLs the process on the armed occurrence."""
  target = _target()
  if target is None or target[0] != name:
    return
  _reached[name] += 1
  if _reached[name] == target[1]:
    # Flush so the test sees how far the run got; SIGKILL skips every
    # handler, finaliser and atexit hook, exactly like a preemption.
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
