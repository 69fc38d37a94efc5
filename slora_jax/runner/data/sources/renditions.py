"""Fashion-MNIST-R: the ten garments drawn in other styles (an ImageNet-R miniature).

ImageNet-R holds renditions (cartoons, paintings, sketches, ...) of classes
that a ViT pre-trained on ImageNet-21k (photos, and the drawings and
paintings the web holds of many of its classes) already knows. Here a
backbone pre-trained with garment labels on the first Fashion-MNIST training
images, clean and rendered, meets renditions of *other* images of the same
garments:

* ``inverted``: 255 - x (a negative);
* ``edges``: Sobel gradient magnitude of a lightly blurred image (an outline,
  light on black);
* ``texture``: the garment's silhouette filled with stripes whose angle and
  period depend on the sample (a patterned fabric), on a faint hatching;
* ``elastic``: a smooth random warp (about 2.5 px) and a contrast change;
* ``sketch``: dark, jittered strokes of the outline on grainy light paper;
* ``blur_noise``: a Gaussian blur and strong pixel noise (a bad photocopy).

Every style is a pure numpy function of (image, split, index), so train and
test images are rendered alike and a rerun gives the same pixels. Which style
a sample gets is fixed by a seeded permutation of the split (balanced).

Classes (``classes``): ``'garment'`` (the ten garments; the style is a
nuisance, as in ImageNet-R) or ``'pair'`` (one class per (garment, style)).
``skip_train`` leaves out the first training images, the ones the backbone
was pre-trained on, so the learner never sees an image the backbone saw, in
any style.
"""

from __future__ import annotations

import numpy as np

from slora_jax.runner.data.sources.core import (FASHION_MNIST_CLASSES, DataError,
                                               Source, Split, _rgb)
from slora_jax.runner.data.sources.idx import IdxSource

__all__ = ["STYLES", "render", "style_of", "RenditionSource"]

STYLES = ("inverted", "edges", "texture", "elastic", "sketch", "blur_noise")
_SPLIT_CODE = {"train": 1, "test": 2}


def _rng(split: str, index: int, salt: int = 0) -> np.random.Generator:
  return np.random.default_rng(
      np.random.SeedSequence([20250415, _SPLIT_CODE[split], salt],
                             spawn_key=(int(index),)))


def _gauss_kernel(sigma: float) -> np.ndarray:
  r = max(1, int(round(3 * sigma)))
  x = np.arange(-r, r + 1, dtype=np.float32)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur with edge padding, float32 (H, W)."""
  k = _gauss_kernel(sigma)
  r = len(k) // 2
  p = np.pad(x, ((r, r), (0, 0)), mode="edge")
  x = sum(k[i] * p[i:i + x.shape[0]] for i in range(len(k)))
  p = np.pad(x, ((0, 0), (r, r)), mode="edge")
  return sum(k[i] * p[:, i:i + x.shape[1]] for i in range(len(k)))


def _sobel(x: np.ndarray) -> np.ndarray:
  p = np.pad(x, 1, mode="edge")
  gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]
        - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2])
  gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]
        - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:])
  return np.hypot(gx, gy)


def _edges01(x: np.ndarray) -> np.ndarray:
  e = _sobel(_blur(x, 0.7))
  return e / max(float(e.max()), 1e-6)


def _warp(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
  """Bilinear sampling of x at (y + dy, x + dx), zero outside."""
  h, w = x.shape
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float32),
                       np.arange(w, dtype=np.float32), indexing="ij")
  sy, sx = yy + dy, xx + dx
  y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
  fy, fx = sy - y0, sx - x0
  p = np.pad(x, 1)
  def at(yi, xi):
    return p[np.clip(yi + 1, 0, h + 1), np.clip(xi + 1, 0, w + 1)]
  return ((1 - fy) * (1 - fx) * at(y0, x0) + (1 - fy) * fx * at(y0, x0 + 1)
          + fy * (1 - fx) * at(y0 + 1, x0) + fy * fx * at(y0 + 1, x0 + 1))


def _smooth_field(rng, shape, sigma, amp):
  f = _blur(rng.standard_normal(shape).astype(np.float32), sigma)
  return amp * f / max(float(np.abs(f).max()), 1e-6)


def _grid(x):
  h, w = x.shape
  return np.meshgrid(np.arange(h), np.arange(w), indexing="ij")


def _inverted(x, rng):
  del rng
  return 1.0 - x


def _edges(x, rng):
  del rng
  return np.clip(1.6 * _edges01(x), 0, 1)


def _texture(x, rng):
  yy, xx = _grid(x)
  theta, period = rng.uniform(0, np.pi), rng.uniform(2.5, 5.0)
  phase = rng.uniform(0, 2 * np.pi)
  stripes = (np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta))
                    / period + phase) > 0).astype(np.float32)
  mask = np.clip(_blur(x, 0.5) * 3.0, 0, 1)
  hatching = 0.12 * (np.sin(2 * np.pi * (xx - yy) / 3.0) > 0)
  return (mask * (0.25 + 0.75 * stripes) * np.clip(x * 1.5, 0.4, 1.0)
          + (1 - mask) * hatching)


def _elastic(x, rng):
  dy = _smooth_field(rng, x.shape, 3.0, 2.5)
  dx = _smooth_field(rng, x.shape, 3.0, 2.5)
  return np.clip(_warp(x, dy, dx), 0, 1) ** rng.uniform(0.5, 2.0)


def _sketch(x, rng):
  dy = _smooth_field(rng, x.shape, 2.0, 0.8)
  dx = _smooth_field(rng, x.shape, 2.0, 0.8)
  strokes = np.clip(2.0 * _warp(_edges01(x), dy, dx), 0, 1)
  grain = 0.06 * rng.standard_normal(x.shape).astype(np.float32)
  return 0.92 - 0.85 * strokes + grain


def _blur_noise(x, rng):
  return _blur(x, 1.1) + 0.18 * rng.standard_normal(x.shape).astype(np.float32)


_RENDER = {"inverted": _inverted, "edges": _edges, "texture": _texture,
           "elastic": _elastic, "sketch": _sketch, "blur_noise": _blur_noise}


def render(image: np.ndarray, style: str, split: str, index: int) -> np.ndarray:
  """``uint8 (H, W)`` garment -> ``uint8 (H, W)`` rendition in ``style``."""
  if style not in _RENDER:
    raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
  x = np.asarray(image, np.float32) / 255.0
  y = _RENDER[style](x, _rng(split, index, STYLES.index(style)))
  return np.round(np.clip(y, 0, 1) * 255).astype(np.uint8)


def style_of(split: str, n: int, num_styles: int) -> np.ndarray:
  """The style index of each of the ``n`` samples of ``split`` (balanced)."""
  perm = np.random.default_rng(
      np.random.SeedSequence([20250415, _SPLIT_CODE[split], 99])).permutation(n)
  return (perm % num_styles).astype(np.int64)


class RenditionSource(Source):
  """Fashion-MNIST-R over the IDX files in ``root`` (see the module docstring)."""

  def __init__(self, root: str, styles=STYLES[:5], classes: str = "garment",
               skip_train: int = 0):
    self.base = IdxSource(root, FASHION_MNIST_CLASSES)
    self.styles = tuple(styles)
    unknown = [s for s in self.styles if s not in STYLES]
    if unknown or not self.styles:
      raise DataError(f"unknown or no renditions {unknown or list(styles)}; "
                      f"set --config.data.renditions.styles from {STYLES}")
    if classes not in ("garment", "pair"):
      raise DataError(f"data.renditions.classes must be 'garment' or 'pair', "
                      f"got {classes!r}")
    n_train = len(self.base.split("train").labels)
    if not 0 <= skip_train < n_train:
      raise DataError(f"data.renditions.skip_train={skip_train} leaves no "
                      f"training image of the {n_train}")
    self.classes, self.skip_train = classes, int(skip_train)
    garments = list(self.base.class_names)
    if classes == "garment":
      self.num_classes, self.class_names = len(garments), garments
    else:
      self.num_classes = len(garments) * len(self.styles)
      self.class_names = [f"{g} / {s}" for g in garments for s in self.styles]
    self.description = (f"Fashion-MNIST-R ({'/'.join(self.styles)}; "
                        f"{classes} classes) from {self.base.description}")
    self._splits = {}

  def split(self, name: str) -> Split:
    self._check_split(name)
    if name not in self._splits:
      self._splits[name] = self._make_split(name)
    return self._splits[name]

  def _make_split(self, name: str) -> Split:
    base = self.base.split(name)
    start = self.skip_train if name == "train" else 0
    styles = style_of(name, len(base.labels), len(self.styles))[start:]
    garments = base.labels[start:]
    labels = (garments if self.classes == "garment"
              else garments * len(self.styles) + styles)

    def read(i):
      j = start + int(i)
      style = self.styles[styles[int(i)]]
      return _rgb(render(base.read(j)[:, :, 0], style, name, j))

    return Split(labels, read, lambda i: f"{base.describe(start + int(i))} as "
                 f"{self.styles[styles[int(i)]]}", name)
