"""An offline stand-in for Google Cloud Storage, backed by a local folder.

``gs://bucket/key`` is ``$FAKE_GCS_ROOT/bucket/key`` for both ways the runner
reaches GCS:

* etils.epath (every runner file, Orbax's own metadata) through fsspec: with
  ``EPATH_USE_TF=false`` epath uses fsspec's "gcs" filesystem, which
  `install` replaces with `FakeGcsFileSystem`. Like gcsfs, it returns object
  names without ``gs://``.
* TensorStore (Orbax's array data) through its GCS JSON-API client: pointed at
  `FakeGcsServer` by ``TENSORSTORE_GCS_HTTP_URL``, with the fixed test token
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` so it never asks a metadata server; and
  google-cloud-storage (Orbax asks it about the bucket) by
  ``STORAGE_EMULATOR_HOST``, with which it sends no credentials.

Not modelled: GCS has no folders (this fake has real ones), no request
retries or rate limits. ``python tests/fake_gcs.py ARGS`` runs
``python -m experiments.run ARGS`` with both installed.
"""

from __future__ import annotations

import http.server
import json
import os
import runpy
import sys
import threading
import urllib.parse

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "FAKE_GCS_ROOT"


class FakeGcsFileSystem(DirFileSystem):
  """fsspec's "gcs"/"gs" protocol on ``$FAKE_GCS_ROOT``."""

  protocol = ("gs", "gcs")

  def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close)
    del args, kwargs
    super().__init__(path=os.environ[ROOT_ENV], fs=LocalFileSystem())

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.rstrip("/")


def _generation(path: str) -> str:
  return str(os.stat(path).st_mtime_ns)


class _Handler(http.server.BaseHTTPRequestHandler):
  """The JSON-API calls TensorStore's ``gcs`` kvstore makes."""

  protocol_version = "HTTP/1.1"

  def log_message(self, *args):  # quiet: pytest shows stderr on failure
    pass

  def _route(self):
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query))
    parts = url.path.split("/")   # '', ['upload',] 'storage', 'v1', 'b', B, 'o'[, K]
    if parts[1] == "upload":
      parts = parts[1:]
    bucket = parts[4]
    key = urllib.parse.unquote(parts[6]) if len(parts) > 6 else query.get("name")
    if len(parts) == 5:
      key = ""                                       # the bucket itself
    root = os.path.join(self.server.root, bucket)
    return root, key, query

  def _send(self, code: int, body: bytes = b"", headers=()):
    self.send_response(code)
    for k, v in headers:
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _meta(self, bucket_root, key) -> dict:
    path = os.path.join(bucket_root, key)
    return {"name": key, "bucket": os.path.basename(bucket_root),
            "size": str(os.path.getsize(path)), "generation": _generation(path)}

  def _precondition_fails(self, path, query) -> bool:
    gen = _generation(path) if os.path.isfile(path) else "0"
    if "ifGenerationMatch" in query and query["ifGenerationMatch"] != gen:
      return True
    return query.get("ifGenerationNotMatch") == gen

  def do_GET(self):  # pylint: disable=invalid-name
    root, key, query = self._route()
    if key == "":                 # google-cloud-storage's get_bucket (Orbax)
      return self._send(200, json.dumps({
          "name": os.path.basename(root),
          "hierarchicalNamespace": {"enabled": False}}).encode())
    if key is None:                                   # list
      names = []
      for folder, _, files in os.walk(root):
        names += [os.path.relpath(os.path.join(folder, f), root) for f in files]
      lo, hi = query.get("startOffset", ""), query.get("endOffset")
      items = [self._meta(root, n) for n in sorted(names)
               if n >= lo and (hi is None or n < hi)]
      return self._send(200, json.dumps({"items": items}).encode())
    path = os.path.join(root, key)
    if not os.path.isfile(path):
      return self._send(404)
    if self._precondition_fails(path, query):
      return self._send(412 if "ifGenerationMatch" in query else 304)
    if query.get("alt") == "json":
      return self._send(200, json.dumps(self._meta(root, key)).encode())
    with open(path, "rb") as f:
      data = f.read()
    headers = [("x-goog-generation", _generation(path))]
    rng = self.headers.get("Range")
    if not rng:
      return self._send(200, data, headers)
    start, _, end = rng.removeprefix("bytes=").partition("-")
    if start:
      first, last = int(start), min(int(end or len(data) - 1), len(data) - 1)
    else:                                             # the last `end` bytes
      first, last = max(len(data) - int(end), 0), len(data) - 1
    headers.append(("Content-Range", f"bytes {first}-{last}/{len(data)}"))
    return self._send(206, data[first:last + 1], headers)

  def do_POST(self):  # pylint: disable=invalid-name
    root, key, query = self._route()
    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    path = os.path.join(root, key)
    if self._precondition_fails(path, query):
      return self._send(412)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.fake-gcs-upload"
    with open(tmp, "wb") as f:
      f.write(body)
    os.replace(tmp, path)
    return self._send(200, json.dumps(self._meta(root, key)).encode())

  def do_DELETE(self):  # pylint: disable=invalid-name
    root, key, query = self._route()
    path = os.path.join(root, key)
    if not os.path.isfile(path):
      return self._send(404)
    if self._precondition_fails(path, query):
      return self._send(412)
    os.remove(path)
    return self._send(204)


class FakeGcsServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, root: str):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.root = root


def install() -> FakeGcsServer:
  """Points epath and TensorStore at ``$FAKE_GCS_ROOT``; returns the server."""
  import fsspec  # pylint: disable=import-outside-toplevel
  for name in FakeGcsFileSystem.protocol:
    fsspec.register_implementation(name, FakeGcsFileSystem, clobber=True)
  server = FakeGcsServer(os.environ[ROOT_ENV])
  threading.Thread(target=server.serve_forever, daemon=True).start()
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = \
      f"http://127.0.0.1:{server.server_address[1]}"
  os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "fake-gcs-token"
  os.environ["EPATH_USE_TF"] = "false"
  # google-cloud-storage, which Orbax asks whether the bucket has folders.
  os.environ["STORAGE_EMULATOR_HOST"] = os.environ["TENSORSTORE_GCS_HTTP_URL"]
  return server


if __name__ == "__main__":
  install()
  sys.argv = ["experiments.run", *sys.argv[1:]]
  runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
