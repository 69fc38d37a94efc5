"""Speed of the SD-LoRA train step, merged evaluation and the input pipeline.

  python -m experiments.benchmark                    # ViT-B/16, 224 px, batch 4
  python -m experiments.benchmark --model=vit_ti16 --image_size=32 --batch=2 \
      --tasks=0,1,5 --repeats=1                      # smoke run (CI)

Everything is measured in this one process and printed as one table. Times
are medians over ``--repeats`` rounds after one warm-up round; the variants
being compared (every t, plain LoRA; plain and merged evaluation) run
interleaved inside each round, so slow drift of a shared machine cancels out
of their ratios. ``--json_out=PATH`` saves the table. See docs/benchmark.md.
"""

from __future__ import annotations

from absl import flags

from experiments import tool
from experiments.benchmark import settings as settings_lib
from experiments.benchmark.run import run
from experiments.benchmark.table import report, save_json


def _define(option: settings_lib.Option) -> None:
  # The flag's kind follows the field's default (json_out, default None, is
  # the one string without a default).
  name, default, text = option.flag, option.default, option.help
  if option.choices:
    flags.DEFINE_enum(name, default, option.choices, text)
  elif isinstance(default, bool):
    flags.DEFINE_bool(name, default, text)
  elif isinstance(default, int):
    flags.DEFINE_integer(name, default, text)
  elif isinstance(default, tuple):
    flags.DEFINE_list(name, [str(v) for v in default], text)
  else:
    flags.DEFINE_string(name, default, text)


# Defined here only, so importing the package (tests) defines no flag.
for _option in settings_lib.options():
  _define(_option)


def main(argv):
  tool.positional(argv)
  settings = settings_lib.from_values(flags.FLAGS.flag_values_dict())
  result = run(settings)
  print(report(result), flush=True)
  if settings.json:
    save_json(result, settings.json)


if __name__ == "__main__":
  tool.run(main)
