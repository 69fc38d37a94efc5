"""The registry of continual-learning methods the runner knows.

Each method is a module of this package with a `base.Method` subclass (and,
if it has settings, their dataclass: the config's ``methods.<name>``
section); adding one is that module plus one line below. Nothing outside
the method's module compares method names.
"""

from __future__ import annotations

from slora_jax.runner.methods import base
from slora_jax.runner.methods import inflora
from slora_jax.runner.methods import lora
from slora_jax.runner.methods import simplecil

__all__ = ["METHODS", "get_method", "Method"]

Method = base.Method

METHODS: dict[str, base.Method] = {m.name: m for m in (
    *lora.FAMILY,
    inflora.InfLoRA(),
    simplecil.SimpleCIL(),
)}


def get_method(name: str) -> base.Method:
  """The registered method ``name``; ValueError lists the choices."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of "
                     f"{', '.join(METHODS)}")
  return METHODS[name]


def default_settings() -> dict:
  """``{name: settings dataclass instance}`` of the methods that have one:
  the defaults of the config's ``methods`` section."""
  return {n: m.settings() for n, m in METHODS.items() if m.settings}
