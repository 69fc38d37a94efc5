"""A progress bar per task on a terminal; nothing elsewhere (CI logs get the
one line per task that the loop prints after evaluating it)."""

from __future__ import annotations

import sys
import time

__all__ = ["Bar"]


class Bar:
  """Shows steps, the latest loss and accuracy, and images/s.

  Images/s is steps/s × the global batch, timed from the first step's end:
  the first step of a process compiles the train step, which would otherwise
  count as training time (11 img/s shown for the first task).
  """

  def __init__(self, desc: str, total: int, initial: int, batch_size: int):
    self._tqdm = None
    self.total, self.n, self.desc = total, initial, desc
    self._t0, self._n0 = None, initial
    self._batch = batch_size
    if sys.stdout.isatty():
      import tqdm  # pylint: disable=import-outside-toplevel
      self._tqdm = tqdm.tqdm(total=total, initial=initial, desc=desc,
                             unit="step", dynamic_ncols=True, leave=False,
                             file=sys.stdout)

  def images_per_s(self) -> float:
    """Since the first step ended (0 until a second one has)."""
    if self._t0 is None:
      return 0.0
    dt = max(time.perf_counter() - self._t0, 1e-9)
    return (self.n - self._n0) * self._batch / dt

  def update(self, k: int) -> None:
    self.n += k
    if self._t0 is None:               # the compiling step is not timed
      self._t0, self._n0 = time.perf_counter(), self.n
    if self._tqdm is not None:
      self._tqdm.update(k)

  def set_postfix(self, **kw) -> None:
    if self._tqdm is not None:
      self._tqdm.set_postfix(**kw, img_s=f"{self.images_per_s():.1f}")

  def close(self) -> None:
    if self._tqdm is not None:
      self._tqdm.close()
