"""The reference's image folders: ``<root>/{train,test}/<class>/<images>``."""

from __future__ import annotations

import concurrent.futures

import numpy as np

from slora_jax.runner import paths

from slora_jax.runner.data.sources.core import (DataError, IMAGE_EXTENSIONS,
                                               Source, Split, SPLITS,
                                               _decode_image)

__all__ = ["ImageFolderSource", "BAD_FILES_LIMIT"]

# A bad image makes the source look for others, so one message names them
# all; the search stops at this many.
BAD_FILES_LIMIT = 20


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


def _problem(path: str) -> str | None:
  """Why ``path`` cannot be decoded, or None (JPEGs decoded at 1/8 scale:
  the whole stream is still read, so truncation is still found)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path if paths.is_local(path) else _image_bytes(path)) as im:
      im.draft("RGB", (im.width // 8 or 1, im.height // 8 or 1))
      im.load()
  except FileNotFoundError:
    return "disappeared"
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return " ".join(str(e).split()) or type(e).__name__
  return None


def bad_files(files: list[str], limit: int = BAD_FILES_LIMIT) -> list[str]:
  """The files among ``files`` that PIL cannot decode, at most ``limit``."""
  bad = []
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for start in range(0, len(files), 256):
      chunk = files[start:start + 256]
      bad += [f for f, why in zip(chunk, pool.map(_problem, chunk)) if why]
      if len(bad) >= limit:
        break
  return bad[:limit]


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
    return Split(labels, lambda i: self._read(files[i]),
                 lambda i: files[i], name)

  def _read(self, path: str) -> np.ndarray:
    try:
      return _read_image(path)
    except DataError as e:
      if "unreadable or truncated" not in str(e):
        raise
      first = e
    # Every bad file in one message, not one per rerun: search the others.
    others = [f for split in SPLITS if split in self._files
              for f in self._files[split][0] if f != path]
    more = bad_files(others, BAD_FILES_LIMIT - 1)
    if not more:
      raise first
    n = len(more) + 1
    count = f"at least {n}" if n >= BAD_FILES_LIMIT else str(n)
    reason = str(first).split("unreadable or truncated image ", 1)[1]
    reason = reason.rsplit("; replace or delete the file", 1)[0]
    raise DataError(
        f"{count} unreadable or truncated images: {path} {reason}, "
        f"{', '.join(more)}; replace or delete these files (the search "
        f"stops at {BAD_FILES_LIMIT})") from None


# ---------------------------------------------------------------------- TFDS
