"""Image sources: IDX files, the reference's image folders, TFDS, generated.

A `Source` has ``num_classes``, ``class_names`` and ``split('train'|'test')``.
A `Split` holds every sample's original label in memory (``labels``) and
decodes one image on demand (``read(i) -> uint8 (H, W, 3)``, grayscale repeated
to three channels), so the loader's threads decode in parallel.

Problems a user can fix raise `DataError` with one line that names the problem
and the fix. Sources check what they can when they are built (directories,
headers, class folders); a corrupt image file is only found when it is read.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import threading
from typing import Callable, Sequence

import numpy as np

__all__ = ["DataError", "Split", "Source", "IdxSource", "ImageFolderSource",
           "TfdsSource", "SyntheticSource", "make_source", "validate",
           "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "SPLITS",
           "TFDS_SPLIT_MODES"]

SPLITS = ("train", "test")

# torchvision's ImageFolder extensions (IMG_EXTENSIONS), so the same folders
# give the same samples as the reference.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                    ".tiff", ".webp")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# 'reference': the builder's own train/test splits. 'test_80_20': a
# deterministic per-class 80/20 split of the builder's 'test' split, for
# builders that have no train split (imagenet_r, imagenet_a).
TFDS_SPLIT_MODES = ("reference", "test_80_20")

# TFDS's DomainNet has one builder config per domain; 'domainnet' means all.
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real",
                     "sketch")


class DataError(ValueError):
  """A data problem the user can fix; the message is one line."""


def _one_line(e: BaseException, limit: int = 160) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


class Split:
  """One split: labels in memory, images decoded on demand.

  Args:
    labels: the original label of every sample.
    reader: ``i -> uint8 (H, W, 3)``; must be safe to call from many threads.
    describe: ``i -> str`` naming the sample (a file path) for messages.
    name: 'train' or 'test'.
  """

  def __init__(self, labels, reader: Callable[[int], np.ndarray],
               describe: Callable[[int], str] | None = None, name: str = ""):
    self.labels = np.asarray(labels, np.int64)
    self.name = name
    self._reader = reader
    self._describe = describe or (lambda i: f"{name} sample {i}")

  def __len__(self) -> int:
    return len(self.labels)

  def _check(self, i) -> int:
    i = int(i)
    if not 0 <= i < len(self.labels):
      raise IndexError(f"sample {i} outside the {len(self.labels)} samples of "
                       f"the {self.name or 'data'} split")
    return i

  def read(self, i: int) -> np.ndarray:
    """The image of sample ``i``: uint8 (H, W, 3)."""
    return self._reader(self._check(i))

  def describe(self, i: int) -> str:
    """Where sample ``i`` comes from (a file, a record)."""
    return self._describe(self._check(i))


class Source:
  """A data set with a train and a test split (see the module docstring)."""
  num_classes: int
  class_names: Sequence[str]
  description: str = "the data"

  def split(self, name: str) -> Split:
    raise NotImplementedError

  def _check_split(self, name: str) -> None:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")


def validate(source: Source, num_classes_needed: int) -> None:
  """Raises `DataError` if ``source`` has fewer classes than needed."""
  if source.num_classes < num_classes_needed:
    raise DataError(
        f"{source.description} has {source.num_classes} classes but the config "
        f"needs {num_classes_needed}; lower --config.data.num_classes / "
        "init_cls / increment / num_tasks or use a larger data set")


def _rgb(x: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) from (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
  x = np.asarray(x)
  if x.ndim == 2:
    x = x[:, :, None]
  if x.shape[2] == 1:
    x = np.repeat(x, 3, axis=2)
  return np.ascontiguousarray(x[:, :, :3], dtype=np.uint8)


def _decode_image(data, where: str) -> np.ndarray:
  """Decodes a file path or encoded bytes with PIL, as RGB (the reference)."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
        # Palette transparency is dropped by convert('RGB') either way; drop it
        # first so PIL does not warn for every such file (same pixels).
        del im.info["transparency"]
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise DataError(f"{where}: the image file disappeared; restore it or "
                    "rebuild the data folder") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # UnidentifiedImageError and "image file is truncated" are OSErrors.
    raise DataError(f"{where}: unreadable or truncated image ({_one_line(e)}); "
                    "replace or delete the file") from None


# ---------------------------------------------------------------- IDX files

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_FIX = ("reinstall the files (apt-get install --reinstall "
            "dataset-fashion-mnist) or point --config.data.root at intact ones")


def _open_idx(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


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
    root = os.path.expanduser(root or "")
    if not root or not os.path.isdir(root):
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
          if os.path.isfile(os.path.join(root, candidate)):
            found.append(os.path.join(root, candidate))
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

  def encoded(self, i: int) -> bytes:
    if self._bytes is not None:
      return self._bytes[i]
    with self._lock:  # one reader per split; decoding happens outside the lock
      return bytes(self._ds[i][self._image_key])


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
    import tensorflow_datasets as tfds
    if split_mode not in TFDS_SPLIT_MODES:
      raise DataError(f"unknown data.tfds_split_mode {split_mode!r}; use one "
                      f"of {', '.join(TFDS_SPLIT_MODES)}")
    if not name:
      raise DataError("data.name is empty; set --config.data.name to a TFDS "
                      "builder such as cifar100")
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    names = ([f"domainnet/{d}" for d in DOMAINNET_DOMAINS] if name == "domainnet"
             else [n.strip() for n in name.split(",") if n.strip()])
    builders = []
    for n in names:
      try:
        builder = tfds.builder(n, data_dir=data_dir)
      except Exception as e:  # pylint: disable=broad-except
        # TFDS raises DatasetNotFoundError, ValueError, ... for bad names;
        # their messages list every data set, so only the first line is kept.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"TFDS cannot open {n!r} ({type(e).__name__}: "
                        f"{first[:120]}); check --config.data.name") from None
      if not builder.is_prepared():
        raise DataError(
            f"TFDS data set {n!r} is not prepared in "
            f"{data_dir or 'the default TFDS data_dir'!r} (no "
            f"{builder.data_dir}); prepare it yourself first (`tfds build {n} "
            "--data_dir=DIR --file_format=array_record`, plus any manual "
            "downloads it asks for) and set --config.data.data_dir=DIR; this "
            "program never downloads")
      features = builder.info.features
      for key in (image_key, label_key):
        if key not in features:
          raise DataError(f"TFDS {n!r} has no feature {key!r} (has "
                          f"{sorted(features.keys())}); not an image "
                          "classification data set")
      builders.append(builder)
    label_names = [list(b.info.features[label_key].names) for b in builders]
    if any(ln != label_names[0] for ln in label_names):
      raise DataError(f"TFDS builders {names} have different label sets; join "
                      "only builders of one data set")

    self.name, self.split_mode, self.split_seed = name, split_mode, split_seed
    self.description = f"TFDS {name!r}"
    has_train = all("train" in b.info.splits for b in builders)
    if not all("test" in b.info.splits for b in builders):
      raise DataError(f"TFDS {name!r} has no 'test' split; use a data set "
                      "with a test split or the image-folder source")
    if split_mode == "reference" and not has_train:
      raise DataError(
          f"TFDS {name!r} has no train split (only "
          f"{sorted(builders[0].info.splits.keys())}); use the reference's "
          "pre-split image folders (--config.data.source=folder) or "
          "--config.data.tfds_split_mode=test_80_20 (a different 80/20 split)")
    if split_mode == "test_80_20" and has_train:
      raise DataError(f"TFDS {name!r} has its own train split; use "
                      "--config.data.tfds_split_mode=reference")

    wanted = ("train", "test") if split_mode == "reference" else ("test",)
    records = {s: [_TfdsRecords(b, s, image_key, label_key) for b in builders]
               for s in wanted}
    # Drop label ids no sample uses (ImageNet-R/-A: 200 of 1000).
    present = np.unique(np.concatenate(
        [r.labels for rs in records.values() for r in rs]))
    if not len(present):
      raise DataError(f"TFDS {name!r} holds no samples; prepare it again")
    lookup = np.full(int(present.max()) + 1, -1, np.int64)
    lookup[present] = np.arange(len(present))
    self.num_classes = len(present)
    self.class_names = [label_names[0][int(c)] for c in present]
    if len(present) < len(label_names[0]):
      logging.info("%s: %d of %d label ids are used; renumbered in order",
                   self.description, len(present), len(label_names[0]))

    self._splits = {}
    for s, rs in records.items():
      parts = [(r, k) for r in rs for k in range(len(r.labels))]
      labels = lookup[np.concatenate([r.labels for r in rs])]
      self._splits[s] = (parts, labels)
    if split_mode == "test_80_20":
      parts, labels = self._splits.pop("test")
      rng = np.random.RandomState(split_seed)
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


# ------------------------------------------------------------------ generated

class SyntheticSource(Source):
  """Generated images whose class is recognisable; no files needed.

  Class c fixes a colour pair, a grating orientation and frequency and a blob
  layout; each sample draws orientation jitter, phase, position, contrast and
  noise from a per-sample seed, so any image is cheap to regenerate in
  ``read`` and identical on every machine.
  """

  def __init__(self, num_classes: int = 10, train_per_class: int = 200,
               test_per_class: int = 100, image_size: int = 32, seed: int = 0):
    if min(num_classes, train_per_class, test_per_class, image_size) <= 0:
      raise DataError(
          f"synthetic data needs positive sizes (num_classes={num_classes}, "
          f"train_per_class={train_per_class}, test_per_class="
          f"{test_per_class}, image_size={image_size}); fix data.synthetic")
    self.num_classes = int(num_classes)
    self.class_names = [f"pattern_{c}" for c in range(self.num_classes)]
    self.description = "the generated data"
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
    self._check_split(name)
    per, split_id = self._per[name], SPLITS.index(name)
    labels = np.repeat(np.arange(self.num_classes), per)
    return Split(labels, lambda i: self._make(split_id, i // per, i % per),
                 lambda i: f"synthetic {name}[{i}]", name)


def make_source(data) -> Source:
  """The source that the data settings (`config.DataSettings`) describe.

  ``data.source``: 'idx' (``root``), 'folder' (``root``), 'tfds' (``name``,
  ``data_dir``, ``tfds_split_mode``, ``tfds_split_seed``) or 'synthetic'
  (``synthetic.{num_classes, train_per_class, test_per_class, seed}``,
  ``image_size``).
  """
  kind = data.source
  if kind in ("idx", "folder") and not data.root:
    raise DataError(f"data.root is empty; set --config.data.root to the "
                    f"{'IDX files' if kind == 'idx' else 'image folders'}")
  if kind == "idx":
    names = FASHION_MNIST_CLASSES if data.name == "fashion_mnist" else None
    return IdxSource(data.root, names)
  if kind == "folder":
    return ImageFolderSource(data.root)
  if kind == "tfds":
    return TfdsSource(data.name, data.data_dir or None, data.tfds_split_mode,
                      data.tfds_split_seed)
  if kind == "synthetic":
    s = data.synthetic
    return SyntheticSource(s.num_classes, s.train_per_class, s.test_per_class,
                           data.image_size, s.seed)
  raise DataError(f"unknown data.source {kind!r}; use idx, folder, tfds or "
                  "synthetic")
