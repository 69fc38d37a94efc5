"""Image sources: IDX files, the reference's image folders, TFDS, generated.

Every source gives ``split('train'|'test')`` objects with ``labels`` (original
label ids, numpy) and ``read(i) -> uint8 (H, W, 3)``. Problems a user can fix
raise `DataError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Sequence

import numpy as np

__all__ = ["DataError", "Split", "Source", "IdxSource", "ImageFolderSource",
           "TfdsSource", "SyntheticSource", "make_source", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
  """A data problem the user can fix; the message is one line."""


class Split:
  """One split: labels in memory, images decoded on demand."""

  def __init__(self, labels, reader, describe=None):
    self.labels = np.asarray(labels, np.int64)
    self._reader = reader
    self._describe = describe or (lambda i: f"sample {i}")

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, i: int) -> np.ndarray:
    return self._reader(int(i))

  def describe(self, i: int) -> str:
    return self._describe(int(i))


class Source:
  num_classes: int
  class_names: Sequence[str]

  def split(self, name: str) -> Split:
    raise NotImplementedError


def _rgb(x: np.ndarray) -> np.ndarray:
  if x.ndim == 2:
    x = x[:, :, None]
  if x.shape[2] == 1:
    x = np.repeat(x, 3, axis=2)
  return np.ascontiguousarray(x[:, :, :3], dtype=np.uint8)


# ---------------------------------------------------------------- IDX files

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: str, ndim: int) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"{path}: cannot read the IDX file ({e}); reinstall it "
                    "(e.g. apt-get install --reinstall dataset-fashion-mnist)")
  if len(data) < 4 + 4 * ndim:
    raise DataError(f"{path}: truncated IDX header; replace the file")
  zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08 or dims != ndim:
    raise DataError(f"{path}: not a {ndim}-D uint8 IDX file (magic "
                    f"{data[:4].hex()}); point data.root at the IDX files")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise DataError(f"{path}: expected {int(np.prod(shape))} bytes of data for "
                    f"shape {shape}, found {body.size}; the file is truncated")
  return body.reshape(shape)


class IdxSource(Source):
  """MNIST-style IDX files (Fashion-MNIST), gzipped or not, in ``root``."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise DataError(f"data directory {root!r} does not exist; install "
                      "Fashion-MNIST (apt-get install dataset-fashion-mnist) or "
                      "set --config.data.root")
    self.root = root
    self._paths = {}
    for split, names in _IDX_FILES.items():
      found = []
      for name in names:
        for candidate in (name + ".gz", name):
          if os.path.exists(os.path.join(root, candidate)):
            found.append(os.path.join(root, candidate))
            break
        else:
          raise DataError(f"{root}: missing {name}(.gz); expected the four "
                          "IDX files of (Fashion-)MNIST there")
      self._paths[split] = found
    self._cache = {}
    labels = self._load("train")[1]
    self.num_classes = int(labels.max()) + 1
    self.class_names = [str(i) for i in range(self.num_classes)]

  def _load(self, split):
    if split not in self._cache:
      images = _read_idx(self._paths[split][0], 3)
      labels = _read_idx(self._paths[split][1], 1).astype(np.int64)
      if len(images) != len(labels):
        raise DataError(f"{self._paths[split][0]}: {len(images)} images but "
                        f"{len(labels)} labels; replace the files")
      self._cache[split] = (images, labels)
    return self._cache[split]

  def split(self, name: str) -> Split:
    images, labels = self._load(name)
    return Split(labels, lambda i: _rgb(images[i]),
                 lambda i: f"{self._paths[name][0]}[{i}]")


# ------------------------------------------------------------- image folders

def _list_images(folder: str) -> list[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def _decode(path: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: unreadable or truncated image ({e}); delete or "
                    "replace the file") from None


class ImageFolderSource(Source):
  """``<root>/{train,test}/<class>/*`` with labels in sorted folder order.

  The layout the PyTorch reference reads with torchvision's ImageFolder, so
  the same files give the same split and the same label ids.
  """

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    if not root or not os.path.isdir(root):
      raise DataError(f"data directory {root!r} does not exist; set "
                      "--config.data.root to the folder holding train/ and test/")
    self.root = root
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
      raise DataError(f"{root}: no train/ folder; expected "
                      "<root>/{train,test}/<class>/<images>")
    self.class_names = sorted(d for d in os.listdir(train)
                              if os.path.isdir(os.path.join(train, d)))
    if not self.class_names:
      raise DataError(f"{train}: no class folders (empty data directory); "
                      "expected <root>/train/<class>/<images>")
    self.num_classes = len(self.class_names)
    self._files = {}

  def _index(self, name):
    if name in self._files:
      return self._files[name]
    folder = os.path.join(self.root, name)
    if not os.path.isdir(folder):
      raise DataError(f"{self.root}: no {name}/ folder; expected "
                      "<root>/{train,test}/<class>/<images>")
    present = sorted(d for d in os.listdir(folder)
                     if os.path.isdir(os.path.join(folder, d)))
    missing = sorted(set(self.class_names) - set(present))
    extra = sorted(set(present) - set(self.class_names))
    if missing or extra:
      raise DataError(f"{folder}: class folders differ from train/ (missing "
                      f"{missing[:3]}, extra {extra[:3]}); both splits need the "
                      "same classes")
    paths, labels = [], []
    for label, cls in enumerate(self.class_names):
      files = _list_images(os.path.join(folder, cls))
      if not files:
        raise DataError(f"{os.path.join(folder, cls)}: class folder has no "
                        f"images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...); add "
                        "images or remove the folder from both splits")
      paths += files
      labels += [label] * len(files)
    self._files[name] = (paths, np.asarray(labels))
    return self._files[name]

  def split(self, name: str) -> Split:
    paths, labels = self._index(name)
    return Split(labels, lambda i: _decode(paths[i]), lambda i: paths[i])


# ---------------------------------------------------------------------- TFDS

class TfdsSource(Source):
  """A prepared TFDS builder, read into memory; never downloads.

  ImageNet-R and ImageNet-A have only a ``test`` split in TFDS. With
  ``split_mode='tfds_80_20'`` a deterministic 80/20 per-class split of it is
  used (seeded by ``split_seed``); it is *not* the reference's split, which
  comes from its pre-split image folders (use ``source='folder'`` for those).
  """

  _SINGLE_SPLIT = ("imagenet_r", "imagenet_a")

  def __init__(self, name: str, data_dir: str, split_mode: str = "reference",
               split_seed: int = 0):
    import tensorflow_datasets as tfds
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names
      raise DataError(f"TFDS has no data set {name!r} ({type(e).__name__}); "
                      "check --config.data.name") from None
    if not builder.is_prepared():
      raise DataError(
          f"TFDS data set {name!r} is not prepared in {builder.data_dir!r}; "
          f"prepare it first (e.g. `tfds build {name} --data_dir=...`, with any "
          "manual downloads it asks for) or set --config.data.data_dir; this "
          "program never downloads")
    if name in self._SINGLE_SPLIT and split_mode == "reference":
      raise DataError(
          f"TFDS {name!r} has no train/test split; use the reference's image "
          "folders (--config.data.source=folder) or "
          "--config.data.tfds_split_mode=tfds_80_20 (a different split)")
    self._builder, self._name = builder, name
    self._split_mode, self._split_seed = split_mode, split_seed
    label = builder.info.features["label"]
    self.num_classes = int(label.num_classes)
    self.class_names = list(label.names)
    self._cache = {}

  def _load(self, split):
    if split not in self._cache:
      import tensorflow_datasets as tfds
      ds = self._builder.as_data_source(split=split)
      images = [np.asarray(ex["image"]) for ex in ds]
      labels = np.asarray([int(ex["label"]) for ex in ds])
      self._cache[split] = (images, labels)
    return self._cache[split]

  def split(self, name: str) -> Split:
    if self._name in self._SINGLE_SPLIT:
      images, labels = self._load("test")
      rng = np.random.RandomState(self._split_seed)
      chosen = []
      for c in range(self.num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        cut = int(round(0.8 * len(idx)))
        chosen.append(idx[:cut] if name == "train" else idx[cut:])
      sel = np.sort(np.concatenate(chosen))
      return Split(labels[sel], lambda i: _rgb(images[sel[i]]),
                   lambda i: f"tfds {self._name} test[{sel[i]}]")
    images, labels = self._load(name)
    return Split(labels, lambda i: _rgb(images[i]),
                 lambda i: f"tfds {self._name} {name}[{i}]")


# ------------------------------------------------------------------ generated

class SyntheticSource(Source):
  """Generated images whose class is recognisable; no files needed.

  Class c fixes a colour pair, a grating orientation and frequency and a blob
  layout; each sample draws phase, position, contrast and noise from a
  per-index seed, so any image is cheap to regenerate and identical everywhere.
  """

  def __init__(self, num_classes: int = 10, train_per_class: int = 200,
               test_per_class: int = 100, image_size: int = 32, seed: int = 0):
    self.num_classes = int(num_classes)
    self.class_names = [f"pattern_{c}" for c in range(self.num_classes)]
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
    if name not in self._per:
      raise DataError(f"unknown split {name!r}; use 'train' or 'test'")
    per, split_id = self._per[name], 0 if name == "train" else 1
    labels = np.repeat(np.arange(self.num_classes), per)
    return Split(labels, lambda i: self._make(split_id, i // per, i % per),
                 lambda i: f"synthetic {name}[{i}]")


def make_source(data) -> Source:
  """The source ``config.data`` describes (``source`` in idx/folder/tfds/synthetic)."""
  kind = data.source
  if kind == "idx":
    return IdxSource(os.path.expanduser(data.root))
  if kind == "folder":
    return ImageFolderSource(data.root)
  if kind == "tfds":
    return TfdsSource(data.name, data.get("data_dir", ""),
                      data.get("tfds_split_mode", "reference"))
  if kind == "synthetic":
    s = data.synthetic
    return SyntheticSource(s.num_classes, s.train_per_class, s.test_per_class,
                           data.image_size, s.seed)
  raise DataError(f"unknown data.source {kind!r}; use idx, folder, tfds or "
                  "synthetic")
