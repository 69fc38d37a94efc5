"""Image sources: IDX files, the reference's image folders, TFDS, generated.

A `Source` has ``num_classes``, ``class_names`` and ``split('train'|'test')``.
A `Split` holds every sample's original label in memory (``labels``) and
decodes one image on demand (``read(i) -> uint8 (H, W, 3)``, grayscale repeated
to three channels), so the loader's threads decode in parallel.

Problems a user can fix raise `DataError` with one line that names the problem
and the fix. Sources check what they can when they are built (directories,
headers, class folders); a corrupt image file is only found when it is read
(an image folder then searches its other files, so one message names them
all, up to a limit).
"""

from __future__ import annotations

from slora_jax.runner.data.sources.core import (DOMAINNET_DOMAINS,
                                               FASHION_MNIST_CLASSES,
                                               IMAGE_EXTENSIONS, SPLITS,
                                               TFDS_SPLIT_MODES, DataError,
                                               Source, Split, validate)
from slora_jax.runner.data.sources.folder import ImageFolderSource
from slora_jax.runner.data.sources.idx import IdxSource
from slora_jax.runner.data.sources.renditions import RenditionSource
from slora_jax.runner.data.sources.synthetic import SyntheticSource
from slora_jax.runner.data.sources.tfds import TfdsSource

__all__ = ["DataError", "Split", "Source", "IdxSource", "ImageFolderSource",
           "RenditionSource",
           "TfdsSource", "SyntheticSource", "make_source", "validate",
           "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "SPLITS",
           "TFDS_SPLIT_MODES", "DOMAINNET_DOMAINS"]


def make_source(data) -> Source:
  """The source that the data settings (`config.DataSettings`) describe.

  ``data.source``: 'idx' (``root``), 'renditions' (Fashion-MNIST-R over the
  IDX files in ``root``, ``renditions.{styles, classes, skip_train}``),
  'folder' (``root``), 'tfds' (``name``,
  ``data_dir``, ``tfds_split_mode``, ``tfds_split_seed``) or 'synthetic'
  (``synthetic.{num_classes, train_per_class, test_per_class, seed}``,
  ``image_size``).
  """
  kind = data.source
  if kind in ("idx", "folder", "renditions") and not data.root:
    raise DataError(f"data.root is empty; set --config.data.root to the "
                    f"{'IDX files' if kind == 'idx' else 'image folders'}")
  if kind == "idx":
    names = FASHION_MNIST_CLASSES if data.name == "fashion_mnist" else None
    return IdxSource(data.root, names)
  if kind == "folder":
    return ImageFolderSource(data.root)
  if kind == "renditions":
    r = data.renditions
    return RenditionSource(data.root, r.styles, r.classes, r.skip_train)
  if kind == "tfds":
    return TfdsSource(data.name, data.data_dir or None, data.tfds_split_mode,
                      data.tfds_split_seed)
  if kind == "synthetic":
    s = data.synthetic
    return SyntheticSource(s.num_classes, s.train_per_class, s.test_per_class,
                           data.image_size, s.seed)
  raise DataError(f"unknown data.source {kind!r}; use idx, renditions, folder, "
                  "tfds or synthetic")
