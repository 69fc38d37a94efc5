"""The reference's image folders: ``<root>/{train,test}/<class>/<images>``."""

from __future__ import annotations

import os

import numpy as np

from slora_jax.runner.data.sources.core import (DataError, IMAGE_EXTENSIONS,
                                               Source, Split, SPLITS,
                                               _decode_image)

__all__ = ["ImageFolderSource"]


def _subfolders(folder: str) -> list[str]:
  with os.scandir(folder) as entries:
    return sorted(e.name for e in entries if e.is_dir())


def _class_files(folder: str) -> list[str]:
  """torchvision's make_dataset: walk (following links), sorted, by extension."""
  files = []
  for root, _, names in sorted(os.walk(folder, followlinks=True)):
    files += [os.path.join(root, n) for n in sorted(names)
              if n.lower().endswith(IMAGE_EXTENSIONS)]
  return files


class ImageFolderSource(Source):
  """``<root>/{train,test}/<class>/**/<image>``, labels in sorted folder order.

  The layout the PyTorch reference reads with torchvision's ImageFolder (its
  pre-split ImageNet-R, ImageNet-A and CUB folders), with the same class ids
  and the same file list. Files are listed when the source is built and
  decoded (PIL, RGB) when read.
  """

  def __init__(self, root: str):
    root = os.path.expanduser(root or "")
    if not root or not os.path.isdir(root):
      raise DataError(f"data directory {root!r} does not exist; set "
                      "--config.data.root to the folder holding train/ and test/")
    self.root = root
    self.description = f"the image folders in {root}"
    train = os.path.join(root, "train")
    if not os.listdir(root):
      raise DataError(f"data directory {root!r} is empty; put the data there "
                      f"or point --config.data.root at it ({self._LAYOUT})")
    if not os.path.isdir(train):
      raise DataError(f"{root}: no train/ folder; {self._LAYOUT}")
    self.class_names = _subfolders(train)
    if not self.class_names:
      raise DataError(f"{train}: no class folders (empty data directory); "
                      f"{self._LAYOUT}")
    self.num_classes = len(self.class_names)
    # Every split folder present is listed and checked now; a missing test/
    # is reported when the test split is asked for (tools that only read
    # train/ work without it).
    self._files = {name: self._index(name) for name in SPLITS
                   if os.path.isdir(os.path.join(root, name))}

  _LAYOUT = "expected <root>/train/<class>/<images> and <root>/test/<class>/..."

  def _index(self, name: str) -> tuple[list[str], np.ndarray]:
    folder = os.path.join(self.root, name)
    if name != "train":
      present = _subfolders(folder)
      missing = sorted(set(self.class_names) - set(present))
      extra = sorted(set(present) - set(self.class_names))
      if missing or extra:
        raise DataError(
            f"{folder}: class folders differ from train/ (missing "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, extra "
            f"{extra[:3]}{'...' if len(extra) > 3 else ''}); both splits "
            "need the same class folders")
    paths, labels = [], []
    for label, cls in enumerate(self.class_names):
      files = _class_files(os.path.join(folder, cls))
      if not files:
        raise DataError(
            f"{os.path.join(folder, cls)}: class folder has no images "
            f"({'/'.join(IMAGE_EXTENSIONS[:3])}/...); add images or remove "
            "the class from both splits")
      paths += files
      labels += [label] * len(files)
    return paths, np.asarray(labels, np.int64)

  def split(self, name: str) -> Split:
    self._check_split(name)
    if name not in self._files:
      raise DataError(f"{self.root}: no {name}/ folder; {self._LAYOUT}")
    paths, labels = self._files[name]
    return Split(labels, lambda i: _decode_image(paths[i], paths[i]),
                 lambda i: paths[i], name)


# ---------------------------------------------------------------------- TFDS
