r"""Makes the demo's backbone: a small ViT trained with garment labels.

  python -m experiments.make_demo_backbone --out=experiments/assets/demo_vit.safetensors

The paper's backbone learned ImageNet-21k with its labels (photos, and the
drawings, paintings and sketches the web holds of many of its classes) before
it met ImageNet-R's renditions; the demo's learns the first ``--images``
Fashion-MNIST training images with their ten garment labels, clean
(``--clean_copies`` times) and in each of ``--styles``, before it meets
Fashion-MNIST-R, whose training renditions skip exactly those images. Writes
the weights in timm's layout and, beside them, a JSON manifest: the
architecture, the recipe, this command, the time it took, the accuracy of the
pre-training head on the 10,000 test images (clean and in each style) and
the file's sha256.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from experiments import tool

_OUT = flags.DEFINE_string("out", "experiments/assets/demo_vit.safetensors",
                           "Where to write the weights (.safetensors).")
_ROOT = flags.DEFINE_string("root", "/usr/share/datasets/fashion-mnist",
                            "The Fashion-MNIST IDX files.")
_IMAGES = flags.DEFINE_integer("images", 50000, "First training images used.")
_EPOCHS = flags.DEFINE_float("epochs", 2.0, "Passes over those images.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak AdamW rate (warm-up, then cosine).")
_SHIFT = flags.DEFINE_integer("shift", 2, "Random shifts of up to this many px.")
_SEED = flags.DEFINE_integer("seed", 7, "Initialisation and batch order.")
_STYLES = flags.DEFINE_list("styles", [], "Renditions of the same images "
                            "added to the pre-training set (see renditions.py).")
_CLEAN = flags.DEFINE_integer("clean_copies", 1, "Copies of the clean images "
                              "in the pre-training set.")
_ARCH = {name: flags.DEFINE_integer(name, default, f"ViT {name}.")
         for name, default in (("image_size", 32), ("patch_size", 8),
                               ("width", 128), ("depth", 4), ("num_heads", 4),
                               ("mlp_dim", 256))}


def _images(split, n: int, size: int, style: str | None = None):
  """The first ``n`` images of ``split`` (uint8 NHWC), in ``style`` if given."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from slora_jax.runner.data.sources import renditions  # pylint: disable=import-outside-toplevel

  def one(i):
    img = split.read(i)
    if style is not None:
      img = renditions.render(img[:, :, 0], style, split.name, i)
      img = np.repeat(img[:, :, None], 3, -1)
    if img.shape[0] != size:
      img = np.asarray(Image.fromarray(img).resize((size, size),
                                                   Image.BILINEAR))
    return img

  return (np.stack([one(i) for i in range(n)]),
          np.asarray(split.labels[:n], np.int32))


def _training_set(split, size: int):
  """``--images`` images, ``--clean_copies`` times clean, once per style."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  x, y = _images(split, _IMAGES.value, size)
  parts = [x] * _CLEAN.value + [_images(split, _IMAGES.value, size, s)[0]
                                for s in _STYLES.value]
  return np.concatenate(parts), np.tile(y, len(parts))


def _test_accuracies(cfg, params, head, split, size: int) -> dict:
  """Top-1 (%) of the pre-training head on ``split``, clean and per style."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from slora_jax.models import vit  # pylint: disable=import-outside-toplevel
  from slora_jax.runner.data.sources import renditions  # pylint: disable=import-outside-toplevel
  model = vit.VisionTransformer(cfg)
  # One compilation for every style: the weights are arguments, not constants.
  logits = jax.jit(lambda p, h, x: model.apply({"params": p}, x / 255.0)
                   @ h["kernel"] + h["bias"])
  out = {}
  for style in (None, *renditions.STYLES):
    x, y = _images(split, len(split), size, style)
    hits = 0
    for lo in range(0, len(x), 500):
      z = logits(params, head, x[lo:lo + 500].astype(np.float32))
      hits += int((np.argmax(np.asarray(z), -1) == y[lo:lo + 500]).sum())
    out[style or "clean"] = round(100.0 * hits / len(x), 2)
  return out


def main(argv):
  tool.positional(argv)
  logging.set_verbosity(logging.WARNING)       # JAX's backend probing is noise
  from slora_jax.models import convert, vit  # pylint: disable=import-outside-toplevel
  from slora_jax.runner import pretrain, results  # pylint: disable=import-outside-toplevel
  from slora_jax.runner.data import sources  # pylint: disable=import-outside-toplevel
  from slora_jax.runner.data.sources import renditions  # pylint: disable=import-outside-toplevel

  unknown = sorted(set(_STYLES.value) - set(renditions.STYLES))
  if unknown:
    raise app.UsageError(f"unknown --styles {unknown}; choose from "
                         f"{list(renditions.STYLES)}")
  t0 = time.perf_counter()
  cfg = vit.ViTConfig(**{k: f.value for k, f in _ARCH.items()})
  src = sources.IdxSource(_ROOT.value, sources.FASHION_MNIST_CLASSES)
  x, y = _training_set(src.split("train"), cfg.image_size)
  steps = int(round(_EPOCHS.value * len(x) / _BATCH.value))
  print(f"training {cfg} on {len(x)} images ({_CLEAN.value}x clean, styles "
        f"{_STYLES.value or 'none'}), {steps} steps", flush=True)
  params, head, train_acc = pretrain.fit(
      cfg, x, y, num_outputs=src.num_classes, steps=steps,
      batch_size=_BATCH.value, lr=_LR.value, seed=_SEED.value,
      shift=_SHIFT.value, log=lambda m: print(m, flush=True))
  test = src.split("test")
  test_acc = _test_accuracies(cfg, params, head, test, cfg.image_size)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  convert.save_timm_safetensors(params, _OUT.value, cfg)
  manifest = {
      "architecture": {k: v for k, v in dataclasses.asdict(cfg).items()
                       if k != "dtype"},
      "recipe": {"images": _IMAGES.value, "clean_copies": _CLEAN.value,
                 "styles": list(_STYLES.value), "epochs": _EPOCHS.value,
                 "steps": steps, "batch_size": _BATCH.value, "lr": _LR.value,
                 "shift": _SHIFT.value, "seed": _SEED.value,
                 "optimizer": "AdamW, weight decay 0.05, 10% warm-up, cosine"},
      "command": "python -m experiments.make_demo_backbone " + " ".join(
          a for a in sys.argv[1:]),
      "seconds": round(time.perf_counter() - t0, 1),
      "train_accuracy_last_fifth": round(train_acc, 2),
      "clean_test_accuracy": test_acc["clean"],
      "test_accuracy_by_style": test_acc,
      "sha256": results.sha256_file(_OUT.value),
      "bytes": os.path.getsize(_OUT.value),
  }
  path = os.path.splitext(_OUT.value)[0] + ".json"
  results.write_json(path, manifest)
  print(f"test accuracy {test_acc}; wrote {_OUT.value} and {path}",
        flush=True)


if __name__ == "__main__":
  tool.run(main)
