"""Synthetic image folders for dry runs: the reference's folder layout.

  python -m experiments.make_dry_run_data --root=/tmp/dry/imagenet-r \
      --classes=200 --train_per_class=2 --test_per_class=1

writes ``ROOT/{train,test}/<class>/<i>.jpg`` (small noise JPEGs, one colour
per class) as the ImageNet-R, ImageNet-A, CUB and DomainNet configs read
them; a dry run resizes them to the config's image size.
"""

from __future__ import annotations

import io
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from experiments import tool

_ROOT = flags.DEFINE_string("root", None, "Output folder (required).")
_CLASSES = flags.DEFINE_integer("classes", 200, "Number of class folders.")
_TRAIN = flags.DEFINE_integer("train_per_class", 2, "Train images per class.")
_TEST = flags.DEFINE_integer("test_per_class", 1, "Test images per class.")
_SIZE = flags.DEFINE_integer("size", 16, "Image side in pixels.")


def write_folders(root: str, classes: int, train_per_class: int,
                  test_per_class: int, size: int = 16, seed: int = 0) -> str:
  """Writes the folders (existing files are overwritten); returns ``root``."""
  rng = np.random.default_rng(seed)
  for split, per in (("train", train_per_class), ("test", test_per_class)):
    for c in range(classes):
      folder = os.path.join(root, split, f"class_{c:03d}")
      os.makedirs(folder, exist_ok=True)
      colour = rng.integers(0, 256, 3)
      for i in range(per):
        noise = rng.integers(-40, 41, (size, size, 3))
        pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
        jpeg = io.BytesIO()
        Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
        with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
          f.write(jpeg.getvalue())
  return root


def main(argv):
  tool.positional(argv)
  if not _ROOT.value:
    raise app.UsageError("pass --root=FOLDER")
  write_folders(_ROOT.value, _CLASSES.value, _TRAIN.value, _TEST.value,
                _SIZE.value)
  print(f"wrote {_CLASSES.value} classes x ({_TRAIN.value} train + "
        f"{_TEST.value} test) images to {_ROOT.value}")


if __name__ == "__main__":
  tool.run(main)
