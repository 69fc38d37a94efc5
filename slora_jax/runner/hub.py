"""Backbone weights by name from the Hugging Face Hub.

``fetch("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")`` downloads the
repository's ``model.safetensors`` (or, where it has none,
``pytorch_model.bin``) with ``huggingface_hub`` and returns the cached file,
the commit it came from and its sha256; `slora_jax.runner.backbone` loads it.
A name may pin a revision: ``owner/name@<branch, tag or commit hash>``
(default ``main``). In the runner, not the library: the library's
dependencies are only what it imports (tests/test_packaging.py), and
huggingface_hub stays optional (one line if missing).

Everything huggingface_hub reads from the environment applies: ``HF_HOME`` or
``HF_HUB_CACHE`` (the cache; a second call reads the file from there),
``HF_HUB_OFFLINE=1`` (the cache only, never the network), ``HF_ENDPOINT``
(a mirror), ``HF_TOKEN`` (gated or private repositories).

Integrity: the Hub's ETag of a file kept in LFS is its sha256, and the cache
stores the file under that name (``blobs/<sha256>``). huggingface_hub checks a
download's size, not its bytes; `fetch` hashes the file and compares, so a
truncated or damaged file in the cache is downloaded again. (Where the cache
holds copies instead of links, e.g. Windows without symlinks, the file is
hashed but not checked.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Any

from slora_jax.runner import paths

__all__ = ["HubError", "HubFile", "WEIGHT_FILES", "parse_name", "fetch"]

log = logging.getLogger(__name__)

# What a timm repository holds, in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[\w.-]+/[\w.-]+")


class HubError(ValueError):
  """The weights cannot be had from the Hub; the message is one line."""


@dataclasses.dataclass(frozen=True)
class HubFile:
  """A weights file in huggingface_hub's cache and where it came from."""
  repo: str
  revision: str          # as asked: a branch, tag or commit hash
  commit: str            # the commit hash it resolved to
  filename: str
  path: str
  sha256: str

  def record(self) -> dict:
    """What results.json keeps to trace a number to these weights."""
    return {"repo": self.repo, "revision": self.revision,
            "commit": self.commit, "filename": self.filename}


def parse_name(name: str) -> tuple[str, str]:
  """``'owner/name[@revision]'`` -> ``(repo id, revision)``."""
  repo, at, revision = name.strip().partition("@")
  if not _NAME.fullmatch(repo) or (at and not revision):
    raise HubError(
        f"model.weights={name!r} is not a Hugging Face Hub repository name "
        "('owner/name' or 'owner/name@revision', e.g. "
        "'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'); or pass a local "
        "file in model.checkpoint")
  return repo, revision or "main"


def _hf():
  try:
    # pylint: disable=import-outside-toplevel
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors
  except ImportError as e:
    raise HubError(
        "downloading weights by name needs huggingface_hub, which is not "
        "installed: pip install huggingface_hub; or pass a local file in "
        "model.checkpoint") from e
  return huggingface_hub


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with paths.open_file(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _expected_sha256(path: str) -> str | None:
  """The Hub's sha256 of a cached file: the name of the blob it links to."""
  # huggingface_hub's cache is always local: its links are read directly.
  blob = os.path.basename(os.path.realpath(path))  # path-ok
  return blob if os.path.islink(path) and _SHA256.fullmatch(blob) else None  # path-ok


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _download(hf, repo, revision, filename, kw, force=False) -> str:
  for attempt in (1, 2):
    try:
      return hf.hf_hub_download(repo, filename, revision=revision,
                                force_download=force, **kw)
    except (hf.errors.HfHubHTTPError, FileNotFoundError):
      raise                  # the Hub answered, or the cache has no such file
    except OSError as e:
      # The transfer broke off (huggingface_hub 0.x does not resume it) or
      # came out the wrong size; its partial file is already deleted.
      if attempt == 2:
        raise
      log.warning("downloading %s of %s broke off (%s): trying again",
                  filename, repo, _first_line(e))
  raise AssertionError("unreachable")


def _verified(hf, repo, revision, filename, kw) -> tuple[str, str]:
  """(path, sha256) of the file, downloaded again once if it is damaged."""
  path = _download(hf, repo, revision, filename, kw)
  want, got = _expected_sha256(path), _sha256(path)
  if want and got != want:
    log.warning("%s: sha256 %s, but the Hub's is %s (a truncated or damaged "
                "download): downloading it again", path, got, want)
    try:
      path = _download(hf, repo, revision, filename, kw, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise HubError(
          f"{path}: the cached {repo} {filename} is damaged (sha256 {got}, "
          f"the Hub's is {want}) and downloading it again failed "
          f"({_first_line(e)}); delete it and retry online") from e
    got = _sha256(path)
    if got != want:
      raise HubError(
          f"{path}: downloaded {repo} {filename} twice and its sha256 is "
          f"{got}, not the Hub's {want}; check HF_ENDPOINT and the network, "
          "or pass a local file in model.checkpoint")
  return path, got


def fetch(name: str, *, cache_dir: str | None = None,
          endpoint: str | None = None) -> HubFile:
  """Downloads (or finds in the cache) the weights of Hub repository ``name``.

  Args:
    name: ``'owner/name'`` or ``'owner/name@revision'``.
    cache_dir: huggingface_hub's cache; default ``HF_HUB_CACHE`` or
      ``$HF_HOME/hub``.
    endpoint: the Hub's URL; default ``HF_ENDPOINT`` or huggingface.co.

  Returns:
    The verified file (`WEIGHT_FILES`' first that the repository has).

  Raises:
    HubError: one line: no such repository, revision or weights file, no
      network and nothing cached, or a download that stays damaged.
  """
  repo, revision = parse_name(name)
  hf = _hf()
  errors = hf.errors
  kw: dict[str, Any] = {"cache_dir": cache_dir, "endpoint": endpoint}
  first_error = None
  for filename in WEIGHT_FILES:
    try:
      path, sha = _verified(hf, repo, revision, filename, kw)
    except errors.RepositoryNotFoundError as e:
      raise HubError(
          f"the Hugging Face Hub has no repository {repo!r} (or it is private "
          "or gated: set HF_TOKEN); set model.weights to an existing "
          "'owner/name', or pass a local file in model.checkpoint") from e
    except errors.RevisionNotFoundError as e:
      raise HubError(
          f"the Hub repository {repo!r} has no revision {revision!r}; give a "
          "branch, tag or commit hash it has after '@', or none for "
          "'main'") from e
    except errors.LocalEntryNotFoundError as e:
      # Offline or unreachable: another file may be cached; look only there
      # (huggingface_hub already spent its retries on this one).
      first_error = first_error or e
      kw["local_files_only"] = True
      continue
    except errors.EntryNotFoundError as e:
      first_error = first_error or e
      continue
    except HubError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # httpx/requests transfer errors, a server error: one line.
      raise HubError(f"downloading {filename} of {repo}@{revision} failed "
                     f"({_first_line(e)}); retry, or pass a local file in "
                     "model.checkpoint") from e
    commit = os.path.basename(os.path.dirname(path))  # path-ok: snapshots/<commit>/
    return HubFile(repo, revision, commit, filename, path, sha)
  if isinstance(first_error, errors.LocalEntryNotFoundError):
    raise HubError(
        f"cannot reach the Hub for {repo}@{revision} (HF_HUB_OFFLINE set, or "
        "no connection to HF_ENDPOINT) and its weights are not in the cache "
        f"{cache_dir or hf.constants.HF_HUB_CACHE}; connect once, or pass a "
        "local file in model.checkpoint") from first_error
  raise HubError(
      f"the Hub repository {repo!r} at {revision!r} has neither of "
      f"{', '.join(WEIGHT_FILES)}; name a timm model repository, or pass a "
      "local file in model.checkpoint") from first_error

