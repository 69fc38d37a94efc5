"""Process settings that must be made before JAX starts its first backend.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, so entry
points call `configure` before their first JAX computation (importing jax is
fine). It adds the XLA:CPU flags measured to be fastest here (docs/benchmark.md)
to ``XLA_FLAGS``; a flag the user already set there is left as the user set it.
"""

from __future__ import annotations

import logging
import os

__all__ = ["CPU_FLAGS", "configure", "xla_flags"]

# Empty: on jaxlib 0.10.2 no XLA:CPU flag beat the defaults beyond run-to-run
# noise (docs/benchmark.md lists what was measured). XLA aborts on a flag it
# does not know, so flags added here are only used for jaxlib versions in
# which they were checked to exist.
CPU_FLAGS: tuple[str, ...] = ()
_CHECKED_JAXLIB = ((0, 10), (0, 10))   # inclusive (major, minor) range

_OPT_OUT = "SLORA_JAX_NO_XLA_FLAGS"


def _flag_name(flag: str) -> str:
  return flag.lstrip("-").split("=", 1)[0]


def _jaxlib_checked() -> bool:
  try:
    from jaxlib import version
  except ImportError:
    return False
  try:
    major_minor = tuple(int(x) for x in version.__version__.split(".")[:2])
  except ValueError:
    return False
  lo, hi = _CHECKED_JAXLIB
  return lo <= major_minor <= hi


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def xla_flags(extra: tuple[str, ...] | list[str] = ()) -> str:
  """``XLA_FLAGS`` with `CPU_FLAGS` and ``extra`` added where not already set."""
  current = os.environ.get("XLA_FLAGS", "").split()
  names = {_flag_name(f) for f in current}
  wanted = list(CPU_FLAGS if _jaxlib_checked() else ()) + list(extra)
  added = [f for f in wanted if _flag_name(f) not in names]
  return " ".join(current + added)


def configure(extra: tuple[str, ...] | list[str] = ()) -> str:
  """Sets ``XLA_FLAGS`` for this process; call before the first computation.

  Args:
    extra: more ``--xla_...`` flags to add (the user's own settings win).

  Returns:
    The ``XLA_FLAGS`` in effect. Nothing is changed when the environment
    variable ``SLORA_JAX_NO_XLA_FLAGS`` is set, or when a backend has already
    started (then a warning is logged: the flags could not take effect).
  """
  if os.environ.get(_OPT_OUT):
    return os.environ.get("XLA_FLAGS", "")
  flags = xla_flags(extra)
  if flags == os.environ.get("XLA_FLAGS", ""):
    return flags
  if _backends_started():
    logging.warning("JAX already started a backend; XLA_FLAGS %r not applied "
                    "(call slora_jax.runner.platform.configure() first)", flags)
    return os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = flags
  return flags
