"""Fixtures shared by the tests that run the entry point in a subprocess."""

import pytest

from cli_util import cli_env, outcome, run_cli, tail


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """An uninterrupted run of the tiny config (it also fills the compilation
  cache): what every interrupted and resumed run must reach."""
  workdir = tmp_path_factory.mktemp("reference")
  r = run_cli(cli_env(tmp_path_factory), workdir)
  assert r.returncode == 0, tail(r)
  return outcome(workdir)
