"""Builds the frozen backbone a run adapts, from ``config.model``.

Three ways to get its weights (``config.model.init``):

* ``'pretrained'``: a local or ``gs://`` timm ``model.safetensors`` /
  ``pytorch_model.bin`` or AugReg ``.npz`` file (``config.model.checkpoint``);
  without one, the Hugging Face Hub repository ``config.model.weights`` names
  (`slora_jax.runner.hub`: its cache, ``HF_HOME``, ``HF_HUB_OFFLINE``,
  ``HF_ENDPOINT``).
* ``'random'``: a randomly initialised ViT (shows what adapters do without a
  representation worth adapting; useful as a control).
* ``'synthetic_pretrain'``: a small ViT pre-trained for a few minutes and
  cached on disk, so the offline demo has features worth adapting. Two
  pre-training tasks (``config.model.pretrain.task``), neither of which sees a
  downstream label: ``'rotation'`` predicts which of four rotations was applied
  to the run's *unlabeled* training images (self-supervised, as RotNet,
  Gidaris et al. 2018); ``'patterns'`` classifies generated colour/grating
  patterns (`slora_jax.data.sources.SyntheticSource`) and never sees the
  downstream images at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from slora_jax.runner import config as config_lib
from slora_jax.runner import hub
from slora_jax.runner import paths
from slora_jax.runner import pretrain
from slora_jax.runner import reference_import
from slora_jax.runner import results as results_lib
from slora_jax.models import convert
from slora_jax.models import vit as vit_lib

__all__ = ["build", "load_weights", "synthetic_pretrain", "default_cache_dir"]


def default_cache_dir() -> str:
  return os.environ.get("SLORA_JAX_CACHE",
                        paths.join(paths.expanduser("~"), ".cache", "slora_jax"))


def build(m: config_lib.ModelSettings, data: config_lib.DataSettings):
  """Returns ``(vit_config, model, params, info)`` for the model settings.

  ``params`` are float32 host arrays; ``info`` (name, checkpoint path, sha256)
  goes into results.json so a number can be traced to its weights. ``data``
  is read only by the 'rotation' pre-training (its unlabeled images).
  """
  cfg = m.vit_config()
  model = vit_lib.VisionTransformer(cfg)
  if m.init == "pretrained":
    t0 = time.perf_counter()
    if m.checkpoint:                  # a local or gs:// file wins over the Hub
      params = load_weights(m.checkpoint, cfg)
      info = {"name": m.weights,
              "checkpoint_path": paths.absolute(m.checkpoint),
              "sha256": results_lib.sha256_file(m.checkpoint), "init": m.init}
    else:
      params, info = _from_hub(m, cfg)
    logging.info("loaded %s in %.1f s", info["checkpoint_path"],
                 time.perf_counter() - t0)
  elif m.init == "random":
    params = jax.device_get(vit_lib.init_params(cfg, jax.random.key(m.seed)))
    info = {"name": f"random {m.name}", "checkpoint_path": None, "sha256": None,
            "init": m.init}
  elif m.init == "synthetic_pretrain":
    path = synthetic_pretrain(cfg, m.pretrain, data=data)
    params = convert.load_timm_safetensors(path, cfg)
    info = {"name": f"{m.name} pre-trained on generated images",
            "checkpoint_path": path, "sha256": results_lib.sha256_file(path),
            "init": m.init, "pretrain": dataclasses.asdict(m.pretrain)}
  else:
    raise ValueError(f"unknown model.init {m.init!r}; choose 'pretrained', "
                     "'random' or 'synthetic_pretrain'")
  return cfg, model, params, info


def load_weights(path: str, cfg: vit_lib.ViTConfig):
  """Float32 host params from a local or gs:// weights file: timm
  ``.safetensors`` or ``.bin`` (torch's weights-only unpickler), AugReg
  ``.npz``."""
  if not path.lower().endswith(".bin"):
    return convert.load_pretrained(path, cfg)
  if not paths.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  flat = reference_import.read_state_dict(paths.read_bytes(path), path)
  return convert.from_timm_state_dict(flat, cfg, path)


def _from_hub(m: config_lib.ModelSettings, cfg: vit_lib.ViTConfig):
  """The weights ``m.weights`` names on the Hub: ``(params, info)``.

  Every process reads its own huggingface_hub cache (on a TPU pod each host
  has its own disk; processes sharing one cache are serialised by its file
  lock, so it downloads once), then all check they hold process 0's file.
  """
  if not m.weights:
    raise FileNotFoundError(
        "config.model.checkpoint and config.model.weights are both empty: "
        "name the weights' Hugging Face Hub repository "
        "(--config.model.weights=timm/vit_base_patch16_224.augreg2_in21k_"
        "ft_in1k) or pass --config.model.checkpoint=/path/to/file")
  hub_file = hub.fetch(m.weights)
  params = load_weights(hub_file.path, cfg)
  if jax.process_count() > 1:
    ours = np.frombuffer(bytes.fromhex(hub_file.sha256), np.uint8).astype(
        np.int32)
    theirs = np.asarray(multihost_utils.broadcast_one_to_all(ours))
    if not np.array_equal(ours, theirs):
      raise hub.HubError(
          f"process {jax.process_index()} read another file of "
          f"{hub_file.repo}@{hub_file.revision} (commit {hub_file.commit}) "
          "than process 0: the hosts' caches differ; pin one commit with "
          f"--config.model.weights={hub_file.repo}@<commit hash>")
  info = {"name": m.weights, "checkpoint_path": hub_file.path,
          "sha256": hub_file.sha256, "init": m.init, "hub": hub_file.record()}
  return params, info


_PRETRAIN_TASKS = ("rotation", "patterns")


def _cache_key(cfg: vit_lib.ViTConfig, p, data_desc: str) -> str:
  # "version" changes whenever the pre-training itself changes (3: the shared
  # `pretrain.fit` loop), so an old cached file is never taken for a new one.
  desc = json.dumps({"vit": {k: str(v) for k, v in vars(cfg).items()},
                     "pretrain": dataclasses.asdict(p), "data": data_desc,
                     "version": 3}, sort_keys=True)
  return hashlib.sha256(desc.encode()).hexdigest()[:16]


def _pretrain_images(cfg, p, data):
  """(images (N, s, s, 3) in [0, 1], labels, description) for the task."""
  from slora_jax.runner.data import sources  # the data package imports TF lazily

  if p.task == "patterns":
    source = sources.SyntheticSource(
        num_classes=p.num_classes, train_per_class=p.train_per_class,
        test_per_class=1, image_size=cfg.image_size, seed=p.seed)
    split = source.split("train")
    idx = np.arange(len(split))
    labels = np.asarray(split.labels, np.int32)
    desc = "generated patterns"
  else:
    source = sources.make_source(data)
    split = source.split("train")
    # A fixed subset of the training images; their labels are never read.
    n = min(len(split), p.num_classes * p.train_per_class)
    idx = np.sort(np.random.default_rng(p.seed).permutation(len(split))[:n])
    labels = None
    desc = f"{source.description}, train split, no labels"
  images = np.stack([_to_float(split.read(int(i)), cfg.image_size) for i in idx])
  return images, labels, desc


def synthetic_pretrain(cfg: vit_lib.ViTConfig, p, cache_dir: str | None = None,
                       data=None) -> str:
  """Pre-trains ``cfg`` once without downstream labels; returns the cached file.

  ``p`` holds ``task`` ('rotation' or 'patterns'), ``num_classes``,
  ``train_per_class`` (the 'rotation' task uses ``num_classes ×
  train_per_class`` unlabeled training images of ``data``), ``steps,
  batch_size, lr, seed``. The file is keyed by a hash of ``cfg``, ``p`` and the
  data and written atomically, so concurrent or interrupted runs never read a
  partial file.
  """
  task = p.task
  if task not in _PRETRAIN_TASKS:
    raise ValueError(f"unknown model.pretrain.task {task!r}; choose one of "
                     f"{_PRETRAIN_TASKS}")
  if task == "rotation" and data is None:
    raise ValueError("model.pretrain.task='rotation' needs the run's data config")
  data_desc = "" if task == "patterns" else json.dumps(
      {k: str(getattr(data, k)) for k in ("source", "name", "root", "data_dir")},
      sort_keys=True)
  cache_dir = cache_dir or p.cache_dir or default_cache_dir()
  path = paths.join(cache_dir,
                      f"synthetic_vit_{_cache_key(cfg, p, data_desc)}.safetensors")
  if paths.exists(path):
    logging.info("using the cached pre-trained backbone %s", path)
    return path
  paths.makedirs(cache_dir)
  t0 = time.perf_counter()
  images, labels, desc = _pretrain_images(cfg, p, data)
  n_out = 4 if task == "rotation" else p.num_classes
  print(f"pre-training the demo backbone ({task}: {len(images)} images of "
        f"{desc}; {p.steps} steps, cached in {path}) ...", flush=True)
  logging.info("read %d pre-training images in %.1f s", len(images),
               time.perf_counter() - t0)

  params, _, _ = pretrain.fit(cfg, images, labels, num_outputs=n_out,
                              steps=p.steps, batch_size=p.batch_size,
                              lr=p.lr, seed=p.seed,
                              log=lambda m: print(m, flush=True))
  tmp = f"{path}.tmp{os.getpid()}"
  convert.save_timm_safetensors(params, tmp, cfg)
  paths.replace(tmp, path)
  return path


def _to_float(img: np.ndarray, size: int) -> np.ndarray:
  if img.shape[0] != size or img.shape[1] != size:
    from PIL import Image
    img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
  return img.astype(np.float32) / 255.0
