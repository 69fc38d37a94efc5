"""timm and PEFT for the tests, on this suite's CPU-only torch.

PyPI's torchvision wheel is built against the CUDA torch: beside the CPU
torch wheel its compiled ops fail to load (a warning) and its import then
stops at registering fake kernels for ``torchvision::nms``/``qnms``, ops that
the unloaded library would have defined. timm needs none of them (only
torchvision's pure-Python parts), so `import_timm` defines the two op
schemas when torchvision's own library is missing, then imports timm.
"""

import importlib.util
import os
import warnings

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def available() -> bool:
  """Whether torch, torchvision, timm and peft are installed."""
  return all(importlib.util.find_spec(m) is not None
             for m in ("torch", "torchvision", "timm", "peft"))


def import_timm():
  """``(timm, peft)``, imported as described above."""
  import torch  # pylint: disable=import-outside-toplevel
  # transformers (imported by peft) would import TensorFlow for nothing.
  os.environ.setdefault("USE_TF", "0")
  if not hasattr(torch.ops, "torchvision") or not hasattr(
      torch.ops.torchvision, "nms"):
    for op in ("nms", "qnms"):
      try:
        torch.library.define(f"torchvision::{op}", _NMS_SCHEMA)
      except RuntimeError:                   # already defined by a library
        pass
  with warnings.catch_warnings():
    # "Failed to load image Python extension" / "_C extension": expected here.
    warnings.simplefilter("ignore", UserWarning)
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import peft  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  return timm, peft
