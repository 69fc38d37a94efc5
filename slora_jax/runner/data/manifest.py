"""What data a run read: per-class counts and a digest of the file list.

A manifest is a small JSON dict::

  format        1
  kind          'files' (image folders) or 'labels' (other sources)
  num_classes, train, test
  classes       {class name: [train count, test count]}
  sha256        of the sorted ``split/class/.../file<TAB>size`` lines (files)
                or of the sorted ``split/class<TAB>count`` lines (labels)
  listing_sha256  (files) of the sorted relative paths alone

Image contents are not hashed: 30,000 paths and sizes take well under a
second, and the manifest is cached beside the data (``<root>/MANIFEST.json``,
the file ``experiments.prepare_data`` writes) keyed on the folder's listing,
so a rerun on unchanged folders stats nothing. A file rewritten in place
under the same name is not noticed (the listing is the key).

`known_counts_warning` compares a manifest with the benchmark's known counts
(``reference_data/data_counts.json``, each figure with its source).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging

import numpy as np

from slora_jax.runner import paths
from slora_jax.runner.data.sources.core import SPLITS, Source
from slora_jax.runner.data.sources.folder import ImageFolderSource

__all__ = ["MANIFEST_NAME", "FORMAT", "of_files", "of_folder", "of_source",
           "known_counts", "dataset_of", "known_counts_warning"]

MANIFEST_NAME = "MANIFEST.json"
FORMAT = 1


def _sha256(lines) -> str:
  h = hashlib.sha256()
  for line in lines:
    h.update(line.encode("utf-8") + b"\n")
  return h.hexdigest()


def _counts(class_names, rel: dict[str, list[str]]) -> dict:
  per = {c: [0, 0] for c in class_names}
  for k, split in enumerate(SPLITS):
    for r in rel.get(split, ()):
      per[r.split("/", 2)[1]][k] += 1
  return {"num_classes": len(per),
          "train": sum(v[0] for v in per.values()),
          "test": sum(v[1] for v in per.values()), "classes": per}


def of_files(root: str, class_names, rel: dict[str, list[str]]) -> dict:
  """The manifest of ``rel[split]``, paths relative to ``root`` ('/'-joined)."""
  listing = sorted(r for split in SPLITS for r in rel.get(split, ()))
  sizes = (f"{r}\t{paths.file_size(paths.join(root, r))}" for r in listing)
  return {"format": FORMAT, "kind": "files", **_counts(class_names, rel),
          "sha256": _sha256(sizes), "listing_sha256": _sha256(listing)}


def _relative(source: ImageFolderSource) -> dict[str, list[str]]:
  n = len(source.root.rstrip("/")) + 1
  return {split: [f[n:].replace("\\", "/") for f in files]
          for split, (files, _) in source._files.items()}  # pylint: disable=protected-access


def _cached(path: str, listing_sha256: str) -> dict | None:
  try:
    cached = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return None
  ok = (isinstance(cached, dict) and cached.get("format") == FORMAT
        and cached.get("listing_sha256") == listing_sha256)
  return cached if ok else None


def of_folder(source: ImageFolderSource, write_cache: bool = True) -> dict:
  """The manifest of an image-folder source, from or into its cache."""
  rel = _relative(source)
  listing = sorted(r for split in SPLITS for r in rel.get(split, ()))
  path = paths.join(source.root, MANIFEST_NAME)
  cached = _cached(path, _sha256(listing)) if paths.exists(path) else None
  if cached is not None:
    return cached
  manifest = of_files(source.root, source.class_names, rel)
  if write_cache:
    try:
      paths.write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    except OSError as e:  # read-only data: recomputed next time
      logging.info("data manifest not cached in %s: %s", path, e)
  return manifest


def of_source(source: Source, splits=None, write_cache: bool = True) -> dict:
  """A manifest of any source: files for image folders, labels otherwise.

  ``splits``: the source's (train, test) `Split`s when already opened.
  """
  if isinstance(source, ImageFolderSource):
    return of_folder(source, write_cache)
  names = [str(c) for c in source.class_names]
  per = {c: [0, 0] for c in names}
  splits = splits or [source.split(s) for s in SPLITS]
  for k, split in enumerate(splits):
    labels = np.asarray(split.labels)
    labels = labels[(labels >= 0) & (labels < len(names))]
    for label, n in enumerate(np.bincount(labels, minlength=len(names))):
      per[names[label]][k] += int(n)
  lines = sorted(f"{s}/{c}\t{v[k]}" for c, v in per.items()
                 for k, s in enumerate(SPLITS))
  return {"format": FORMAT, "kind": "labels", "num_classes": len(per),
          "train": sum(v[0] for v in per.values()),
          "test": sum(v[1] for v in per.values()), "classes": per,
          "sha256": _sha256(lines)}


@functools.lru_cache(maxsize=1)
def known_counts() -> dict:
  """``reference_data/data_counts.json``: dataset id -> its known counts."""
  text = (importlib.resources.files("slora_jax.runner") / "reference_data"
          / "data_counts.json").read_text(encoding="utf-8")
  return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def dataset_of(benchmark: str | None) -> str | None:
  """'imagenet_r_10' -> 'imagenet_r' (None when no known counts exist)."""
  name = benchmark or ""
  base, _, tasks = name.rpartition("_")
  if tasks.isdigit():
    name = base
  return name if name in known_counts() else None


def _class_differences(manifest: dict, known: dict) -> list[str]:
  have = manifest.get("classes") or {}
  if known.get("classes"):
    want = known["classes"]
  elif known.get("per_class"):
    want = {c: known["per_class"] for c in have}
  else:
    return []
  out = []
  for c in sorted(set(want) | set(have)):
    h, w = have.get(c), want.get(c)
    if h is None or w is None:
      out.append(f"{c} ({'missing' if h is None else 'not in the benchmark'})")
    elif list(h) != list(w):
      out.append(f"{c} (train {h[0]}, test {h[1]}; known {w[0]}, {w[1]})")
  return out


def known_counts_warning(manifest: dict, benchmark: str | None,
                         limit: int = 5) -> str | None:
  """One line naming how the data differs from the benchmark's known counts."""
  dataset = dataset_of(benchmark)
  if dataset is None or not manifest:
    return None
  known = known_counts()[dataset]
  totals = []
  for key in ("num_classes", "train", "test"):
    if known.get(key) is not None and known[key] != manifest.get(key):
      totals.append(f"{manifest.get(key)} {key.replace('num_', '')} "
                    f"(known {known[key]})")
  total = manifest.get("train", 0) + manifest.get("test", 0)
  if known.get("total") is not None and known["total"] != total:
    totals.append(f"{total} images (known {known['total']})")
  classes = _class_differences(manifest, known)
  if not totals and not classes:
    return None
  parts = totals[:]
  if classes:
    more = f" and {len(classes) - limit} more" if len(classes) > limit else ""
    parts.append(f"{len(classes)} classes differ: "
                 f"{', '.join(classes[:limit])}{more}")
  return (f"the data differs from {known['name']}'s known counts ("
          f"{known['split']}): {'; '.join(parts)}; numbers may not compare "
          "with the paper's (see docs/benchmark.md, known counts)")
