"""Backbone weights by name from the Hugging Face Hub, against `fake_hub`.

In process (`slora_jax.runner.hub` with an explicit endpoint and cache) for
the download, cache, integrity and error paths; in a subprocess for the
runner, where huggingface_hub reads HF_ENDPOINT/HF_HOME/HF_HUB_OFFLINE from
the environment as a user's run does.
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from cli_util import ROOT, SEED_DIR, cli_env, error_line, run_cli, tail
from fake_hub import FakeHub, hub_env
from slora_jax.models import convert
from slora_jax.models import vit as vit_lib
from slora_jax.runner import backbone
from slora_jax.runner import hub

REPO = "test/tiny-vit"
# tests/tiny_config.py's model.
CFG = vit_lib.ViTConfig(image_size=16, patch_size=8, width=16, depth=1,
                        num_heads=2, mlp_dim=32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(params, path of their model.safetensors, its bytes)."""
  params = jax.device_get(vit_lib.init_params(CFG, jax.random.key(3)))
  path = tmp_path_factory.mktemp("weights") / "model.safetensors"
  convert.save_timm_safetensors(params, path, CFG)
  return params, path, path.read_bytes()


def _load(name=REPO, **kw):
  """(params, HubFile), as the runner loads weights by name."""
  f = hub.fetch(name, **kw)
  return backbone.load_weights(f.path, CFG), f


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)   # float32 both ways


def test_download_then_cache_then_offline(weights, tmp_path, monkeypatch):
  params, path, data = weights
  # huggingface_hub 0.x retries an unreachable server 5 times with
  # exponential back-off (about 23 s) before it falls back to the cache: the
  # waits prove nothing here.
  from huggingface_hub.utils import _http
  monkeypatch.setattr(_http.time, "sleep", lambda s: None)
  cache = str(tmp_path / "hf")
  with FakeHub({REPO: {"model.safetensors": path}}) as fake:
    got, f = _load(cache_dir=cache, endpoint=fake.url)
    _assert_same(got, params)
    assert (f.repo, f.revision, f.commit, f.filename) == (
        REPO, "main", FakeHub.commit(REPO), "model.safetensors")
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert f.path.startswith(cache) and fake.gets(REPO) == 1
    assert hub.fetch(REPO, cache_dir=cache, endpoint=fake.url) == f
    assert fake.gets(REPO) == 1                           # from the cache
    pinned = hub.fetch(f"{REPO}@{f.commit}", cache_dir=cache,
                       endpoint=fake.url)
    assert (pinned.commit, pinned.path) == (f.commit, f.path)
  # The server is down: the cache still answers.
  got, again = _load(cache_dir=cache, endpoint=fake.url)
  assert again == f
  _assert_same(got, params)


def test_damaged_cache_and_cut_download_are_fetched_again(weights, tmp_path):
  params, path, data = weights
  cache = str(tmp_path / "hf")
  with FakeHub({REPO: {"model.safetensors": path}}) as fake:
    f = hub.fetch(REPO, cache_dir=cache, endpoint=fake.url)
    blob = os.path.realpath(f.path)
    with open(blob, "r+b") as fh:                  # a truncated cached file
      fh.truncate(len(data) // 3)
    again = hub.fetch(REPO, cache_dir=cache, endpoint=fake.url)
    assert fake.gets(REPO) == 2 and again == f
    assert os.path.getsize(blob) == len(data)
    # A download cut off half-way is fetched again (resumed by
    # huggingface_hub 1.x, restarted by 0.x) into a fresh cache.
    fake.cut_next(1)
    fresh = str(tmp_path / "hf2")
    got, cut = _load(cache_dir=fresh,
                                   endpoint=fake.url)
    assert fake.gets(REPO) == 4 and cut.sha256 == f.sha256
    _assert_same(got, params)


def test_a_file_that_stays_wrong_is_one_line(weights, tmp_path):
  _, path, data = weights
  with FakeHub({REPO: {"model.safetensors": path}}) as fake:
    fake.corrupt = True
    with pytest.raises(hub.HubError) as e:
      hub.fetch(REPO, cache_dir=str(tmp_path / "hf"), endpoint=fake.url)
  assert fake.gets(REPO) == 2                     # downloaded once more
  want = hashlib.sha256(data).hexdigest()
  assert str(e.value).endswith(
      f": downloaded {REPO} model.safetensors twice and its sha256 is "
      f"{hashlib.sha256(data[:-1] + bytes([data[-1] ^ 1])).hexdigest()}, not "
      f"the Hub's {want}; check HF_ENDPOINT and the network, or pass a local "
      "file in model.checkpoint")


def test_unknown_repo_revision_or_file_is_one_line(weights, tmp_path):
  _, path, _ = weights
  kw = {"cache_dir": str(tmp_path / "hf")}
  with FakeHub({REPO: {"model.safetensors": path},
                "test/no-weights": {"README.md": b"hi"}}) as fake:
    kw["endpoint"] = fake.url
    cases = {
        "test/nope": "the Hugging Face Hub has no repository 'test/nope' (or "
                     "it is private or gated: set HF_TOKEN); set "
                     "model.weights to an existing 'owner/name', or pass a "
                     "local file in model.checkpoint",
        f"{REPO}@v9": f"the Hub repository '{REPO}' has no revision 'v9'; "
                      "give a branch, tag or commit hash it has after '@', "
                      "or none for 'main'",
        "test/no-weights": "the Hub repository 'test/no-weights' at 'main' "
                           "has neither of model.safetensors, "
                           "pytorch_model.bin; name a timm model "
                           "repository, or pass a local file in "
                           "model.checkpoint",
        "not a repo": "model.weights='not a repo' is not a Hugging Face Hub "
                      "repository name ('owner/name' or "
                      "'owner/name@revision', e.g. 'timm/vit_base_patch16_"
                      "224.augreg2_in21k_ft_in1k'); or pass a local file in "
                      "model.checkpoint",
    }
    for name, message in cases.items():
      with pytest.raises(hub.HubError) as e:
        hub.fetch(name, **kw)
      assert str(e.value) == message


def test_pytorch_model_bin_when_there_is_no_safetensors(weights, tmp_path):
  torch = pytest.importorskip("torch")
  params, path, _ = weights
  state = {k: torch.from_numpy(v)
           for k, v in safetensors.numpy.load_file(path).items()}
  torch.save(state, tmp_path / "pytorch_model.bin")
  with FakeHub({REPO: {"pytorch_model.bin": tmp_path / "pytorch_model.bin"}
                }) as fake:
    got, f = _load(cache_dir=str(tmp_path / "hf"),
                                 endpoint=fake.url)
  assert f.filename == "pytorch_model.bin"
  _assert_same(got, params)


# ------------------------------------------------------------ the runner


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return cli_env(tmp_path_factory)


def test_run_by_name_records_the_hub_file(env, weights, tmp_path):
  _, path, data = weights
  flags = ("--config.model.init=pretrained", f"--config.model.weights={REPO}")
  hf_home = tmp_path / "hf"
  with FakeHub({REPO: {"model.safetensors": path}}) as fake:
    r = run_cli(hub_env(fake, hf_home, env), tmp_path / "a", *flags)
    assert r.returncode == 0, tail(r)
    # Offline with an empty cache: one line.
    line = error_line(run_cli(
        hub_env(fake, tmp_path / "empty", env, HF_HUB_OFFLINE=1),
        tmp_path / "b", *flags))
  assert fake.gets(REPO) == 1
  with open(tmp_path / "a" / SEED_DIR / "results.json") as f:
    record = json.load(f)["backbone"]
  assert record["hub"] == {"repo": REPO, "revision": "main",
                           "commit": FakeHub.commit(REPO),
                           "filename": "model.safetensors"}
  assert record["sha256"] == hashlib.sha256(data).hexdigest()
  assert record["checkpoint_path"].startswith(str(hf_home))
  assert line.startswith(f"error: cannot reach the Hub for {REPO}@main "
                         "(HF_HUB_OFFLINE set, or no connection to "
                         "HF_ENDPOINT) and its weights are not in the cache "
                         f"{tmp_path / 'empty' / 'hub'}; connect once")


def test_hf_hub_offline_reads_the_cache_without_a_request(weights, tmp_path):
  _, path, _ = weights
  code = ("from slora_jax.runner import hub; f = hub.fetch(%r); "
          "print(f.commit, f.filename)" % REPO)
  with FakeHub({REPO: {"model.safetensors": path}}) as fake:
    env = hub_env(fake, tmp_path / "hf", dict(os.environ, PYTHONPATH=ROOT))
    runs = [subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
            for e in (env, dict(env, HF_HUB_OFFLINE="1"))]
    assert len(fake.log) == 2                   # the first run's HEAD and GET
  for r in runs:
    assert r.returncode == 0, tail(r)
    assert r.stdout.split() == [FakeHub.commit(REPO), "model.safetensors"]
