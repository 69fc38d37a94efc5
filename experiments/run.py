"""The one entry point: runs a class-incremental experiment from a config.

  python -m experiments.run                       # the embedded offline demo
  python -m experiments.run --config=experiments/configs/imagenet_r_10.py \
      --config.model.checkpoint=/path/model.safetensors --workdir=runs/inr10

Rerunning with the same ``--workdir`` resumes from the latest checkpoint.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                     "demo.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEMO, "Experiment config file (default: the offline demo).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (checkpoints, results.json, plots, "
    "TensorBoard events). Default: runs/<config name>.")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from slora_jax import errors
  from slora_jax import train

  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  logging.info("config:\n%s", config)
  try:
    train.train_and_evaluate(config, workdir)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  std_logging.getLogger("absl").setLevel(std_logging.INFO)
  app.run(main)
