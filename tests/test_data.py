"""The data package: class order, task split, sources, transforms, loader."""

import gzip
import io
import json
import os
import struct
import threading

import numpy as np
import pytest
from PIL import Image

from slora_jax.runner.data import loader
from slora_jax.runner.data import sources
from slora_jax.runner.data import tasks
from slora_jax.runner.data import transforms
from slora_jax.runner.data.sources import DataError

HERE = os.path.dirname(os.path.abspath(__file__))
FMNIST = "/usr/share/datasets/fashion-mnist"
ORDER_SIZES = {"imagenetr": 200, "imageneta": 200, "cifar100": 100,
               "domainnet": 345}


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _write(path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


# ------------------------------------------------------------ class order

def _fixture_orders():
  with open(os.path.join(HERE, "data", "class_orders.json")) as f:
    orders = json.load(f)["orders"]
  out = []
  for key, order in orders.items():
    dataset, rest = key.split("_seed")
    out.append((key, ORDER_SIZES[dataset], int(rest.split("_")[0]), order))
  return out


@pytest.mark.parametrize("key,n,seed,order", _fixture_orders(),
                         ids=[o[0] for o in _fixture_orders()])
def test_class_order_matches_reference(key, n, seed, order):
  del key
  assert tasks.class_order(n, seed).tolist() == order
  # The reference's own call, with numpy's global state restored afterwards.
  state = np.random.get_state()
  try:
    np.random.seed(seed)
    assert np.random.permutation(n).tolist() == order
  finally:
    np.random.set_state(state)


def test_class_order_first_entries_from_spec():
  assert tasks.class_order(200, 1995)[:10].tolist() == [
      146, 198, 169, 126, 142, 183, 108, 86, 79, 35]
  assert tasks.class_order(100, 1993)[:6].tolist() == [68, 56, 78, 8, 23, 84]
  assert tasks.class_order(345, 1993)[:4].tolist() == [214, 80, 343, 268]
  assert tasks.class_order(7, 3, shuffle=False).tolist() == list(range(7))


@pytest.mark.parametrize("n,init,inc,expected", [
    (100, 10, 10, [10] * 10),
    (200, 20, 20, [20] * 10),
    (345, 69, 69, [69] * 5),
    (10, 4, 3, [4, 3, 3]),
    (10, 4, 4, [4, 4, 2]),     # remainder becomes a last task
    (11, 5, 2, [5, 2, 2, 2]),
    (7, 7, 3, [7]),
    (12, 2, 5, [2, 5, 5]),
])
def test_task_sizes(n, init, inc, expected):
  sizes = tasks.task_sizes(n, init, inc)
  assert sizes == expected and sum(sizes) == n


def test_task_sizes_errors_and_ranges():
  with pytest.raises(ValueError):
    tasks.task_sizes(10, 0, 2)
  with pytest.raises(ValueError):
    tasks.task_sizes(10, 11, 2)
  assert tasks.task_ranges([4, 4, 2]) == [(0, 4), (4, 8), (8, 10)]


def test_remap_labels_is_order_index():
  order = tasks.class_order(20, 5)
  labels = np.random.default_rng(0).integers(0, 20, 100)
  expected = [order.tolist().index(y) for y in labels]
  assert tasks.remap_labels(labels, order).tolist() == expected
  # Classes left out of the order map to -1.
  assert tasks.remap_labels([3, 9, 1], [1, 3]).tolist() == [1, -1, 0]


# ------------------------------------------------------------ IDX files

def _idx_bytes(array: np.ndarray) -> bytes:
  head = struct.pack(">HBB", 0, 0x08, array.ndim)
  head += struct.pack(f">{array.ndim}I", *array.shape)
  return head + array.astype(np.uint8).tobytes()


def _write_idx(folder, gz, n_train=12, n_test=5, size=(6, 5), classes=4):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(1)
  data = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n,) + size).astype(np.uint8)
    labels = (np.arange(n) % classes).astype(np.uint8)
    data[prefix] = (images, labels)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
      path = os.path.join(folder, f"{prefix}-{kind}-ubyte")
      raw = _idx_bytes(arr)
      if gz:
        with gzip.open(path + ".gz", "wb") as f:
          f.write(raw)
      else:
        with open(path, "wb") as f:
          f.write(raw)
  return data


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_source_parses_files(tmp_path, gz):
  data = _write_idx(str(tmp_path), gz)
  src = sources.IdxSource(str(tmp_path))
  assert src.num_classes == 4 and src.class_names == ["0", "1", "2", "3"]
  train, test = src.split("train"), src.split("test")
  assert len(train) == 12 and len(test) == 5
  np.testing.assert_array_equal(train.labels, data["train"][1])
  img = test.read(3)
  assert img.shape == (6, 5, 3) and img.dtype == np.uint8
  for c in range(3):  # grayscale repeated to three channels
    np.testing.assert_array_equal(img[:, :, c], data["t10k"][0][3])
  assert "t10k-images" in test.describe(3)
  with pytest.raises(IndexError):
    train.read(12)


def test_idx_source_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    sources.IdxSource(str(tmp_path / "nowhere"))
  folder = str(tmp_path / "idx")
  _write_idx(folder, gz=False)
  os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte"))
  with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
    sources.IdxSource(folder)
  _write_idx(folder, gz=False)
  path = os.path.join(folder, "train-labels-idx1-ubyte")
  raw = bytearray(_read(path))
  raw[3] = 3                                   # claims 3 dimensions
  _write(path, bytes(raw))
  with pytest.raises(DataError, match="not a 1-D uint8 IDX file"):
    sources.IdxSource(folder)
  _write_idx(folder, gz=False)
  path = os.path.join(folder, "train-images-idx3-ubyte")
  _write(path, _read(path) + b"extra")
  src = sources.IdxSource(folder)              # headers are fine
  with pytest.raises(DataError, match="expected 360 data bytes"):
    src.split("train")


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="no Fashion-MNIST files")
def test_real_fashion_mnist():
  src = sources.IdxSource(FMNIST, sources.FASHION_MNIST_CLASSES)
  train, test = src.split("train"), src.split("test")
  assert (len(train), len(test), src.num_classes) == (60000, 10000, 10)
  assert np.bincount(train.labels).tolist() == [6000] * 10
  assert np.bincount(test.labels).tolist() == [1000] * 10
  img = train.read(0)
  assert img.shape == (28, 28, 3) and img.dtype == np.uint8 and img.max() > 0
  assert src.class_names[9] == "Ankle boot"


# ---------------------------------------------------------- image folders

def _save(path, size=(9, 7), color=(200, 30, 60), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path, format=fmt)


def _make_folders(root, classes=("zebra", "ant", "moth"), per=(3, 2)):
  for split, n in zip(("train", "test"), per):
    for ci, cls in enumerate(classes):
      for k in range(n):
        ext = ".png" if k % 2 else ".JPG"
        _save(os.path.join(root, split, cls, f"img{k}{ext}"),
              color=(10 * ci, 20 * k, 90))
  return root


def test_image_folder_source_sorted_classes_and_files(tmp_path):
  root = _make_folders(str(tmp_path / "ds"))
  # torchvision's ImageFolder also finds images in sub-folders and skips
  # other files.
  _save(os.path.join(root, "train", "ant", "sub", "deep.png"))
  _write(os.path.join(root, "train", "ant", "notes.txt"), b"x")
  src = sources.ImageFolderSource(root)
  assert src.class_names == ["ant", "moth", "zebra"] and src.num_classes == 3
  train, test = src.split("train"), src.split("test")
  assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
  names = [os.path.relpath(train.describe(i), root) for i in range(4)]
  assert names == ["train/ant/img0.JPG", "train/ant/img1.png",
                   "train/ant/img2.JPG", "train/ant/sub/deep.png"]
  img = train.read(1)
  assert img.shape == (7, 9, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[0, 0], [10, 20, 90])  # ant: ci=1, k=1


def test_image_folder_converts_gray_and_palette(tmp_path):
  root = _make_folders(str(tmp_path / "ds"), classes=("a",), per=(1, 1))
  Image.new("L", (4, 3), 77).save(os.path.join(root, "train", "a", "g.png"))
  pal = Image.new("P", (4, 3), 1)
  pal.putpalette([0, 0, 0, 250, 10, 20] + [0] * 762)
  pal.save(os.path.join(root, "train", "a", "p.png"), transparency=b"\x00\xff")
  train = sources.ImageFolderSource(root).split("train")
  files = [os.path.basename(train.describe(i)) for i in range(len(train))]
  gray = train.read(files.index("g.png"))
  assert gray.shape == (3, 4, 3) and (gray == 77).all()
  np.testing.assert_array_equal(train.read(files.index("p.png"))[0, 0],
                                [250, 10, 20])


def test_image_folder_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    sources.ImageFolderSource(str(tmp_path / "missing"))
  empty = tmp_path / "empty"
  (empty / "train").mkdir(parents=True)
  (empty / "test").mkdir()
  with pytest.raises(DataError, match="no class folders"):
    sources.ImageFolderSource(str(empty))

  root = _make_folders(str(tmp_path / "no_test"))
  for f in os.listdir(os.path.join(root, "test")):
    os.rename(os.path.join(root, "test", f), os.path.join(root, f))
  os.rmdir(os.path.join(root, "test"))
  src = sources.ImageFolderSource(root)        # train/ alone can be read
  assert len(src.split("train")) == 9
  with pytest.raises(DataError, match="no test/ folder"):
    src.split("test")

  root = _make_folders(str(tmp_path / "mismatch"))
  os.rename(os.path.join(root, "test", "moth"), os.path.join(root, "test", "bee"))
  with pytest.raises(DataError, match=r"missing \['moth'\], extra \['bee'\]"):
    sources.ImageFolderSource(root)

  root = _make_folders(str(tmp_path / "empty_class"))
  os.makedirs(os.path.join(root, "test", "ant_empty"))
  os.makedirs(os.path.join(root, "train", "ant_empty"))
  _write(os.path.join(root, "train", "ant_empty", "readme.txt"), b"x")
  with pytest.raises(DataError) as e:
    sources.ImageFolderSource(root)
  msg = str(e.value)
  assert os.path.join("train", "ant_empty") in msg and "no images" in msg
  assert "\n" not in msg


def test_truncated_jpeg_names_the_file(tmp_path):
  root = _make_folders(str(tmp_path / "ds"), classes=("a", "b"))
  bad = os.path.join(root, "train", "b", "broken.jpg")
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
  _write(bad, buf.getvalue()[:400])
  garbage = os.path.join(root, "train", "b", "garbage.png")
  _write(garbage, b"not an image at all")
  train = sources.ImageFolderSource(root).split("train")  # listing is lazy-safe
  paths = [train.describe(i) for i in range(len(train))]
  for path in (bad, garbage):
    with pytest.raises(DataError) as e:
      train.read(paths.index(path))
    assert path in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------- TFDS

def test_tfds_not_prepared_is_a_clear_error_and_downloads_nothing(tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(DataError) as e:
    sources.TfdsSource("cifar100", str(data_dir))
  msg = str(e.value)
  assert "not prepared" in msg and "never downloads" in msg
  assert "tfds build cifar100" in msg and "\n" not in msg
  assert not data_dir.exists() or not any(data_dir.rglob("*"))
  with pytest.raises(DataError, match="TFDS cannot open 'no_such_dataset_x'"):
    sources.TfdsSource("no_such_dataset_x", str(data_dir))
  with pytest.raises(DataError, match="tfds_split_mode"):
    sources.TfdsSource("cifar100", str(data_dir), split_mode="90_10")


def _write_tfds_fixture(data_dir, name, splits, label_names):
  """A prepared array_record TFDS data set, written without TensorFlow.

  ``splits``: {split: [(uint8 image, label), ...]}.
  """
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(names=label_names)})
  folder = os.path.join(data_dir, name, "1.0.0")
  os.makedirs(folder)
  features.save_config(folder)
  info = {"name": name, "version": "1.0.0", "fileFormat": "array_record",
          "splits": []}
  for split, examples in splits.items():
    path = os.path.join(folder, f"{name}-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for image, label in examples:
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")
      png.seek(0)
      writer.write(features.serialize_example({"image": png, "label": label}))
    writer.close()
    info["splits"].append({
        "name": split, "shardLengths": [str(len(examples))],
        "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"})
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    json.dump(info, f)


def _examples(labels, seed):
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 256, (5 + i % 3, 6, 3), dtype=np.uint8), int(y))
          for i, y in enumerate(labels)]


def test_tfds_source_reads_prepared_data_and_renumbers_labels(tmp_path):
  names = [f"n0{i}" for i in range(6)]
  train = _examples([1, 3, 4, 3, 1, 4, 4], 0)     # 3 of the 6 label ids used
  test = _examples([4, 1, 3], 1)
  _write_tfds_fixture(str(tmp_path), "slora_tiny_fixture",
                      {"train": train, "test": test}, names)
  src = sources.TfdsSource("slora_tiny_fixture", str(tmp_path))
  assert src.num_classes == 3 and src.class_names == ["n01", "n03", "n04"]
  tr, te = src.split("train"), src.split("test")
  assert tr.labels.tolist() == [0, 1, 2, 1, 0, 2, 2]
  assert te.labels.tolist() == [2, 0, 1]
  for i in (0, 5):
    np.testing.assert_array_equal(tr.read(i), train[i][0])
  assert "slora_tiny_fixture" in te.describe(2)


def test_tfds_test_only_builder_split_modes(tmp_path):
  labels = [c for c in range(3) for _ in range(10)]
  _write_tfds_fixture(str(tmp_path), "slora_test_only_fixture",
                      {"test": _examples(labels, 2)}, ["a", "b", "c"])
  with pytest.raises(DataError, match="no train split.*source=folder"):
    sources.TfdsSource("slora_test_only_fixture", str(tmp_path))
  src = sources.TfdsSource("slora_test_only_fixture", str(tmp_path),
                           split_mode="test_80_20", split_seed=3)
  tr, te = src.split("train"), src.split("test")
  assert np.bincount(tr.labels).tolist() == [8, 8, 8]
  assert np.bincount(te.labels).tolist() == [2, 2, 2]
  where = {tr.describe(i) for i in range(len(tr))}
  where_test = {te.describe(i) for i in range(len(te))}
  assert not where & where_test and len(where | where_test) == 30
  again = sources.TfdsSource("slora_test_only_fixture", str(tmp_path),
                             split_mode="test_80_20", split_seed=3)
  assert [again.split("test").describe(i) for i in range(6)] == [
      te.describe(i) for i in range(6)]


# -------------------------------------------------------------- synthetic

def test_synthetic_source_is_deterministic_and_class_dependent():
  a = sources.SyntheticSource(4, 3, 2, 16, seed=5)
  b = sources.SyntheticSource(4, 3, 2, 16, seed=5)
  tr = a.split("train")
  assert len(tr) == 12 and tr.labels.tolist() == [c for c in range(4)
                                                  for _ in range(3)]
  np.testing.assert_array_equal(tr.read(7), b.split("train").read(7))
  img = tr.read(0)
  assert img.shape == (16, 16, 3) and img.dtype == np.uint8
  assert not np.array_equal(tr.read(0), tr.read(1))    # per-sample variation
  assert not np.array_equal(tr.read(0), a.split("test").read(0))
  # Nearest class mean (of the other samples) recovers the class.
  means = np.stack([np.mean([tr.read(3 * c + k).astype(float)
                             for k in range(3)], 0) for c in range(4)])
  te = a.split("test")
  pred = [np.argmin(((means - te.read(i)) ** 2).sum((1, 2, 3)))
          for i in range(len(te))]
  assert np.mean(np.array(pred) == te.labels) >= 0.75


def test_make_source_dispatch_and_errors(tmp_path):
  import ml_collections
  d = ml_collections.ConfigDict(dict(
      source="synthetic", image_size=8,
      synthetic=dict(num_classes=3, train_per_class=2, test_per_class=1, seed=0)))
  assert isinstance(sources.make_source(d), sources.SyntheticSource)
  d.source = "folder"
  d.root = ""
  with pytest.raises(DataError, match="data.root is empty"):
    sources.make_source(d)
  d.source = "lmdb"
  with pytest.raises(DataError, match="unknown data.source 'lmdb'"):
    sources.make_source(d)
  _write_idx(str(tmp_path), gz=True, classes=10, n_train=20)
  d = ml_collections.ConfigDict(dict(source="idx", root=str(tmp_path),
                                     name="fashion_mnist"))
  src = sources.make_source(d)
  assert src.class_names[0] == "T-shirt/top"
  sources.validate(src, 10)
  with pytest.raises(DataError, match="has 10 classes but the config needs 12"):
    sources.validate(src, 12)


# ------------------------------------------------------------- transforms

def _image(w, h, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("w,h,size", [(28, 28, 32), (300, 200, 24), (17, 40, 8)])
def test_train_transform_shape_range_determinism(w, h, size):
  t = transforms.TrainTransform(size)
  img = _image(w, h)
  out = t(img, transforms.sample_rng(1, 0, 0, 5))
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_array_equal(out, t(img, transforms.sample_rng(1, 0, 0, 5)))
  others = [t(img, transforms.sample_rng(1, 0, e, 5)) for e in range(1, 4)]
  assert any(not np.array_equal(out, o) for o in others)


def test_train_transform_is_crop_resize_flip_of_sampled_box():
  t = transforms.TrainTransform(20)
  img = _image(60, 45, seed=3)
  flips = 0
  for k in range(40):
    out = t(img, transforms.sample_rng(0, 1, 2, k))
    rng = transforms.sample_rng(0, 1, 2, k)
    left, top, w, h = t.crop_box(60, 45, rng)
    assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 45
    assert 0.05 * 60 * 45 * 0.85 <= w * h <= 60 * 45
    ref = Image.fromarray(img).crop((left, top, left + w, top + h)).resize(
        (20, 20), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
      ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      flips += 1
    np.testing.assert_array_equal(out, np.asarray(ref, np.float32) / 255)
  assert 8 <= flips <= 32


def test_crop_box_falls_back_to_center_crop():
  t = transforms.TrainTransform(8, scale=(0.9, 1.0))
  rng = np.random.default_rng(0)
  assert t.crop_box(100, 10, rng) == (43, 0, 13, 10)    # too wide: h = 10
  assert t.crop_box(10, 100, rng) == (0, 43, 10, 13)    # too tall: w = 10


def test_eval_transform_matches_independent_pil_geometry():
  t = transforms.EvalTransform(224, 256)
  img = _image(300, 200, seed=4)
  # Short side 200 -> 256, long side int(256 * 300 / 200) = 384; crop 224 at
  # left round((384 - 224) / 2) = 80, top round((256 - 224) / 2) = 16.
  ref = Image.fromarray(img).resize((384, 256), Image.Resampling.BICUBIC)
  ref = np.asarray(ref.crop((80, 16, 304, 240)), np.float32) / 255
  out = t(img)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out, ref)
  # Odd sizes: 199 x 255 (w x h) -> 256 x int(256 * 255 / 199) = 256 x 328.
  img = _image(199, 255, seed=5)
  ref = Image.fromarray(img).resize((256, 328), Image.Resampling.BICUBIC)
  ref = np.asarray(ref.crop((16, 52, 240, 276)), np.float32) / 255
  np.testing.assert_array_equal(t(img), ref)
  # FMNIST-sized input upscaled: 28 -> 32, crop 32 = the whole image.
  small = transforms.EvalTransform(32, 32)(_image(28, 28))
  ref = Image.fromarray(_image(28, 28)).resize((32, 32), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(small, np.asarray(ref, np.float32) / 255)


def test_normalizations():
  img = _image(10, 10)
  base = transforms.EvalTransform(10)(img)
  inc = transforms.EvalTransform(10, normalize="inception")(img)
  np.testing.assert_allclose(inc, (base - 0.5) / 0.5, rtol=1e-6)
  net = transforms.EvalTransform(10, normalize="imagenet")(img)
  np.testing.assert_allclose(net[..., 1], (base[..., 1] - 0.456) / 0.224,
                             rtol=1e-5)
  with pytest.raises(ValueError):
    transforms.TrainTransform(10, normalize="zscore")
  with pytest.raises(ValueError):
    transforms.EvalTransform(32, 16)


def test_rng_streams_are_distinct():
  e = transforms.epoch_rng(1, 2, 3).integers(0, 2**31, 4)
  s0 = transforms.sample_rng(1, 2, 3, 0).integers(0, 2**31, 4)
  s1 = transforms.sample_rng(1, 2, 3, 1).integers(0, 2**31, 4)
  assert not np.array_equal(e, s0) and not np.array_equal(s0, s1)


# ----------------------------------------------------------------- loader

class _NumberedSplit(sources.Split):
  """Sample i is an 8x8 image whose pixels encode i (for bookkeeping)."""

  def __init__(self, n, fail_at=None):
    def read(i):
      if i == fail_at:
        raise DataError(f"sample{i}.jpg: unreadable or truncated image")
      img = np.zeros((8, 8, 3), np.uint8)
      img[..., 0] = i
      return img
    super().__init__(np.arange(n) % 3, read, name="train")


def _ident(img, rng):
  del rng
  return img.astype(np.float32)


def _ids(batch):
  return np.where(batch["mask"] > 0, batch["image"][:, 0, 0, 0], -1).astype(int)


def _collect(it):
  with it:
    return list(it)


def test_train_batches_pad_mask_and_epochs():
  split = _NumberedSplit(10)
  idx = np.arange(10)
  labels = np.arange(10) * 7
  batches = _collect(loader.train_batches(
      split, idx, labels, 4, _ident, (8, 8, 3), seed=0, task=1,
      num_steps=6, num_workers=2))
  assert len(batches) == 6                              # 2 epochs of 3 steps
  for b in batches:
    assert b["image"].shape == (4, 8, 8, 3) and b["label"].dtype == np.int32
  assert batches[2]["mask"].tolist() == [1, 1, 0, 0]
  assert (batches[2]["image"][2:] == 0).all()
  assert batches[2]["label"][2:].tolist() == [0, 0]
  for epoch in (batches[:3], batches[3:]):
    ids = np.concatenate([_ids(b) for b in epoch])
    assert sorted(ids[ids >= 0].tolist()) == list(range(10))
    for b in epoch:
      valid = b["mask"] > 0
      assert (b["label"][valid] == labels[_ids(b)[valid]]).all()
  order0 = np.concatenate([_ids(b) for b in batches[:3]])
  order1 = np.concatenate([_ids(b) for b in batches[3:]])
  assert not np.array_equal(order0, order1)             # reshuffled
  np.testing.assert_array_equal(                        # the documented order
      order0[order0 >= 0], loader.epoch_order(10, 0, 1, 0))


def test_train_batches_subset_of_split_and_no_shuffle():
  split = _NumberedSplit(10)
  batches = _collect(loader.train_batches(
      split, [7, 2, 5], split.labels, 2, _ident, (8, 8, 3), seed=0, task=0,
      num_steps=4, shuffle=False))
  assert [_ids(b).tolist() for b in batches] == [[7, 2], [5, -1]] * 2


def test_resume_gives_identical_batches_with_augmentation():
  split = sources.SyntheticSource(3, 5, 1, 12, seed=1).split("train")
  t = transforms.TrainTransform(10)
  args = (split, np.arange(15), split.labels, 4, t)
  kw = dict(seed=3, task=2, num_steps=11)
  full = _collect(loader.train_batches(*args, **kw, num_workers=3))
  resumed = _collect(loader.train_batches(*args, **kw, start_step=6,
                                          num_workers=1, prefetch=1))
  assert len(full) == 11 and len(resumed) == 5
  for a, b in zip(full[6:], resumed):
    for k in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[k], b[k])


def test_process_slices_union_is_the_global_batch():
  split = sources.SyntheticSource(3, 5, 1, 12, seed=1).split("train")
  t = transforms.TrainTransform(10)
  args = (split, np.arange(15), split.labels, 6, t)
  kw = dict(seed=3, task=0, num_steps=5)
  whole = _collect(loader.train_batches(*args, **kw))
  parts = [_collect(loader.train_batches(*args, **kw, process_index=p,
                                         process_count=3)) for p in range(3)]
  for s, b in enumerate(whole):
    for k in ("image", "label", "mask"):
      joined = np.concatenate([parts[p][s][k] for p in range(3)])
      np.testing.assert_array_equal(joined, b[k])
  assert parts[0][0]["image"].shape == (2, 10, 10, 3)
  with pytest.raises(DataError, match="not divisible by the 4 processes"):
    loader.train_batches(*args, **kw, process_index=0, process_count=4)


def test_eval_batches_in_order_padded_and_sliced():
  split = _NumberedSplit(10)
  idx = np.array([9, 0, 4, 5, 1])
  batches = _collect(loader.eval_batches(split, idx, split.labels, 2, _ident,
                                         (8, 8, 3)))
  assert [_ids(b).tolist() for b in batches] == [[9, 0], [4, 5], [1, -1]]
  p1 = _collect(loader.eval_batches(split, idx, split.labels, 2, _ident,
                                    (8, 8, 3), process_index=1, process_count=2))
  assert [_ids(b).tolist() for b in p1] == [[0], [5], [-1]]
  assert _collect(loader.eval_batches(split, [], split.labels, 2, _ident,
                                      (8, 8, 3))) == []


def _loader_threads():
  return [t for t in threading.enumerate() if t.name.startswith("slora-")]


def test_errors_propagate_and_threads_stop():
  split = _NumberedSplit(10, fail_at=4)
  it = loader.eval_batches(split, np.arange(10), split.labels, 2, _ident,
                           (8, 8, 3))
  with pytest.raises(DataError, match="sample4.jpg"):
    with it:
      list(it)
  it = loader.train_batches(_NumberedSplit(50), np.arange(50),
                            np.zeros(50, int), 2, _ident, (8, 8, 3), seed=0,
                            task=0, num_steps=100, prefetch=3)
  with it:
    next(it)                                  # leave early: prefetch is full
  it.close()
  assert not _loader_threads()
  rate = loader.measure_throughput(loader.train_batches(
      _NumberedSplit(20), np.arange(20), np.zeros(20, int), 4, _ident,
      (8, 8, 3), seed=0, task=0, num_steps=5), 3)
  assert rate > 0 and not _loader_threads()
