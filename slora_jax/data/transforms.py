"""The reference's preprocessing (SD-LoRA-SPEC.md §6.2), in numpy and PIL.

Train: RandomResizedCrop(size, scale=(0.05, 1), ratio=(3/4, 4/3), bilinear)
and a horizontal flip with probability 1/2. Test: bicubic resize of the short
side to ``resize_size`` and a center crop of ``size``. Pixels in [0, 1];
optional normalisation for backbones trained with it. Randomness comes from
the generator passed in, so a sample's augmentation depends only on
(seed, task, epoch, index), not on threads or resume position.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["TrainTransform", "EvalTransform", "NORMALIZATIONS", "sample_rng"]

NORMALIZATIONS = {
    "none": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def sample_rng(*key: int) -> np.random.Generator:
  """A generator that depends only on ``key`` (e.g. seed, task, epoch, index)."""
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _finish(img: Image.Image, normalize: str) -> np.ndarray:
  x = np.asarray(img, np.float32) * (1.0 / 255.0)
  stats = NORMALIZATIONS[normalize]
  if stats is not None:
    x = (x - np.asarray(stats[0], np.float32)) / np.asarray(stats[1], np.float32)
  return x


def _check_normalize(normalize):
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got "
                     f"{normalize!r}")


class TrainTransform:
  """Random resized crop + flip, as torchvision's (10 tries, then center)."""

  def __init__(self, size: int, normalize: str = "none",
               scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)):
    _check_normalize(normalize)
    self.size, self.normalize = size, normalize
    self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))
    self.ratio = ratio

  def crop_box(self, width: int, height: int, rng) -> tuple[int, int, int, int]:
    """(left, top, w, h) of the crop, torchvision's sampling rule."""
    area = width * height
    for _ in range(10):
      target = area * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*self.log_ratio))
      w = int(round(math.sqrt(target * aspect)))
      h = int(round(math.sqrt(target / aspect)))
      if 0 < w <= width and 0 < h <= height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return left, top, w, h
    in_ratio = width / height
    if in_ratio < self.ratio[0]:
      w, h = width, int(round(width / self.ratio[0]))
    elif in_ratio > self.ratio[1]:
      h, w = height, int(round(height * self.ratio[1]))
    else:
      w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(image)
    left, top, w, h = self.crop_box(img.width, img.height, rng)
    img = img.resize((self.size, self.size), Image.BILINEAR,
                     box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _finish(img, self.normalize)


class EvalTransform:
  """Bicubic resize of the short side to ``resize_size``, center crop ``size``."""

  def __init__(self, size: int, resize_size: int | None = None,
               normalize: str = "none"):
    _check_normalize(normalize)
    self.size, self.normalize = size, normalize
    self.resize_size = resize_size or size

  def __call__(self, image: np.ndarray, rng=None) -> np.ndarray:
    img = Image.fromarray(image)
    w, h = img.size
    r = self.resize_size
    # torchvision's Resize(int): the short side becomes r, the long side
    # int(r * long / short).
    nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    if (nw, nh) != (w, h):
      img = img.resize((nw, nh), Image.BICUBIC)
    left = int(round((nw - self.size) / 2.0))
    top = int(round((nh - self.size) / 2.0))
    img = img.crop((left, top, left + self.size, top + self.size))
    return _finish(img, self.normalize)
