"""README's library example runs as written (with a smaller ViT and images)."""

import os
import re

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = text.split("## The library by example", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains_and_merges():
  code = _example()
  small = "vit.vit_ti16(image_size=32, patch_size=8, depth=2)"
  assert "vit.vit_b16()" in code and "224, 224" in code
  code = code.replace("vit.vit_b16()", small).replace("224, 224", "32, 32")
  env = {}
  exec(compile(code, "README.md", "exec"), env)   # pylint: disable=exec-used
  adapters, head, logits = env["adapters"], env["head"], env["logits"]
  assert logits.shape == (4, 100)
  assert int(adapters.frozen["num_stored"]) == 1
  # One SGD step moved the current B away from zero, so the stored direction
  # and the merged kernels differ from the backbone's.
  assert float(np.abs(adapters.frozen["previous"]["blocks_0/attn/qkv/kernel[q]"]["B"]).max()) > 0
  w0 = env["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
  w = env["merged"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert float(jax.numpy.abs(w - w0).max()) > 0
  # The head is trainable too: its biases left their zero init.
  assert not np.allclose(np.asarray(head["bias"]), 0)


def test_ci_runs_readmes_test_command_in_a_fresh_venv():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  block = readme.split("## Two commands", 1)[1].split("```sh\n", 1)[1]
  test_command = block.split("```", 1)[0].strip().splitlines()[-1]
  assert "pytest" in test_command
  ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
  lines = [line.strip() for line in ci.splitlines()]
  assert test_command in lines, "README's test command is not in .ci/run"
  before = lines[:lines.index(test_command)]
  assert any(l.startswith("python3 -m venv") for l in before)
  assert any("/bin/activate" in l for l in before)
