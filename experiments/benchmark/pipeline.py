"""Input-pipeline speed: the runner's train loader alone, without a model."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import numpy as np
from PIL import Image

from slora_jax.runner.data import loader
from slora_jax.runner.data import sources
from slora_jax.runner.data import transforms

from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def write_jpeg_folder(root: str, classes: int = 10, per_class: int = 20,
                      sizes=(256, 500), seed: int = 0, heights=None) -> str:
  """Writes ``root/train/<class>/*.jpg`` photo-like images of random sizes.

  Widths and heights are drawn from ``sizes`` (heights from ``heights`` when
  given), inclusive.
  """
  rng = np.random.default_rng(seed)
  heights = heights or sizes
  for c in range(classes):
    folder = os.path.join(root, "train", f"class_{c:02d}")
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      w = int(rng.integers(sizes[0], sizes[1] + 1))
      h = int(rng.integers(heights[0], heights[1] + 1))
      # Smooth colour fields plus mild noise: roughly photo-like entropy.
      coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
      img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC),
                       np.float32)
      img += rng.normal(0, 8, img.shape)
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
          os.path.join(folder, f"img_{i:03d}.jpg"), quality=90)
  return root


def pipeline_factories(s: Settings,
                       folder_root: str) -> dict[str, Callable[[], loader.Batches]]:
  """``{name: fresh train-batch iterator}`` for the demo data and a JPEG folder."""

  def factory(split, size):
    transform = transforms.TrainTransform(size)
    indices = np.arange(len(split))
    steps = s.pipeline_batches + 1          # one untimed warm-up batch
    return lambda: loader.train_batches(
        split, indices, split.labels, s.pipeline_batch, transform,
        (size, size, 3), seed=0, task=0, start_step=0, num_steps=steps,
        num_workers=s.workers)

  if os.path.isdir(FASHION_MNIST):
    demo, demo_name = sources.IdxSource(FASHION_MNIST), "Fashion-MNIST"
  else:
    demo, demo_name = sources.SyntheticSource(10, 200, 100, 32), "generated"
  folder = sources.ImageFolderSource(folder_root)
  return {f"demo data ({demo_name}, 32 px)": factory(demo.split("train"), 32),
          f"JPEG folder ({s.image_size} px)":
              factory(folder.split("train"), s.image_size)}


def pipeline_rows(table: Table, s: Settings) -> dict[str, float]:
  """Rows: images/s of each input pipeline; returns them by name."""
  rates = {}
  with tempfile.TemporaryDirectory() as tmp:
    write_jpeg_folder(tmp)
    for name, make in pipeline_factories(s, tmp).items():
      rates[name] = loader.measure_throughput(make(), s.pipeline_batches)
      table.add(f"input pipeline, {name}", rates[name], "img/s")
  return rates
