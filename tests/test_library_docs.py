"""docs/library.md's three examples.

They run as written in tests/test_packaging.py, from the installed wheel in a
fresh venv without TensorFlow or torch (run here too, they would only double
the suite's time).
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def examples() -> dict[str, str]:
  """The ``python`` block of each "## Example" section, by its title."""
  text = open(os.path.join(ROOT, "docs", "library.md"), encoding="utf-8").read()
  out = {}
  for section in text.split("\n## Example ")[1:]:
    title = section.split("\n", 1)[0]
    out[title] = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  return out


def test_three_examples():
  assert [t.split(":")[0] for t in examples()] == ["1", "2", "3"]
