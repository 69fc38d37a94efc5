"""ImageNet-R, 20 tasks of 10 classes (log InR-T20.log: lr 0.008).

The log's header says seed 1995 but it printed the seed-1996 class order
(SD-LoRA-SPEC.md §5); use ``--config.seeds='(1996,)'`` to reproduce that log.
"""

from experiments.configs import base


def get_config():
  c = base.base()
  c.benchmark = "imagenet_r_20"
  c.data.source = "folder"
  c.data.name = "imagenet_r"
  c.data.root = "./data/imagenet-r"
  c.data.init_cls = c.data.increment = 10
  base.constant_lr(c, 0.008)
  c.data.num_tasks = 20
  return c
