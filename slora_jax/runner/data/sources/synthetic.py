"""Generated images whose class is recognisable; no files needed."""

from __future__ import annotations

import numpy as np

from slora_jax.runner.data.sources.core import DataError, Source, Split, SPLITS

__all__ = ["SyntheticSource"]


class SyntheticSource(Source):
  """Generated images whose class is recognisable; no files needed.

  Class c fixes a colour pair, a grating orientation and frequency and a blob
  layout; each sample draws orientation jitter, phase, position, contrast and
  noise from a per-sample seed, so any image is cheap to regenerate in
  ``read`` and identical on every machine.
  """

  def __init__(self, num_classes: int = 10, train_per_class: int = 200,
               test_per_class: int = 100, image_size: int = 32, seed: int = 0):
    if min(num_classes, train_per_class, test_per_class, image_size) <= 0:
      raise DataError(
          f"synthetic data needs positive sizes (num_classes={num_classes}, "
          f"train_per_class={train_per_class}, test_per_class="
          f"{test_per_class}, image_size={image_size}); fix data.synthetic")
    self.num_classes = int(num_classes)
    self.class_names = [f"pattern_{c}" for c in range(self.num_classes)]
    self.description = "the generated data"
    self.image_size, self.seed = int(image_size), int(seed)
    self._per = {"train": int(train_per_class), "test": int(test_per_class)}
    rng = np.random.RandomState(self.seed)
    n = self.num_classes
    self._colors = rng.uniform(0.1, 0.9, (n, 2, 3))
    self._theta = rng.uniform(0, np.pi, n)
    self._freq = rng.uniform(1.5, 5.0, n)
    self._blobs = rng.uniform(0.2, 0.8, (n, 3, 2))

  def _make(self, split_id: int, c: int, k: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, split_id, c, k])
    s = self.image_size
    yy, xx = np.mgrid[0:s, 0:s] / s
    theta = self._theta[c] + rng.normal(0, 0.15)
    phase = rng.uniform(0, 2 * np.pi)
    g = 0.5 + 0.5 * np.sin(2 * np.pi * self._freq[c] *
                           (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    shift = rng.uniform(-0.15, 0.15, 2)
    blob = np.zeros((s, s))
    for cy, cx in self._blobs[c]:
      blob += np.exp(-(((yy - cy - shift[0]) ** 2 + (xx - cx - shift[1]) ** 2)
                       / 0.01))
    mix = np.clip(0.6 * g + 0.8 * blob, 0, 1)[..., None]
    a, b = self._colors[c]
    img = a * (1 - mix) + b * mix
    img = img * rng.uniform(0.7, 1.2) + rng.normal(0, 0.06, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)

  def split(self, name: str) -> Split:
    self._check_split(name)
    per, split_id = self._per[name], SPLITS.index(name)
    labels = np.repeat(np.arange(self.num_classes), per)
    return Split(labels, lambda i: self._make(split_id, i // per, i % per),
                 lambda i: f"synthetic {name}[{i}]", name)
