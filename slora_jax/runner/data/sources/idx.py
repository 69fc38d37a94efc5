"""IDX files (MNIST and Fashion-MNIST), plain or gzipped."""

from __future__ import annotations

import contextlib
import gzip
import struct
from typing import Sequence

import numpy as np

from slora_jax.runner import paths
from slora_jax.runner.data.sources.core import (DataError, Source, Split, _one_line,
                                               _rgb)

__all__ = ["IdxSource"]


_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_FIX = ("reinstall the files (apt-get install --reinstall "
            "dataset-fashion-mnist) or point --config.data.root at intact ones")


@contextlib.contextmanager
def _open_idx(path: str):
  with paths.open_file(path, "rb") as f:
    yield gzip.GzipFile(fileobj=f, mode="rb") if path.endswith(".gz") else f


def _idx_header(f, path: str, ndim: int) -> tuple[int, ...]:
  head = f.read(4 + 4 * ndim)
  if len(head) < 4 + 4 * ndim:
    raise DataError(f"{path}: truncated IDX header; {_IDX_FIX}")
  zero, dtype_code, dims = struct.unpack(">HBB", head[:4])
  if zero != 0 or dtype_code != 0x08 or dims != ndim:
    raise DataError(f"{path}: not a {ndim}-D uint8 IDX file (magic "
                    f"0x{head[:4].hex()}, expected 0x0000080{ndim}); "
                    f"{_IDX_FIX}")
  return struct.unpack(f">{ndim}I", head[4:])


def _read_idx(path: str, ndim: int, header_only: bool = False):
  """The header (shape) or the whole array of an IDX file."""
  try:
    with _open_idx(path) as f:
      shape = _idx_header(f, path, ndim)
      if header_only:
        return shape
      body = f.read()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"{path}: cannot read the IDX file ({_one_line(e)}); "
                    f"{_IDX_FIX}") from None
  expected = int(np.prod(shape))
  if len(body) != expected:
    raise DataError(f"{path}: expected {expected} data bytes for shape "
                    f"{tuple(shape)}, found {len(body)}; {_IDX_FIX}")
  return np.frombuffer(body, np.uint8).reshape(shape)


class IdxSource(Source):
  """MNIST-style IDX files (Fashion-MNIST), gzipped or not, in ``root``.

  Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Labels and
  image headers are checked when the source is built; the image arrays are
  read (and their sizes checked) on the first ``split()`` of each split.

  Args:
    root: the folder holding the four files.
    class_names: names of the classes (default: the label numbers).
  """

  def __init__(self, root: str, class_names: Sequence[str] | None = None):
    root = paths.expanduser(root)
    if not root or not paths.isdir(root):
      raise DataError(f"IDX data directory {root!r} does not exist; install "
                      "Fashion-MNIST (apt-get install dataset-fashion-mnist) "
                      "or set --config.data.root")
    self.root = root
    self.description = f"the IDX files in {root}"
    self._paths = {}
    for split, names in _IDX_FILES.items():
      found = []
      for name in names:
        for candidate in (name + ".gz", name):
          if paths.isfile(paths.join(root, candidate)):
            found.append(paths.join(root, candidate))
            break
        else:
          raise DataError(f"{root}: missing {name}[.gz]; expected the four IDX "
                          "files of (Fashion-)MNIST there (train-*, t10k-*)")
      self._paths[split] = tuple(found)
    self._labels, self._images = {}, {}
    for split, (image_path, label_path) in self._paths.items():
      n_images = _read_idx(image_path, 3, header_only=True)[0]
      labels = _read_idx(label_path, 1).astype(np.int64)
      if n_images != len(labels):
        raise DataError(f"{image_path}: {n_images} images but {label_path} has "
                        f"{len(labels)} labels; {_IDX_FIX}")
      self._labels[split] = labels
    self.num_classes = int(self._labels["train"].max(initial=-1)) + 1
    if self.num_classes == 0:
      raise DataError(f"{root}: the IDX files hold no samples; {_IDX_FIX}")
    if class_names is not None and len(class_names) != self.num_classes:
      raise DataError(f"{root}: {len(class_names)} class names for "
                      f"{self.num_classes} classes; fix the class names")
    self.class_names = (list(class_names) if class_names is not None
                        else [str(i) for i in range(self.num_classes)])

  def split(self, name: str) -> Split:
    self._check_split(name)
    if name not in self._images:
      images = _read_idx(self._paths[name][0], 3)
      if len(images) != len(self._labels[name]):
        raise DataError(f"{self._paths[name][0]} changed while reading; "
                        f"{_IDX_FIX}")
      self._images[name] = images
    images, path = self._images[name], self._paths[name][0]
    return Split(self._labels[name], lambda i: _rgb(images[i]),
                 lambda i: f"{path}[{i}]", name)


# ------------------------------------------------------------- image folders
