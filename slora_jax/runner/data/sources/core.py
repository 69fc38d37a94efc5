"""What every image source shares: `Source`, `Split`, `DataError`, decoding."""

from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np

__all__ = ["DataError", "Split", "Source", "validate", "IMAGE_EXTENSIONS",
           "FASHION_MNIST_CLASSES", "SPLITS", "TFDS_SPLIT_MODES",
           "DOMAINNET_DOMAINS"]

SPLITS = ("train", "test")

# torchvision's ImageFolder extensions (IMG_EXTENSIONS), so the same folders
# give the same samples as the reference.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                    ".tiff", ".webp")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# 'reference': the builder's own train/test splits. 'test_80_20': a
# deterministic per-class 80/20 split of the builder's 'test' split, for
# builders that have no train split (imagenet_r, imagenet_a).
TFDS_SPLIT_MODES = ("reference", "test_80_20")

# TFDS's DomainNet has one builder config per domain; 'domainnet' means all.
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real",
                     "sketch")


class DataError(ValueError):
  """A data problem the user can fix; the message is one line."""


def _one_line(e: BaseException, limit: int = 160) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


class Split:
  """One split: labels in memory, images decoded on demand.

  Args:
    labels: the original label of every sample.
    reader: ``i -> uint8 (H, W, 3)``; must be safe to call from many threads.
    describe: ``i -> str`` naming the sample (a file path) for messages.
    name: 'train' or 'test'.
  """

  def __init__(self, labels, reader: Callable[[int], np.ndarray],
               describe: Callable[[int], str] | None = None, name: str = ""):
    self.labels = np.asarray(labels, np.int64)
    self.name = name
    self._reader = reader
    self._describe = describe or (lambda i: f"{name} sample {i}")

  def __len__(self) -> int:
    return len(self.labels)

  def _check(self, i) -> int:
    i = int(i)
    if not 0 <= i < len(self.labels):
      raise IndexError(f"sample {i} outside the {len(self.labels)} samples of "
                       f"the {self.name or 'data'} split")
    return i

  def read(self, i: int) -> np.ndarray:
    """The image of sample ``i``: uint8 (H, W, 3)."""
    return self._reader(self._check(i))

  def describe(self, i: int) -> str:
    """Where sample ``i`` comes from (a file, a record)."""
    return self._describe(self._check(i))


class Source:
  """A data set with a train and a test split (see the module docstring)."""
  num_classes: int
  class_names: Sequence[str]
  description: str = "the data"

  def split(self, name: str) -> Split:
    raise NotImplementedError

  def _check_split(self, name: str) -> None:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")


def validate(source: Source, num_classes_needed: int) -> None:
  """Raises `DataError` if ``source`` has fewer classes than needed."""
  if source.num_classes < num_classes_needed:
    raise DataError(
        f"{source.description} has {source.num_classes} classes but the config "
        f"needs {num_classes_needed}; lower --config.data.num_classes / "
        "init_cls / increment / num_tasks or use a larger data set")


def _rgb(x: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) from (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
  x = np.asarray(x)
  if x.ndim == 2:
    x = x[:, :, None]
  if x.shape[2] == 1:
    x = np.repeat(x, 3, axis=2)
  return np.ascontiguousarray(x[:, :, :3], dtype=np.uint8)


def _decode_image(data, where: str) -> np.ndarray:
  """Decodes a file path or encoded bytes with PIL, as RGB (the reference)."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
        # Palette transparency is dropped by convert('RGB') either way; drop it
        # first so PIL does not warn for every such file (same pixels).
        del im.info["transparency"]
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise DataError(f"{where}: the image file disappeared; restore it or "
                    "rebuild the data folder") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # UnidentifiedImageError and "image file is truncated" are OSErrors.
    raise DataError(f"{where}: unreadable or truncated image ({_one_line(e)}); "
                    "replace or delete the file") from None


# ---------------------------------------------------------------- IDX files
