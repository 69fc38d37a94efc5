r"""Makes the demo's backbone: a small ViT trained with labels on clean images.

  python -m experiments.make_demo_backbone --out=experiments/assets/demo_vit.safetensors

The paper's backbone learned ImageNet-21k photos with their labels before it
met ImageNet-R's renditions; the demo's learns the first ``--images`` clean
Fashion-MNIST training images with their ten garment labels before it meets
Fashion-MNIST-R (whose training renditions skip exactly those images). Writes
the weights in timm's layout and, beside them, a JSON manifest: the
architecture, the recipe, this command, the time it took, the accuracy of the
pre-training head on the 10,000 clean test images and the file's sha256.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

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
_ARCH = {name: flags.DEFINE_integer(name, default, f"ViT {name}.")
         for name, default in (("image_size", 32), ("patch_size", 8),
                               ("width", 128), ("depth", 4), ("num_heads", 4),
                               ("mlp_dim", 256))}


def _images(split, n: int, size: int):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  def one(i):
    img = split.read(i)
    if img.shape[0] != size:
      img = np.asarray(Image.fromarray(img).resize((size, size),
                                                   Image.BILINEAR))
    return img.astype(np.float32) / 255.0

  return (np.stack([one(i) for i in range(n)]),
          np.asarray(split.labels[:n], np.int32))


def _test_accuracy(cfg, params, head, split, size: int) -> float:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from slora_jax.models import vit  # pylint: disable=import-outside-toplevel
  x, y = _images(split, len(split), size)
  model = vit.VisionTransformer(cfg)
  hits = 0
  for lo in range(0, len(x), 500):
    f = model.apply({"params": params}, jnp.asarray(x[lo:lo + 500]))
    pred = np.argmax(np.asarray(f @ head["kernel"] + head["bias"]), -1)
    hits += int((pred == y[lo:lo + 500]).sum())
  return 100.0 * hits / len(x)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)       # JAX's backend probing is noise
  from slora_jax.models import convert, vit  # pylint: disable=import-outside-toplevel
  from slora_jax.runner import pretrain, results  # pylint: disable=import-outside-toplevel
  from slora_jax.runner.data import sources  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  cfg = vit.ViTConfig(**{k: f.value for k, f in _ARCH.items()})
  src = sources.IdxSource(_ROOT.value, sources.FASHION_MNIST_CLASSES)
  x, y = _images(src.split("train"), _IMAGES.value, cfg.image_size)
  steps = int(round(_EPOCHS.value * len(x) / _BATCH.value))
  print(f"training {cfg} on {len(x)} clean images, {steps} steps", flush=True)
  params, head, train_acc = pretrain.fit(
      cfg, x, y, num_outputs=src.num_classes, steps=steps,
      batch_size=_BATCH.value, lr=_LR.value, seed=_SEED.value,
      shift=_SHIFT.value, log=lambda m: print(m, flush=True))
  test_acc = _test_accuracy(cfg, params, head, src.split("test"),
                            cfg.image_size)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  convert.save_timm_safetensors(params, _OUT.value, cfg)
  manifest = {
      "architecture": {k: v for k, v in dataclasses.asdict(cfg).items()
                       if k != "dtype"},
      "recipe": {"images": len(x), "epochs": _EPOCHS.value, "steps": steps,
                 "batch_size": _BATCH.value, "lr": _LR.value,
                 "shift": _SHIFT.value, "seed": _SEED.value,
                 "optimizer": "AdamW, weight decay 0.05, 10% warm-up, cosine"},
      "command": "python -m experiments.make_demo_backbone " + " ".join(
          a for a in sys.argv[1:]),
      "seconds": round(time.perf_counter() - t0, 1),
      "train_accuracy_last_fifth": round(train_acc, 2),
      "clean_test_accuracy": round(test_acc, 2),
      "sha256": results.sha256_file(_OUT.value),
      "bytes": os.path.getsize(_OUT.value),
  }
  path = os.path.splitext(_OUT.value)[0] + ".json"
  results.write_json(path, manifest)
  print(f"clean test accuracy {test_acc:.2f}%; wrote {_OUT.value} and {path}",
        flush=True)


if __name__ == "__main__":
  app.run(main)
