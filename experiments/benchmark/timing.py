"""Timed calls, interleaved rounds, medians, phase times and peak memory."""

from __future__ import annotations

import resource
import time
from typing import Any, Callable

import jax


def median(xs):
  """The median of ``xs``, None when empty."""
  xs = sorted(xs)
  n = len(xs)
  if not n:
    return None
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class Chain:
  """Repeated calls of a donating ``step(state, *rest) -> (state, metrics)``
  on its own state; times each call."""

  def __init__(self, step, state, rest):
    self.step, self.state, self.rest = step, state, rest
    self.times, self.dispatch = [], []

  def __call__(self, record: bool):
    t0 = time.perf_counter()
    out = self.step(self.state, *self.rest)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    self.state = out[0]
    if record:
      self.dispatch.append(t1 - t0)
      self.times.append(t2 - t0)

  def compiled(self):
    """The step compiled for this chain's arguments (a cache hit once run)."""
    return self.step.lower(self.state, *self.rest).compile()


class Call:
  """Repeated calls of ``fn(*args)`` (not donating); times each to completion."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args
    self.times = []

  def __call__(self, record: bool):
    t0 = time.perf_counter()
    jax.block_until_ready(self.fn(*self.args))
    if record:
      self.times.append(time.perf_counter() - t0)


def rounds(calls: dict[Any, Callable[[bool], None]], repeats: int,
           warmup) -> None:
  """Untimed first calls of ``warmup``, then ``repeats`` timed rounds.

  Each round calls every entry once, starting one entry later than the
  previous round, so no entry always runs first (or after the same one).
  """
  for name in warmup:
    calls[name](False)
  names = list(calls)
  for r in range(repeats):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      calls[name](True)


class Phases:
  """Seconds spent in each named phase, each measured from the last mark."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._last = time.perf_counter()

  def mark(self, name: str) -> None:
    now = time.perf_counter()
    self.seconds[name] = round(now - self._last, 2)
    self._last = now


def max_rss_mib() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
