r"""Builds the paper's image folders from the public archives, and checks them.

  python -m experiments.prepare_data imagenet_r --source=imagenet-r.tar --out=/data/imagenet-r
  python -m experiments.prepare_data imagenet_a --source=imagenet-a.tar --out=/data/imagenet-a
  python -m experiments.prepare_data cifar100 --source=cifar-100-python.tar.gz --out=/data/cifar100
  python -m experiments.prepare_data cub200 --source=CUB_200_2011.tgz --out=/data/cub200
  python -m experiments.prepare_data domainnet --source=/data/domainnet-raw \
      --lists=InfLoRA/dataloaders/splits --out=/data/domainnet

Writes ``OUT/{train,test}/<class>/...`` (what ``data.source=folder`` reads)
and ``OUT/MANIFEST.json`` (`slora_jax.runner.data.manifest`: per-class
counts and a sha256 of the sorted relative paths and sizes, plus the
benchmark, the split rule and how the counts compare with the known ones).
A source is a tar archive (.tar, .tar.gz, .tgz), a zip or a folder holding
the archive's contents; ``--source`` may be repeated (DomainNet's domains).
Nothing is downloaded. The split rules (README, "Preparing the paper's data"):

  imagenet_r  CODA-Prompt's file lists (= InfLoRA's, mammoth's), shipped in
              experiments/assets/splits/imagenet_r_coda.json.gz; --lists=DIR
              with imagenet-r_{train,test}.yaml uses other lists.
  imagenet_a  no public list: in each class, files ordered by the SHA-256 of
              their name; the first floor(n/5) are test, the rest train.
  cifar100    the archive's train/test batches; one BMP per image (a
              byte-for-byte stable format), named by its index in the batch.
  cub200      the archive's train_test_split.txt.
  domainnet   --lists=DIR with InfLoRA's domainnet_{train,test}.yaml; class
              folders '<target>.<class>' keep its label ids in sorted order.

Errors a user can fix print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import zipfile

from absl import flags

from experiments import tool
from slora_jax.runner.data import manifest as manifest_lib
from slora_jax.runner.data.sources.core import (DOMAINNET_DOMAINS,
                                               IMAGE_EXTENSIONS, DataError)
from slora_jax.runner.data.sources.folder import ImageFolderSource

BENCHMARKS = ("imagenet_r", "imagenet_a", "cifar100", "cub200", "domainnet")

_SOURCE = flags.DEFINE_multi_string(
    "source", [], "The public archive (tar, tar.gz, zip) or a folder holding "
    "its contents; repeat for several archives.")
_OUT = flags.DEFINE_string("out", None, "The folder to create (new or empty).")
_LISTS = flags.DEFINE_string(
    "lists", None, "Folder with the split's file lists (domainnet: InfLoRA's "
    "domainnet_{train,test}.yaml; imagenet_r: other imagenet-r_*.yaml).")

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                       "splits")
IMAGENET_R_LISTS = os.path.join(_ASSETS, "imagenet_r_coda.json.gz")
# InfLoRA's (and CODA-Prompt's) DomainNet lists, as git names them.
DOMAINNET_GIT_BLOBS = {"train": "bf86d2fb6a4cafaa8dc413bc25998e9ec9728809",
                       "test": "3c5407918567c97203c85b074ccc323ed4643a7e"}

SPLIT_RULES = {
    "imagenet_r": "CODA-Prompt's imagenet-r_{train,test}.yaml file lists",
    "imagenet_a": "per class, files ordered by SHA-256 of the file name; the "
                  "first floor(n/5) test, the rest train",
    "cifar100": "the archive's train and test batches",
    "cub200": "the archive's train_test_split.txt",
    "domainnet": "InfLoRA's domainnet_{train,test}.yaml file lists",
}


class PrepareError(ValueError):
  """A problem with the inputs that the user can fix; one line."""


# --- inputs ------------------------------------------------------------------

class Inputs:
  """The files of the sources, by '/'-joined path inside each source.

  Archives are unpacked into ``staging`` (inside the output folder, so
  placing a file is a rename); folders are linked or copied file by file.
  """

  def __init__(self, sources, staging: str):
    self.files: dict[str, str] = {}   # key -> where the file is now
    self._staged = set()
    for src in sources:
      if not os.path.exists(src):
        raise PrepareError(f"--source {src} does not exist; give the public "
                           "archive or the folder holding its contents")
      if os.path.isdir(src):
        self._add_folder(src)
      else:
        self._unpack(src, staging)

  def _add_folder(self, folder: str) -> None:
    for root, _, names in os.walk(folder, followlinks=True):
      for n in names:
        path = os.path.join(root, n)
        self.files[os.path.relpath(path, folder).replace(os.sep, "/")] = path

  def _unpack(self, archive: str, staging: str) -> None:
    os.makedirs(staging, exist_ok=True)
    try:
      if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
          names = [i.filename for i in z.infolist() if not i.is_dir()]
          z.extractall(staging, names)
      else:
        with tarfile.open(archive, "r:*") as t:
          members = [m for m in t.getmembers() if m.isfile()]
          t.extractall(staging, members, filter="data")
          names = [m.name for m in members]
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
      raise PrepareError(f"{archive}: not a readable tar or zip archive "
                         f"({e}); give the archive as downloaded") from None
    for n in names:
      key = n.removeprefix("./")
      self.files[key] = os.path.join(staging, key)
      self._staged.add(key)

  def read(self, key: str) -> bytes:
    with open(self.files[key], "rb") as f:
      return f.read()

  def place(self, key: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if key in self._staged:
      os.replace(self.files[key], dest)
      return
    try:
      os.link(self.files[key], dest)
    except OSError:  # another filesystem, or no hard links there
      shutil.copyfile(self.files[key], dest)


def _images(inputs: Inputs) -> list[str]:
  return sorted(k for k in inputs.files if k.lower().endswith(IMAGE_EXTENSIONS))


def _strip_top(key: str, top: str) -> str:
  """'imagenet-r/<wnid>/<file>' or '<wnid>/<file>' -> '<wnid>/<file>'."""
  parts = key.split("/")
  return "/".join(parts[1:]) if parts[0] == top else key


# --- file lists ---------------------------------------------------------------

def read_split_yaml(text: str, where: str) -> tuple[list[str], list[int]]:
  """CODA-Prompt's list format: 'data:' then '- path' lines, 'targets:' then
  '- int' lines (read directly: PyYAML takes minutes on DomainNet's)."""
  data, targets, current = [], [], None
  for line in text.splitlines():
    if line in ("data:", "targets:"):
      current = data if line == "data:" else targets
    elif line.startswith("- ") and current is not None:
      current.append(line[2:].strip().strip("'\""))
    elif line.strip():
      raise PrepareError(f"{where}: unexpected line {line[:60]!r}; expected "
                         "CODA-Prompt's 'data:' / 'targets:' lists")
  if not data or len(data) != len(targets):
    raise PrepareError(f"{where}: {len(data)} paths and {len(targets)} "
                       "targets; expected one target per path")
  try:
    return data, [int(t) for t in targets]
  except ValueError:
    raise PrepareError(f"{where}: a target is not an integer") from None


def render_split_yaml(data, targets) -> str:
  """The inverse of `read_split_yaml`, byte for byte CODA-Prompt's files."""
  return ("data:\n" + "".join(f"- {p}\n" for p in data) + "targets:\n"
          + "".join(f"- {t}\n" for t in targets))


def git_blob_sha1(data: bytes) -> str:
  """The id git gives a file's contents (what `git ls-tree` prints)."""
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _read_list_file(folder: str, name: str) -> bytes:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise PrepareError(f"--lists {folder} has no {name}; give the folder "
                       "holding the split's list files")
  with open(path, "rb") as f:
    return f.read()


def imagenet_r_lists(folder: str | None = None):
  """{split: [(key '<wnid>/<file>', split)...]} of the shipped or given lists."""
  if folder is None:
    with gzip.open(IMAGENET_R_LISTS, "rt", encoding="utf-8") as f:
      shipped = json.load(f)
    return {s: shipped[s] for s in ("train", "test")}
  out = {}
  for s in ("train", "test"):
    name = f"imagenet-r_{s}.yaml"
    data, _ = read_split_yaml(_read_list_file(folder, name).decode(), name)
    out[s] = [_strip_top(p.split("imagenet-r/", 1)[-1], "imagenet-r")
              for p in data]
  return out


def shipped_imagenet_r_yaml(split: str) -> tuple[str, str]:
  """(CODA-Prompt's yaml rebuilt from the shipped lists, its sha256 there)."""
  with gzip.open(IMAGENET_R_LISTS, "rt", encoding="utf-8") as f:
    shipped = json.load(f)
  target = {w: i for i, w in enumerate(shipped["classes"])}
  keys = shipped[split]
  text = render_split_yaml([shipped["prefix"] + k for k in keys],
                           [target[k.split("/")[0]] for k in keys])
  return text, shipped["yaml_sha256"][split]


# --- split rules: source key -> 'split/<class>/...' ---------------------------

def _from_lists(lists: dict, have: dict, what: str) -> dict:
  plan, missing = {}, []
  for split, keys in lists.items():
    for key, dest in keys:
      if key in have:
        plan[have[key]] = f"{split}/{dest}"
      else:
        missing.append(key)
  if missing:
    n = sum(len(v) for v in lists.values())
    raise PrepareError(f"{len(missing)} of the {n} images in {what} are not "
                       f"in the source (first: {missing[0]}); give the "
                       "complete archive(s)")
  return plan


def plan_imagenet_r(inputs: Inputs, lists_dir: str | None) -> dict:
  have = {_strip_top(k, "imagenet-r"): k for k in _images(inputs)}
  lists = {s: [(k, k) for k in keys]
           for s, keys in imagenet_r_lists(lists_dir).items()}
  what = f"{lists_dir}'s lists" if lists_dir else "CODA-Prompt's lists"
  return _from_lists(lists, have, what)


def _test_first(name: str) -> str:
  return hashlib.sha256(name.encode("utf-8")).hexdigest()


def plan_imagenet_a(inputs: Inputs, lists_dir: str | None) -> dict:
  del lists_dir  # no public list exists
  by_class: dict[str, list[str]] = {}
  for k in _images(inputs):
    key = _strip_top(k, "imagenet-a")
    if key.count("/") == 1:
      by_class.setdefault(key.split("/")[0], []).append(k)
  plan = {}
  for cls, keys in by_class.items():
    keys = sorted(keys, key=lambda k: _test_first(k.rsplit("/", 1)[1]))
    for i, k in enumerate(keys):
      split = "test" if i < len(keys) // 5 else "train"
      plan[k] = f"{split}/{cls}/{k.rsplit('/', 1)[1]}"
  return plan


def plan_cub200(inputs: Inputs, lists_dir: str | None) -> dict:
  del lists_dir  # the archive has its own split file
  def table(name):
    key = next((k for k in inputs.files if k.split("/")[-1] == name), None)
    if key is None:
      raise PrepareError(f"the source has no {name}; give CUB_200_2011.tgz "
                         "or its unpacked CUB_200_2011/ folder")
    rows = [line.split() for line in inputs.read(key).decode().splitlines()]
    return key[:-len(name)], {r[0]: r[1] for r in rows if len(r) == 2}
  top, images = table("images.txt")
  _, is_train = table("train_test_split.txt")
  lists = {"train": [], "test": []}
  for i, rel in images.items():
    lists["train" if is_train.get(i) == "1" else "test"].append((rel, rel))
  prefix = top + "images/"
  have = {k[len(prefix):]: k for k in _images(inputs) if k.startswith(prefix)}
  return _from_lists(lists, have, "images.txt")


def _domainnet_key(path: str) -> str:
  parts = path.split("/")
  for i, p in enumerate(parts[:-2]):
    if p in DOMAINNET_DOMAINS:
      return "/".join(parts[i:])
  raise PrepareError(f"list path {path!r} names no DomainNet domain "
                     f"({', '.join(DOMAINNET_DOMAINS)})")


def _domainnet_lists(lists_dir: str) -> dict:
  lists, target_of = {}, {}
  for split in ("train", "test"):
    name = f"domainnet_{split}.yaml"
    raw = _read_list_file(lists_dir, name)
    if git_blob_sha1(raw) != DOMAINNET_GIT_BLOBS[split]:
      print(f"warning: {os.path.join(lists_dir, name)} is not InfLoRA's list "
            f"(git blob {DOMAINNET_GIT_BLOBS[split][:12]}); building the "
            "split it gives", file=sys.stderr)
    data, targets = read_split_yaml(raw.decode("utf-8"), name)
    lists[split] = []
    for path, t in zip(data, targets):
      key = _domainnet_key(path)
      domain, cls, rest = key.split("/", 2)
      if target_of.setdefault(cls, t) != t:
        raise PrepareError(f"{name}: class {cls!r} has targets "
                           f"{target_of[cls]} and {t}; one class, one target")
      lists[split].append((key, f"{t:03d}.{cls}/{domain}/{rest}"))
  return lists


def plan_domainnet(inputs: Inputs, lists_dir: str | None) -> dict:
  if not lists_dir:
    raise PrepareError("domainnet needs --lists=DIR holding InfLoRA's "
                       "domainnet_train.yaml and domainnet_test.yaml "
                       "(github.com/liangyanshuo/InfLoRA, dataloaders/splits)")
  have = {}
  for k in _images(inputs):
    parts = k.split("/")
    hit = [i for i, p in enumerate(parts[:-2]) if p in DOMAINNET_DOMAINS]
    if hit:
      have["/".join(parts[hit[0]:])] = k
  return _from_lists(_domainnet_lists(lists_dir), have, "InfLoRA's lists")


# --- CIFAR-100: pickled arrays -> one BMP per image ---------------------------

class _ArraysOnly(pickle.Unpickler):
  """Unpickles CIFAR's dicts of numpy arrays and nothing else."""
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),  # the archive's name
              ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"),
              ("_codecs", "encode")}   # bytes in protocol-2 pickles

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
    return super().find_class(module, name)


def _cifar_pickle(inputs: Inputs, name: str) -> dict:
  key = next((k for k in inputs.files if k.split("/")[-1] == name), None)
  if key is None:
    raise PrepareError(f"the source has no {name}; give "
                       "cifar-100-python.tar.gz or its unpacked folder")
  try:
    return _ArraysOnly(io.BytesIO(inputs.read(key)), encoding="latin1").load()
  except (pickle.UnpicklingError, EOFError, ValueError) as e:
    raise PrepareError(f"{key}: not CIFAR-100's pickle ({e})") from None


def write_cifar100(inputs: Inputs, out: str) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  names = list(_cifar_pickle(inputs, "meta")["fine_label_names"])
  # Folders sort as the label ids (ImageFolder's order); CIFAR-100's names
  # already do, prefixes keep it so for any other list.
  folders = names if names == sorted(names) else [
      f"{i:03d}.{n}" for i, n in enumerate(names)]
  for split in ("train", "test"):
    d = _cifar_pickle(inputs, split)
    images = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32)
    for i, (x, y) in enumerate(zip(images, d["fine_labels"])):
      folder = os.path.join(out, split, folders[y])
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(x.transpose(1, 2, 0)).save(
          os.path.join(folder, f"{i:05d}.bmp"))


# --- the command --------------------------------------------------------------

PLANS = {"imagenet_r": plan_imagenet_r, "imagenet_a": plan_imagenet_a,
         "cub200": plan_cub200, "domainnet": plan_domainnet}


def _check_out(out: str) -> None:
  if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
    raise PrepareError(f"--out {out} is not a new or empty folder; choose "
                       "another (nothing is overwritten)")


def _manifest(benchmark: str, out: str, sources, lists_dir, unlisted) -> dict:
  source = ImageFolderSource(out)
  manifest = manifest_lib.of_folder(source, write_cache=False)
  warning = manifest_lib.known_counts_warning(manifest, benchmark)
  return {**manifest, "benchmark": benchmark,
          "split_rule": SPLIT_RULES[benchmark],
          "sources": [os.path.basename(os.path.normpath(s)) for s in sources],
          "lists": lists_dir, "unlisted_images_left_out": unlisted,
          "known_counts": warning or "match the known counts"}


def _build(benchmark: str, inputs: Inputs, out: str, lists_dir) -> int:
  """Writes the split folders; returns how many images no list named."""
  if benchmark == "cifar100":
    write_cifar100(inputs, out)
    return 0
  plan = PLANS[benchmark](inputs, lists_dir)
  for key, dest in sorted(plan.items()):
    inputs.place(key, os.path.join(out, *dest.split("/")))
  return len(_images(inputs)) - len(plan)


def prepare(benchmark: str, sources, out: str,
            lists_dir: str | None = None) -> dict:
  """Builds ``out`` from ``sources``; returns the manifest it wrote."""
  if benchmark not in BENCHMARKS:
    raise PrepareError(f"unknown benchmark {benchmark!r}; use one of "
                       f"{', '.join(BENCHMARKS)}")
  if not sources:
    raise PrepareError("give --source (the public archive or its folder)")
  _check_out(out)
  staging = os.path.join(out, ".staging")
  try:
    unlisted = _build(benchmark, Inputs(sources, staging), out, lists_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  manifest = _manifest(benchmark, out, sources, lists_dir, unlisted)
  with open(os.path.join(out, manifest_lib.MANIFEST_NAME), "w",
            encoding="utf-8") as f:
    f.write(json.dumps(manifest, indent=1) + "\n")
  return manifest


def summary_line(m: dict, out: str) -> str:
  return (f"{m['benchmark']}: {m['num_classes']} classes, {m['train']} train /"
          f" {m['test']} test images in {out} (manifest sha256 "
          f"{m['sha256'][:12]}); known counts: {m['known_counts']}")


def main(argv) -> int:
  if len(argv) != 2:
    tool.fail(f"give one benchmark ({', '.join(BENCHMARKS)})")
  if not _OUT.value:
    tool.fail("give --out (the folder to create)")
  m = prepare(argv[1], _SOURCE.value, _OUT.value, _LISTS.value)
  print(summary_line(m, _OUT.value))
  return 0


if __name__ == "__main__":
  tool.run(main, user_errors=(PrepareError, DataError))
