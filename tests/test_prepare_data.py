"""experiments.prepare_data and the data manifest: fake archives with the real
layouts (a few tiny images per class), the folders and MANIFEST.json built
from them, the shipped ImageNet-R lists, the known-counts warning of a run."""

import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from cli_util import ROOT, SEED_DIR, cli_env, run_cli, tail
from experiments import prepare_data
from slora_jax.runner import paths
from slora_jax.runner.data import manifest as manifest_lib
from slora_jax.runner.data.sources import ImageFolderSource, SyntheticSource

WNIDS = ("n01443537", "n01484850", "n01494475", "n01498041", "n01514859",
         "n01531178")


def _jpeg(seed: int) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 11 % 256, 7)).save(
      buf, "JPEG")
  return buf.getvalue()


def _tar(path, files: dict) -> str:
  with tarfile.open(path, "w:gz" if str(path).endswith("gz") else "w") as t:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      t.addfile(info, io.BytesIO(data))
  return str(path)


def _layout(out) -> set:
  return {os.path.relpath(os.path.join(r, n), out).replace(os.sep, "/")
          for r, _, names in os.walk(out) for n in names} - {"MANIFEST.json"}


def _expected_sha(out, rel) -> str:
  lines = sorted(f"{r}\t{os.path.getsize(os.path.join(out, r))}\n" for r in rel)
  return hashlib.sha256("".join(lines).encode()).hexdigest()


def _yaml(split_of: dict, prefix="data/imagenet-r/") -> tuple[str, str]:
  texts = []
  for split in ("train", "test"):
    keys = [k for k, s in split_of.items() if s == split]
    texts.append(prepare_data.render_split_yaml(
        [prefix + k for k in keys], [WNIDS.index(k.split("/")[0]) for k in keys]))
  return tuple(texts)


# --- ImageNet-R -----------------------------------------------------------------

def test_shipped_imagenet_r_lists_are_coda_prompts_byte_for_byte():
  counts = manifest_lib.known_counts()["imagenet_r"]
  per_class = {}
  seen = {}
  for split, blob in (("train", "a039907f411700078d505572df4df09ab6e2d669"),
                      ("test", "23c3881c77e253ff492bf97a2b8ed0b0a966adad")):
    text, sha = prepare_data.shipped_imagenet_r_yaml(split)
    # The ids GitHub gives CODA-Prompt's (= InfLoRA's, mammoth's) files.
    assert prepare_data.git_blob_sha1(text.encode()) == blob
    assert hashlib.sha256(text.encode()).hexdigest() == sha
    data, _ = prepare_data.read_split_yaml(text, split)
    assert len(data) == counts[split]
    for p in data:
      assert seen.setdefault(p, split) == split        # train, test disjoint
      per_class.setdefault(p.split("/")[2], [0, 0])[split == "test"] += 1
  assert per_class == counts["classes"] and len(per_class) == 200


def _imagenet_r_archive(tmp_path):
  files, split_of = {"imagenet-r/README.txt": b"renditions"}, {}
  for c, wnid in enumerate(WNIDS):
    for k in range(5):
      key = f"{wnid}/{('art', 'sketch')[k % 2]}_{k}.jpg"
      files[f"imagenet-r/{key}"] = _jpeg(10 * c + k)
      split_of[key] = "test" if k == 1 else "train"
  files[f"imagenet-r/{WNIDS[0]}/toy_9.jpg"] = _jpeg(99)   # in no list
  lists = tmp_path / "lists"
  lists.mkdir()
  train, test = _yaml(split_of)
  (lists / "imagenet-r_train.yaml").write_text(train)
  (lists / "imagenet-r_test.yaml").write_text(test)
  return _tar(tmp_path / "imagenet-r.tar", files), str(lists), split_of


def test_imagenet_r_folders_and_manifest_from_the_tarball(tmp_path):
  tar, lists, split_of = _imagenet_r_archive(tmp_path)
  out = tmp_path / "out"
  m = prepare_data.prepare("imagenet_r", [tar], str(out), lists)
  rel = {f"{s}/{k}" for k, s in split_of.items()}
  assert _layout(out) == rel                 # the lists, nothing else
  on_disk = json.loads((out / "MANIFEST.json").read_text())
  assert on_disk == m
  assert (m["num_classes"], m["train"], m["test"]) == (6, 24, 6)
  assert m["classes"] == {w: [4, 1] for w in WNIDS}
  assert m["sha256"] == _expected_sha(out, rel)
  assert m["unlisted_images_left_out"] == 1
  assert m["known_counts"].startswith(
      "the data differs from ImageNet-R's known counts")
  # Reproducible: the same archive gives the same manifest.
  again = prepare_data.prepare("imagenet_r", [tar], str(tmp_path / "b"), lists)
  assert again["sha256"] == m["sha256"]


def test_cli_default_lists_name_the_missing_images(tmp_path):
  first = prepare_data.imagenet_r_lists()["train"][0]
  tar = _tar(tmp_path / "imagenet-r.tar", {f"imagenet-r/{first}": _jpeg(1)})
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "experiments.prepare_data",
                      "imagenet_r", f"--source={tar}", f"--out={out}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
      "error: 29999 of the 30000 images in CODA-Prompt's lists are not in the "
      f"source (first: {prepare_data.imagenet_r_lists()['train'][1]}); give "
      "the complete archive(s)"]
  assert not os.listdir(out)                 # staging removed: rerun works


# --- ImageNet-A, CIFAR-100, CUB-200, DomainNet -----------------------------------

def test_imagenet_a_split_rule_from_a_folder(tmp_path):
  src = tmp_path / "imagenet-a"
  names = [f"{i:04d}.jpg" for i in range(11)]
  for c in WNIDS[:2]:
    (src / c).mkdir(parents=True)
    for n in names:
      (src / c / n).write_bytes(_jpeg(len(n)))
  out = tmp_path / "out"
  m = prepare_data.prepare("imagenet_a", [str(src)], str(out))
  # floor(11/5) = 2 test images per class: the smallest SHA-256 of the name.
  test = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:2]
  assert _layout(out) == {f"{'test' if n in test else 'train'}/{c}/{n}"
                          for c in WNIDS[:2] for n in names}
  assert m["classes"] == {c: [9, 2] for c in WNIDS[:2]}
  assert (src / WNIDS[0] / names[0]).is_file()   # the source is left as it was


def _cifar_archive(tmp_path, names=("apple", "bear", "cloud")):
  rng = np.random.default_rng(0)
  arrays = {}
  files = {"cifar-100-python/meta": pickle.dumps(
      {"fine_label_names": list(names), "coarse_label_names": ["x"]})}
  for split, n in (("train", 6), ("test", 3)):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [i % len(names) for i in range(n)]
    arrays[split] = (data, labels)
    files[f"cifar-100-python/{split}"] = pickle.dumps(
        {"data": data, "fine_labels": labels, "filenames": [b"x"] * n})
  return _tar(tmp_path / "cifar-100-python.tar.gz", files), arrays


def test_cifar100_images_keep_their_pixels_and_labels(tmp_path):
  tar, arrays = _cifar_archive(tmp_path)
  out = tmp_path / "out"
  m = prepare_data.prepare("cifar100", [tar], str(out))
  assert m["classes"] == {n: [2, 1] for n in ("apple", "bear", "cloud")}
  data, labels = arrays["train"]
  path = out / "train" / ("apple", "bear", "cloud")[labels[4]] / "00004.bmp"
  with Image.open(path) as im:
    np.testing.assert_array_equal(
        np.asarray(im), data[4].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar100_reads_the_archives_numpy_core_pickles(tmp_path):
  # The 2009 pickles name numpy.core.multiarray (numpy 2: numpy._core).
  data = np.arange(3072, dtype=np.uint8)[None] % 251
  raw = pickle.dumps({"data": data, "fine_labels": [0]}, protocol=2)
  raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert b"numpy.core.multiarray" in raw
  tar = _tar(tmp_path / "c.tar", {"cifar-100-python/train": raw})
  inputs = prepare_data.Inputs([tar], str(tmp_path / "staging"))
  np.testing.assert_array_equal(
      prepare_data._cifar_pickle(inputs, "train")["data"], data)


def test_cifar100_refuses_a_pickle_that_is_not_arrays(tmp_path):
  tar = _tar(tmp_path / "c.tar", {"cifar-100-python/meta": pickle.dumps(
      {"fine_label_names": [os.getcwd]})})       # a callable: not data
  with pytest.raises(prepare_data.PrepareError, match="not CIFAR-100's pickle"):
    prepare_data.prepare("cifar100", [tar], str(tmp_path / "out"))


def test_cub200_follows_train_test_split_txt(tmp_path):
  top = "CUB_200_2011"
  rel = ["001.Black_footed_Albatross/a_1.jpg", "001.Black_footed_Albatross/a_2.jpg",
         "002.Laysan_Albatross/b_1.jpg", "002.Laysan_Albatross/b_2.jpg"]
  files = {f"{top}/images/{r}": _jpeg(i) for i, r in enumerate(rel)}
  files[f"{top}/images.txt"] = "".join(
      f"{i + 1} {r}\n" for i, r in enumerate(rel)).encode()
  files[f"{top}/train_test_split.txt"] = b"1 1\n2 0\n3 0\n4 1\n"
  files[f"{top}/attributes/certainties.txt"] = b"1 not sure\n"
  out = tmp_path / "out"
  m = prepare_data.prepare("cub200", [_tar(tmp_path / "CUB_200_2011.tgz", files)],
                           str(out))
  assert _layout(out) == {"train/" + rel[0], "test/" + rel[1], "test/" + rel[2],
                          "train/" + rel[3]}
  assert m["known_counts"].startswith("the data differs from CUB-200-2011's")


def test_domainnet_reproduces_the_lists_with_their_label_ids(tmp_path, capsys):
  src = tmp_path / "raw"
  entries = [("clipart", "aircraft_carrier", 0), ("sketch", "aircraft_carrier", 0),
             ("clipart", "The_Eiffel_Tower", 1), ("sketch", "zigzag", 2)]
  split_of = {}
  for i, (domain, cls, t) in enumerate(entries):
    for k in range(2):
      (src / domain / cls).mkdir(parents=True, exist_ok=True)
      name = f"{domain}_{t:03d}_{i}{k}.jpg"
      (src / domain / cls / name).write_bytes(_jpeg(i + k))
      split_of[(f"{domain}/{cls}/{name}", t)] = "test" if k else "train"
  lists = tmp_path / "lists"
  lists.mkdir()
  for split in ("train", "test"):
    keys = [(k, t) for (k, t), s in split_of.items() if s == split]
    (lists / f"domainnet_{split}.yaml").write_text(prepare_data.render_split_yaml(
        [f"data/DomainNet/{k}" for k, _ in keys], [t for _, t in keys]))
  out = tmp_path / "out"
  m = prepare_data.prepare("domainnet", [str(src)], str(out), str(lists))
  assert "is not InfLoRA's list" in capsys.readouterr().err
  folders = ["000.aircraft_carrier", "001.The_Eiffel_Tower", "002.zigzag"]
  assert sorted(m["classes"]) == folders
  src_labels = ImageFolderSource(str(out)).split("train").labels
  assert sorted(set(src_labels.tolist())) == [0, 1, 2]     # = the targets
  assert _layout(out) == {
      f"{s}/{t:03d}.{k.split('/')[1]}/{k.split('/')[0]}/{k.split('/')[2]}"
      for (k, t), s in split_of.items()}


# --- the manifest in runs --------------------------------------------------------

def test_manifest_cache_is_keyed_on_the_listing(tmp_path, monkeypatch):
  tar, lists, _ = _imagenet_r_archive(tmp_path)
  out = tmp_path / "out"
  m = prepare_data.prepare("imagenet_r", [tar], str(out), lists)
  def no_stat(path):
    raise AssertionError(f"stat {path}")
  monkeypatch.setattr(paths, "file_size", no_stat)
  cached = manifest_lib.of_folder(ImageFolderSource(str(out)))
  assert cached == m                          # from MANIFEST.json, no stat
  (out / "train" / WNIDS[1] / "new.jpg").write_bytes(_jpeg(5))
  monkeypatch.undo()
  fresh = manifest_lib.of_folder(ImageFolderSource(str(out)))
  assert fresh["classes"][WNIDS[1]] == [5, 1] and fresh["sha256"] != m["sha256"]
  assert json.loads((out / "MANIFEST.json").read_text())["sha256"] == fresh["sha256"]


def test_known_counts_warning_names_the_classes():
  known = manifest_lib.known_counts()["imagenet_r"]["classes"]
  classes = {c: list(v) for c, v in known.items()}
  m = {"num_classes": 200, "train": 24000, "test": 6000, "classes": classes}
  assert manifest_lib.known_counts_warning(m, "imagenet_r_10") is None
  assert manifest_lib.known_counts_warning(m, "custom") is None
  first, second = sorted(classes)[:2]
  classes[first] = [classes[first][0] - 1, classes[first][1] + 1]
  del classes[second]
  line = manifest_lib.known_counts_warning(
      dict(m, num_classes=199, train=24000 - 1 - known[second][0],
           test=6000 + 1 - known[second][1]), "imagenet_r_5")
  assert "\n" not in line
  assert f"{first} (train {known[first][0] - 1}, test {known[first][1] + 1}; "\
         f"known {known[first][0]}, {known[first][1]})" in line
  assert f"{second} (missing)" in line and "2 classes differ" in line
  assert "199 classes (known 200)" in line


def test_manifest_of_a_source_without_files_counts_its_labels():
  src = SyntheticSource(num_classes=3, train_per_class=4, test_per_class=2)
  m = manifest_lib.of_source(src)
  assert (m["kind"], m["train"], m["test"]) == ("labels", 12, 6)
  assert m["classes"] == {f"pattern_{c}": [4, 2] for c in range(3)}
  lines = sorted(f"{s}/pattern_{c}\t{n}\n" for c in range(3)
                 for s, n in (("train", 4), ("test", 2)))
  assert m["sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()


def test_run_warns_and_records_the_manifest(tmp_path_factory, tmp_path):
  tar, lists, _ = _imagenet_r_archive(tmp_path)
  out = tmp_path / "out"
  m = prepare_data.prepare("imagenet_r", [tar], str(out), lists)
  workdir = tmp_path / "run"
  r = run_cli(cli_env(tmp_path_factory), workdir, "--config.data.source=folder",
              f"--config.data.root={out}", "--config.benchmark=imagenet_r_10")
  assert r.returncode == 0, tail(r)
  warned = [l for l in r.stderr.splitlines() if "known counts" in l]
  differ = len(set(manifest_lib.known_counts()["imagenet_r"]["classes"])
               | set(WNIDS))
  assert len(warned) == 1 and f"{differ} classes differ" in warned[0], tail(r)
  res = json.loads((workdir / SEED_DIR / "results.json").read_text())
  assert res["data_manifest"]["sha256"] == m["sha256"]
  assert res["data_manifest"]["classes"] == m["classes"]
