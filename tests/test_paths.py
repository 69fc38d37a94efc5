"""gs:// workdirs, data and weights, on an offline fake GCS (tests/fake_gcs.py).

A run whose workdir, image folders and backbone checkpoint all live in a fake
bucket writes every output there (results, plot, config, TensorBoard,
Orbax checkpoints through TensorStore's GCS client) and nothing locally;
killed between tasks, it leaves a lease that refuses a second run until it is
stale, and the resumed run reaches the numbers of the same run done locally.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from cli_util import CONFIG, ROOT, SEED_DIR, cli_env, error_line, outcome, tail
from slora_jax.models import convert
from slora_jax.models import vit as vit_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import lock
import tiny_config

import jax

FAKE_GCS = os.path.join(ROOT, "tests", "fake_gcs.py")
CLASSES = ("ant", "bee", "cat", "dog")


def _bucket(root) -> None:
  """bucket/data/{train,test}/<class>/*.png and bucket/vit.safetensors."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 8), ("test", 4)):
    for k, cls in enumerate(CLASSES):
      folder = root / "bucket" / "data" / split / cls
      folder.mkdir(parents=True)
      for i in range(n):
        img = rng.integers(0, 60, (16, 16, 3)) + 60 * k   # learnable by class
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
  cfg = config_lib.from_config(tiny_config.get_config()).model.vit_config()
  params = jax.device_get(vit_lib.init_params(cfg, jax.random.key(1)))
  convert.save_timm_safetensors(params, root / "bucket" / "vit.safetensors", cfg)


def _run(env, cwd, workdir, data_root, weights, kill=None):
  env = dict(env, **({"SLORA_JAX_KILL_AT": kill} if kill else {}))
  return subprocess.run(
      [sys.executable, FAKE_GCS, f"--config={CONFIG}", f"--workdir={workdir}",
       "--config.data.source=folder", f"--config.data.root={data_root}",
       "--config.data.num_tasks=2", "--config.model.init=pretrained",
       f"--config.model.checkpoint={weights}"],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _files(directory) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), directory)
          for d, _, files in os.walk(directory) for f in files}


def test_a_gs_run_writes_only_to_the_bucket_and_resumes_like_a_local_run(
    tmp_path, tmp_path_factory):
  fake, cwd = tmp_path / "gcs", tmp_path / "cwd"
  cwd.mkdir()
  _bucket(fake)
  env = dict(cli_env(tmp_path_factory), FAKE_GCS_ROOT=str(fake))
  local = _run(env, cwd, tmp_path / "local", fake / "bucket" / "data",
               fake / "bucket" / "vit.safetensors")
  assert local.returncode == 0, tail(local)
  gs = ("gs://bucket/run", "gs://bucket/data", "gs://bucket/vit.safetensors")
  before = _files(fake)

  killed = _run(env, cwd, *gs, kill="between_tasks:1")
  assert killed.returncode == -9, tail(killed)
  lease = fake / "bucket" / "run" / ".lock"
  held = json.loads(lease.read_text())
  assert held["owner"].startswith(socket.gethostname() + ":")
  refused = error_line(_run(env, cwd, *gs))
  assert "is in use by another run" in refused and "lease refreshed" in refused
  # The killed run's lease, once stale, is taken over.
  held["time"] = time.time() - lock.LEASE_STALE_S - 1
  lease.write_text(json.dumps(held))
  resumed = _run(env, cwd, *gs)
  assert resumed.returncode == 0, tail(resumed)
  assert "resuming after task 1/2 from gs://" in resumed.stderr, tail(resumed)

  run = fake / "bucket" / "run"
  assert outcome(run) == outcome(tmp_path / "local")
  written = _files(run)
  assert {"config.json", f"{SEED_DIR}/results.json",
          f"{SEED_DIR}/results.png"} <= written
  events = [f for f in written if f.startswith(f"{SEED_DIR}/tensorboard/events.")]
  assert events and all((run / f).stat().st_size > 0 for f in events)
  backbone = json.loads((run / SEED_DIR / "results.json").read_text())["backbone"]
  assert backbone["checkpoint_path"] == gs[2]
  assert backbone["sha256"] == hashlib.sha256(
      (fake / "bucket" / "vit.safetensors").read_bytes()).hexdigest()
  assert any(f.startswith(f"{SEED_DIR}/checkpoints/") and "/state/" in f
             for f in written)                    # TensorStore's arrays
  assert ".lock" not in written                   # released at the end
  assert not [f for f in written if ".tmp" in f or "fake-gcs-upload" in f]
  assert _files(fake) - before == {f"bucket/run/{f}" for f in written}
  assert not os.listdir(cwd)                      # no local "gs:" folders


_HEARTBEAT = """
import json, os, time, fake_gcs
fake_gcs.install()
from slora_jax.runner import lock
lock.LEASE_REFRESH_S = 0.2
lease = os.path.join(os.environ["FAKE_GCS_ROOT"], "bucket", "w", ".lock")
with lock.hold("gs://bucket/w"):
  first = json.load(open(lease))["time"]
  time.sleep(1.0)
  print(json.load(open(lease))["time"] - first)
print(os.path.exists(lease))
"""


def test_the_lease_is_refreshed_while_the_run_holds_it_and_removed_after(
    tmp_path, tmp_path_factory):
  (tmp_path / "bucket").mkdir()
  env = dict(cli_env(tmp_path_factory), FAKE_GCS_ROOT=str(tmp_path),
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  r = subprocess.run([sys.executable, "-c", _HEARTBEAT], env=env, cwd=tmp_path,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, tail(r)
  refreshed_by, exists_after = r.stdout.split()
  assert float(refreshed_by) >= 0.5 and exists_after == "False"
