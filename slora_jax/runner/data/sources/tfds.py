"""Prepared TFDS builders (TensorFlow is imported only when one is opened)."""

from __future__ import annotations

import logging
import threading

import numpy as np

from slora_jax.runner import paths
from slora_jax.runner.data.sources.core import (DataError, DOMAINNET_DOMAINS, Source,
                                               Split, TFDS_SPLIT_MODES,
                                               _decode_image)

__all__ = ["TfdsSource"]


class _TfdsRecords:
  """Encoded images and labels of one split of one prepared TFDS builder.

  Uses TFDS's random-access data source (array_record / parquet files): only
  labels are kept in memory and each image is fetched when read. Builders
  prepared as TFRecord have no random access; their encoded images are then
  read into memory once through tf.data (needs TensorFlow).
  """

  def __init__(self, builder, split: str, image_key: str, label_key: str):
    import tensorflow_datasets as tfds
    self._image_key = image_key
    self._lock = threading.Lock()
    features = builder.info.features
    decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items()
                if isinstance(f, tfds.features.Image)}
    self.where = f"tfds {builder.info.full_name} {split}"
    try:
      self._ds = builder.as_data_source(split, decoders=decoders)
      self._bytes = None
    except NotImplementedError:
      logging.warning("%s is stored as %s without random access: reading its "
                      "encoded images into memory (prepare it with "
                      "file_format=array_record to avoid this)", self.where,
                      builder.info.file_format)
      self._ds = None
    labels, images = [], []
    if self._ds is not None:
      n, chunk = len(self._ds), 1024
      for start in range(0, n, chunk):
        for ex in self._ds.__getitems__(range(start, min(n, start + chunk))):
          labels.append(int(ex[label_key]))
    else:
      ds = builder.as_dataset(split, decoders=decoders, shuffle_files=False)
      for ex in tfds.as_numpy(ds):
        images.append(bytes(ex[image_key]))
        labels.append(int(ex[label_key]))
      self._bytes = images
    self.labels = np.asarray(labels, np.int64)

  # Pickled for the loader's worker processes: a lock cannot be; each copy
  # gets its own.
  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def encoded(self, i: int) -> bytes:
    if self._bytes is not None:
      return self._bytes[i]
    with self._lock:  # one reader per split; decoding happens outside the lock
      return bytes(self._ds[i][self._image_key])


def _tfds_builder(name: str, data_dir: str | None, keys: tuple[str, str]):
  """A prepared TFDS builder with the image and label features, or DataError."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises DatasetNotFoundError, ValueError, ... for bad names;
    # their messages list every data set, so only the first line is kept.
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise DataError(f"TFDS cannot open {name!r} ({type(e).__name__}: "
                    f"{first[:120]}); check --config.data.name") from None
  if not builder.is_prepared():
    raise DataError(
        f"TFDS data set {name!r} is not prepared in "
        f"{data_dir or 'the default TFDS data_dir'!r} (no "
        f"{builder.data_dir}); prepare it yourself first (`tfds build {name} "
        "--data_dir=DIR --file_format=array_record`, plus any manual "
        "downloads it asks for) and set --config.data.data_dir=DIR; this "
        "program never downloads")
  features = builder.info.features
  for key in keys:
    if key not in features:
      raise DataError(f"TFDS {name!r} has no feature {key!r} (has "
                      f"{sorted(features.keys())}); not an image "
                      "classification data set")
  return builder


class TfdsSource(Source):
  """Prepared TFDS builders; this program never downloads or prepares data.

  Works with e.g. ``cifar100``, ``caltech_birds2011``, ``imagenet_r``,
  ``imagenet_a``, ``domainnet/<domain>``; ``name='domainnet'`` joins all six
  DomainNet domains (345 classes), several builders can also be joined with
  commas. Images are decoded with PIL when read, as the reference does.
  Label ids that no sample uses are dropped and the rest renumbered in
  order: ImageNet-R/-A use 200 of the 1000 ImageNet labels, and the sorted
  ImageNet ids are the sorted WordNet folder names, so the result is the
  reference's ImageFolder numbering.

  Splits. ``split_mode='reference'`` uses the builder's ``train`` and ``test``
  splits (CIFAR-100: the official 50k/10k, as the reference; CUB: the official
  split). ImageNet-R and ImageNet-A have only a ``test`` split in TFDS, and the
  reference uses its own pre-split 80/20 image folders, which cannot be
  rebuilt from TFDS: for reference-exact data use those folders with
  `ImageFolderSource` (``data.source='folder'``). ``split_mode='test_80_20'``
  instead splits TFDS's ``test`` split 80/20 per class with
  ``RandomState(split_seed)``: deterministic, but a different split than the
  reference's, so numbers are not directly comparable.

  Args:
    name: TFDS builder name(s), see above.
    data_dir: where the builder was prepared (None: TFDS's default).
    split_mode: 'reference' or 'test_80_20'.
    split_seed: seed of the 80/20 split.
    image_key: the image feature.
    label_key: the class label feature.
  """

  def __init__(self, name: str, data_dir: str | None = None,
               split_mode: str = "reference", split_seed: int = 0,
               image_key: str = "image", label_key: str = "label"):
    if split_mode not in TFDS_SPLIT_MODES:
      raise DataError(f"unknown data.tfds_split_mode {split_mode!r}; use one "
                      f"of {', '.join(TFDS_SPLIT_MODES)}")
    if not name:
      raise DataError("data.name is empty; set --config.data.name to a TFDS "
                      "builder such as cifar100")
    # tfds reads gs:// data_dirs itself (through tf.io.gfile).
    data_dir = paths.expanduser(data_dir) if data_dir else None
    names = ([f"domainnet/{d}" for d in DOMAINNET_DOMAINS] if name == "domainnet"
             else [n.strip() for n in name.split(",") if n.strip()])
    builders = [_tfds_builder(n, data_dir, (image_key, label_key))
                for n in names]
    label_names = [list(b.info.features[label_key].names) for b in builders]
    if any(ln != label_names[0] for ln in label_names):
      raise DataError(f"TFDS builders {names} have different label sets; join "
                      "only builders of one data set")
    self.name, self.split_mode, self.split_seed = name, split_mode, split_seed
    self.description = f"TFDS {name!r}"
    self._check_tfds_splits(builders)
    wanted = ("train", "test") if split_mode == "reference" else ("test",)
    records = {s: [_TfdsRecords(b, s, image_key, label_key) for b in builders]
               for s in wanted}
    lookup = self._renumber(records, label_names[0])
    self._splits = {}
    for s, rs in records.items():
      parts = [(r, k) for r in rs for k in range(len(r.labels))]
      self._splits[s] = (parts, lookup[np.concatenate([r.labels for r in rs])])
    if split_mode == "test_80_20":
      self._split_test_80_20()

  def _check_tfds_splits(self, builders) -> None:
    name = self.name
    has_train = all("train" in b.info.splits for b in builders)
    if not all("test" in b.info.splits for b in builders):
      raise DataError(f"TFDS {name!r} has no 'test' split; use a data set "
                      "with a test split or the image-folder source")
    if self.split_mode == "reference" and not has_train:
      raise DataError(
          f"TFDS {name!r} has no train split (only "
          f"{sorted(builders[0].info.splits.keys())}); use the reference's "
          "pre-split image folders (--config.data.source=folder) or "
          "--config.data.tfds_split_mode=test_80_20 (a different 80/20 split)")
    if self.split_mode == "test_80_20" and has_train:
      raise DataError(f"TFDS {name!r} has its own train split; use "
                      "--config.data.tfds_split_mode=reference")

  def _renumber(self, records, label_names) -> np.ndarray:
    """Label id -> class index, dropping ids no sample uses (ImageNet-R/-A:
    200 of 1000); sets the class count and names."""
    present = np.unique(np.concatenate(
        [r.labels for rs in records.values() for r in rs]))
    if not len(present):
      raise DataError(f"TFDS {self.name!r} holds no samples; prepare it again")
    lookup = np.full(int(present.max()) + 1, -1, np.int64)
    lookup[present] = np.arange(len(present))
    self.num_classes = len(present)
    self.class_names = [label_names[int(c)] for c in present]
    if len(present) < len(label_names):
      logging.info("%s: %d of %d label ids are used; renumbered in order",
                   self.description, len(present), len(label_names))
    return lookup

  def _split_test_80_20(self) -> None:
    """A deterministic per-class 80/20 split of the test split."""
    parts, labels = self._splits.pop("test")
    rng = np.random.RandomState(self.split_seed)
    train_sel, test_sel = [], []
    for c in range(self.num_classes):
      idx = np.flatnonzero(labels == c)
      idx = idx[rng.permutation(len(idx))]
      cut = int(round(0.8 * len(idx)))
      train_sel.append(idx[:cut])
      test_sel.append(idx[cut:])
    for s, sel in (("train", train_sel), ("test", test_sel)):
      sel = np.sort(np.concatenate(sel))
      self._splits[s] = ([parts[i] for i in sel], labels[sel])

  def split(self, name: str) -> Split:
    self._check_split(name)
    parts, labels = self._splits[name]

    def where(i):
      rec, k = parts[i]
      return f"{rec.where}[{k}]"

    def read(i):
      rec, k = parts[i]
      return _decode_image(rec.encoded(k), where(i))

    return Split(labels, read, where, name)
