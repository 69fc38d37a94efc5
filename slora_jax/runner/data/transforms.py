"""The reference's preprocessing (docs/semantics.md §6.2), with PIL and numpy.

Train: ``RandomResizedCrop(size, scale=(0.05, 1), ratio=(3/4, 4/3))`` with
bilinear resampling, then a horizontal flip with probability 1/2. Test:
bicubic resize of the short side to ``resize_size``, then a center crop of
``size``. Both give float32 pixels in [0, 1] (torchvision's ``ToTensor``), and
the reference stops there; ``normalize`` adds the mean/std step that some
backbones expect ('imagenet', or 'inception' = (x - 0.5) / 0.5 for AugReg).

The geometry follows torchvision's PIL code path step by step (crop, then
resize; the same rounding), so given the same crop parameters the pixels are
those of the reference. The random numbers come from the generator passed in
(see `sample_rng`), so a sample's augmentation depends only on its key
(seed, task, epoch, sample index), not on threads or on where a run resumed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["TrainTransform", "EvalTransform", "NORMALIZATIONS", "sample_rng",
           "epoch_rng"]

NORMALIZATIONS = {
    "none": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def epoch_rng(seed: int, task: int, epoch: int) -> np.random.Generator:
  """An epoch's sample-order generator: ``SeedSequence([seed, task, epoch])``."""
  return np.random.default_rng(np.random.SeedSequence([seed, task, epoch]))


def sample_rng(seed: int, task: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of one sample's augmentation in one epoch.

  ``SeedSequence([seed, task, epoch], spawn_key=(index,))``: a child of the
  epoch's sequence. (A plain ``[seed, task, epoch, index]`` would collide with
  the epoch's own ``[seed, task, epoch]`` for index 0, since SeedSequence
  ignores trailing zeros of its entropy.)
  """
  return np.random.default_rng(
      np.random.SeedSequence([seed, task, epoch], spawn_key=(int(index),)))


def _check_normalize(normalize: str) -> None:
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got "
                     f"{normalize!r}")


def _to_float(img: Image.Image, normalize: str) -> np.ndarray:
  """torchvision's ToTensor (x / 255), channels last, then normalisation."""
  x = np.asarray(img, np.float32) / np.float32(255)
  stats = NORMALIZATIONS[normalize]
  if stats is not None:
    x = (x - np.asarray(stats[0], np.float32)) / np.asarray(stats[1], np.float32)
  return x


def _pil(image: np.ndarray) -> Image.Image:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} "
                     f"{image.shape}")
  return Image.fromarray(image)


class TrainTransform:
  """RandomResizedCrop + horizontal flip, sampled like torchvision's.

  Call as ``transform(uint8 (H, W, 3), rng) -> float32 (size, size, 3)``.
  """

  def __init__(self, size: int, normalize: str = "none",
               scale: Sequence[float] = (0.05, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True):
    _check_normalize(normalize)
    if size <= 0 or not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f"bad size {size}, scale {scale} or ratio {ratio}")
    self.size, self.normalize, self.flip = int(size), normalize, flip
    self.scale, self.ratio = tuple(scale), tuple(ratio)
    self._log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

  def crop_box(self, width: int, height: int,
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of the crop: torchvision's ``get_params``.

    Up to ten tries of an area fraction in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; then the largest center crop within ``ratio``.
    """
    area = width * height
    for _ in range(10):
      target = area * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*self._log_ratio))
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
    if rng is None:
      raise ValueError("TrainTransform needs a random generator")
    img = _pil(image)
    left, top, w, h = self.crop_box(img.width, img.height, rng)
    # Crop, then resize (not resize(box=...)): at the crop's borders the
    # filter must see only the crop, as in torchvision.
    img = img.crop((left, top, left + w, top + h))
    img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
    if self.flip and rng.random() < 0.5:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_float(img, self.normalize)


class EvalTransform:
  """Bicubic resize of the short side to ``resize_size``, center crop ``size``.

  Call as ``transform(uint8 (H, W, 3), rng=None) -> float32 (size, size, 3)``;
  ``rng`` is ignored.
  """

  def __init__(self, size: int, resize_size: int | None = None,
               normalize: str = "none"):
    _check_normalize(normalize)
    resize_size = resize_size or size
    if size <= 0 or resize_size < size:
      raise ValueError(f"need 0 < size <= resize_size, got size {size} and "
                       f"resize_size {resize_size}")
    self.size, self.resize_size = int(size), int(resize_size)
    self.normalize = normalize

  def resized_shape(self, width: int, height: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)``: the short side becomes ``resize_size``."""
    r = self.resize_size
    if width <= height:
      return r, int(r * height / width)
    return int(r * width / height), r

  def __call__(self, image: np.ndarray, rng=None) -> np.ndarray:
    del rng
    img = _pil(image)
    nw, nh = self.resized_shape(img.width, img.height)
    if (nw, nh) != img.size:
      img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left = int(round((nw - self.size) / 2.0))
    top = int(round((nh - self.size) / 2.0))
    img = img.crop((left, top, left + self.size, top + self.size))
    return _to_float(img, self.normalize)
