"""The reference's image folders: ``<root>/{train,test}/<class>/<images>``."""

from __future__ import annotations

import numpy as np

from slora_jax.runner import paths

from slora_jax.runner.data.sources.core import (DataError, IMAGE_EXTENSIONS,
                                               Source, Split, SPLITS,
                                               _decode_image)

__all__ = ["ImageFolderSource"]


def _class_files(folder: str) -> list[str]:
  """torchvision's make_dataset: walk (following links), sorted, by extension."""
  files = []
  for root, names in sorted(paths.walk_files(folder)):
    files += [paths.join(root, n) for n in sorted(names)
              if n.lower().endswith(IMAGE_EXTENSIONS)]
  return files


def _read_image(path: str) -> np.ndarray:
  # PIL opens a local path itself; a remote image is read whole first.
  return _decode_image(path if paths.is_local(path) else _image_bytes(path),
                       path)


def _image_bytes(path: str):
  try:
    return paths.read_bytes(path)
  except FileNotFoundError:
    return path  # _decode_image names it as a file that disappeared


class ImageFolderSource(Source):
  """``<root>/{train,test}/<class>/**/<image>``, labels in sorted folder order.

  The layout the PyTorch reference reads with torchvision's ImageFolder (its
  pre-split ImageNet-R, ImageNet-A and CUB folders), with the same class ids
  and the same file list. Files are listed when the source is built and
  decoded (PIL, RGB) when read.
  """

  def __init__(self, root: str):
    root = paths.expanduser(root)
    if not root or not paths.isdir(root):
      raise DataError(f"data directory {root!r} does not exist; set "
                      "--config.data.root to the folder holding train/ and test/")
    self.root = root
    self.description = f"the image folders in {root}"
    train = paths.join(root, "train")
    if not paths.listdir(root):
      raise DataError(f"data directory {root!r} is empty; put the data there "
                      f"or point --config.data.root at it ({self._LAYOUT})")
    if not paths.isdir(train):
      raise DataError(f"{root}: no train/ folder; {self._LAYOUT}")
    self.class_names = paths.subdirs(train)
    if not self.class_names:
      raise DataError(f"{train}: no class folders (empty data directory); "
                      f"{self._LAYOUT}")
    self.num_classes = len(self.class_names)
    # Every split folder present is listed and checked now; a missing test/
    # is reported when the test split is asked for (tools that only read
    # train/ work without it).
    self._files = {name: self._index(name) for name in SPLITS
                   if paths.isdir(paths.join(root, name))}

  _LAYOUT = "expected <root>/train/<class>/<images> and <root>/test/<class>/..."

  def _index(self, name: str) -> tuple[list[str], np.ndarray]:
    folder = paths.join(self.root, name)
    if name != "train":
      present = paths.subdirs(folder)
      missing = sorted(set(self.class_names) - set(present))
      extra = sorted(set(present) - set(self.class_names))
      if missing or extra:
        raise DataError(
            f"{folder}: class folders differ from train/ (missing "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, extra "
            f"{extra[:3]}{'...' if len(extra) > 3 else ''}); both splits "
            "need the same class folders")
    files_all, labels = [], []
    for label, cls in enumerate(self.class_names):
      files = _class_files(paths.join(folder, cls))
      if not files:
        raise DataError(
            f"{paths.join(folder, cls)}: class folder has no images "
            f"({'/'.join(IMAGE_EXTENSIONS[:3])}/...); add images or remove "
            "the class from both splits")
      files_all += files
      labels += [label] * len(files)
    return files_all, np.asarray(labels, np.int64)

  def split(self, name: str) -> Split:
    self._check_split(name)
    if name not in self._files:
      raise DataError(f"{self.root}: no {name}/ folder; {self._LAYOUT}")
    files, labels = self._files[name]
    return Split(labels, lambda i: _read_image(files[i]),
                 lambda i: files[i], name)


# ---------------------------------------------------------------------- TFDS
