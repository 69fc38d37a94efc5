"""An offline stand-in for the Hugging Face Hub's file downloads.

`FakeHub` serves the given files of the given repositories, each at one
commit, on ``127.0.0.1``, answering what ``huggingface_hub.hf_hub_download``
asks (0.3x and 1.x):

* ``HEAD`` and ``GET /{repo}/resolve/{revision}/{filename}``, ``revision``
  ``main`` or the repository's commit hash: ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``; for LFS files (``*.safetensors``, ``*.bin``, as on the
  Hub) also ``X-Linked-Etag`` (their sha256) and ``X-Linked-Size``. A
  ``Range: bytes=N-`` request (a resumed download) gets 206.
* An unknown repository, revision or file: 404 with the Hub's
  ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

Usage::

    with FakeHub({"timm/tiny": {"model.safetensors": data}}) as hub:
      # in a subprocess: HF_ENDPOINT is read when huggingface_hub is imported
      env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf"))
      # in process: hf_hub_download(..., endpoint=hub.url, cache_dir=...)
      hub.commit("timm/tiny")   # the 40-hex commit it is served at
      hub.gets("timm/tiny")     # how many GETs (downloads) it answered
      hub.cut_next(1)           # the next GET sends half the body and hangs up
      hub.corrupt = True        # GETs send a changed byte (headers stay true)
      hub.stop()                # offline from now on (also on leaving `with`)

A file's contents may be ``bytes`` or a path (read once, when served), so a
full-size checkpoint is not held twice. Not modelled: redirects to a CDN, Xet
storage, authentication, the Hub's API routes (``/api/models/...``).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
import urllib.parse

_LFS_SUFFIXES = (".safetensors", ".bin", ".npz")


def _read(data) -> bytes:
  if isinstance(data, (bytes, bytearray)):
    return bytes(data)
  with open(data, "rb") as f:
    return f.read()


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"

  def setup(self):
    super().setup()
    self.server.hub.opened(self.connection)

  def log_message(self, *args):  # quiet: pytest shows stderr on failure
    pass

  def _error(self, code: str, commit: str | None = None):
    self.send_response(404)
    self.send_header("X-Error-Code", code)
    if commit:
      self.send_header("X-Repo-Commit", commit)
    self.send_header("Content-Length", "0")
    self.end_headers()

  def _answer(self, body: bool):
    hub: FakeHub = self.server.hub
    path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
    hub.log.append((self.command, path))
    repo, sep, rest = path.lstrip("/").partition("/resolve/")
    revision, _, filename = rest.partition("/")
    if not sep or repo not in hub.repos:
      return self._error("RepoNotFound")
    commit = hub.commit(repo)
    if revision not in ("main", commit):
      return self._error("RevisionNotFound")
    if filename not in hub.repos[repo]:
      return self._error("EntryNotFound", commit)
    data = hub.content(repo, filename)
    sha = hashlib.sha256(data).hexdigest()
    start = 0
    rng = self.headers.get("Range", "")
    if body and rng.startswith("bytes="):
      start = int(rng[len("bytes="):].split("-")[0] or 0)
    self.send_response(206 if start else 200)
    self.send_header("X-Repo-Commit", commit)
    if filename.endswith(_LFS_SUFFIXES):
      self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
      self.send_header("X-Linked-Etag", f'"{sha}"')
      self.send_header("X-Linked-Size", str(len(data)))
    else:
      self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
    if start:
      self.send_header("Content-Range",
                       f"bytes {start}-{len(data) - 1}/{len(data)}")
    self.send_header("Content-Length", str(len(data) - start))
    self.end_headers()
    if not body:
      return None
    hub.count_get(repo)
    if hub.take_cut():                 # half the body, then hang up
      self.wfile.write(data[start:start + (len(data) - start) // 2])
      self.wfile.flush()
      self.close_connection = True
      return None
    if hub.corrupt:
      data = data[:-1] + bytes([data[-1] ^ 1])
    self.wfile.write(data[start:])
    return None

  def do_HEAD(self):  # pylint: disable=invalid-name
    self._answer(body=False)

  def do_GET(self):  # pylint: disable=invalid-name
    self._answer(body=True)


class FakeHub:
  """Serves ``{repo id: {filename: bytes or path}}``; see the module doc."""

  def __init__(self, repos: dict[str, dict[str, object]]):
    self.repos = {r: dict(files) for r, files in repos.items()}
    self.log: list[tuple[str, str]] = []
    self._gets: dict[str, int] = {}
    self._cuts = 0
    self.corrupt = False
    self._cache: dict[tuple[str, str], bytes] = {}
    self._connections: list[socket.socket] = []
    self._lock = threading.Lock()
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    self._server.daemon_threads = True
    self._server.hub = self
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    daemon=True)
    self._thread.start()

  @staticmethod
  def commit(repo: str) -> str:
    """The commit hash ``repo`` is served at (fixed by its name)."""
    return hashlib.sha1(f"fake-hub {repo}".encode()).hexdigest()

  def content(self, repo: str, filename: str) -> bytes:
    with self._lock:
      key = (repo, filename)
      if key not in self._cache:
        self._cache[key] = _read(self.repos[repo][filename])
      return self._cache[key]

  def gets(self, repo: str) -> int:
    with self._lock:
      return self._gets.get(repo, 0)

  def count_get(self, repo: str) -> None:
    with self._lock:
      self._gets[repo] = self._gets.get(repo, 0) + 1

  def cut_next(self, n: int = 1) -> None:
    """The next ``n`` GETs send half of what they should, then hang up."""
    with self._lock:
      self._cuts = n

  def take_cut(self) -> bool:
    with self._lock:
      if self._cuts:
        self._cuts -= 1
        return True
      return False

  def opened(self, connection: socket.socket) -> None:
    with self._lock:
      self._connections.append(connection)

  def stop(self) -> None:
    """Stops serving: the Hub is unreachable from now on, kept-alive
    connections included."""
    if self._thread.is_alive():
      self._server.shutdown()
      self._thread.join()
    self._server.server_close()
    with self._lock:
      for connection in self._connections:
        try:
          connection.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass                          # already closed by the client

  def __enter__(self) -> "FakeHub":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def hub_env(hub: FakeHub, hf_home, base=None, **extra) -> dict:
  """``base`` (default ``os.environ``) for a subprocess that downloads from
  ``hub`` into ``hf_home`` (no token, no telemetry, no Xet), plus ``extra``."""
  env = dict(os.environ if base is None else base, HF_ENDPOINT=hub.url,
             HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
             HF_HUB_DISABLE_XET="1")
  for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN",
               "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
    env.pop(name, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env
