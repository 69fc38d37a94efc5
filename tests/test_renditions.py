"""Fashion-MNIST-R: deterministic renditions of IDX images, classes and splits."""

import numpy as np
import pytest

from slora_jax.runner.data import sources
from slora_jax.runner.data.sources import renditions
from test_data import _write_idx


@pytest.fixture
def idx_root(tmp_path):
  data = _write_idx(str(tmp_path), gz=True, n_train=40, n_test=20,
                    size=(28, 28), classes=10)
  return str(tmp_path), data


def test_each_style_is_a_pure_function_of_image_split_and_index():
  img = np.zeros((28, 28), np.uint8)
  img[6:22, 9:19] = 200                                  # a garment-ish block
  for style in renditions.STYLES:
    a = renditions.render(img, style, "train", 3)
    assert a.dtype == np.uint8 and a.shape == (28, 28)
    np.testing.assert_array_equal(a, renditions.render(img, style, "train", 3))
  np.testing.assert_array_equal(renditions.render(img, "inverted", "test", 0),
                                255 - img)
  edges = renditions.render(img, "edges", "train", 0).astype(int)
  assert edges[14, 9] > 100 and edges[14, 14] < 20 and edges[2, 2] == 0
  noisy = [renditions.render(img, "blur_noise", "train", k) for k in (0, 1)]
  assert np.any(noisy[0] != noisy[1])                   # per-sample randomness
  with pytest.raises(ValueError, match="unknown style"):
    renditions.render(img, "oil", "train", 0)


def test_styles_are_balanced_and_fixed_per_split():
  s = renditions.style_of("train", 1000, 5)
  assert np.bincount(s).tolist() == [200] * 5
  np.testing.assert_array_equal(s, renditions.style_of("train", 1000, 5))
  assert np.any(s != renditions.style_of("test", 1000, 5))


def test_garment_and_pair_classes_and_skipped_training_images(idx_root):
  root, data = idx_root
  src = sources.RenditionSource(root, ("inverted", "edges"), "garment",
                                skip_train=10)
  assert src.num_classes == 10 and src.class_names[0] == "T-shirt/top"
  train = src.split("train")
  assert len(train) == 30
  np.testing.assert_array_equal(train.labels, data["train"][1][10:])
  style = renditions.style_of("train", 40, 2)[10:]
  first = train.read(0)
  assert first.shape == (28, 28, 3)
  want = renditions.render(data["train"][0][10], ("inverted", "edges")[style[0]],
                           "train", 10)
  np.testing.assert_array_equal(first[:, :, 0], want)
  assert "as inverted" in train.describe(0) or "as edges" in train.describe(0)
  pairs = sources.RenditionSource(root, ("inverted", "edges"), "pair")
  test = pairs.split("test")
  assert pairs.num_classes == 20 and pairs.class_names[1] == "T-shirt/top / edges"
  np.testing.assert_array_equal(
      test.labels, data["t10k"][1] * 2 + renditions.style_of("test", 20, 2))


def test_bad_settings_are_one_line_data_errors(idx_root):
  root, _ = idx_root
  with pytest.raises(sources.DataError, match="unknown or no renditions"):
    sources.RenditionSource(root, ("oil",))
  with pytest.raises(sources.DataError, match="'garment' or 'pair'"):
    sources.RenditionSource(root, classes="styles")
  with pytest.raises(sources.DataError, match="leaves no training image"):
    sources.RenditionSource(root, skip_train=40)
