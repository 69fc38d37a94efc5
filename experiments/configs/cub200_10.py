"""CUB-200, 10 tasks of 20 classes.

The reference ships no CUB config or log; we use the ImageNet-R schedule
(20 epochs, constant lr 0.01) and the reference's image-folder split.
"""

from experiments.configs import base


def get_config():
  c = base.base()
  c.benchmark = "cub200_10"
  c.data.source = "folder"
  c.data.name = "cub"
  c.data.root = "./data/cub"
  c.data.init_cls = c.data.increment = 20
  base.constant_lr(c, 0.01)
  c.data.num_tasks = 10
  return c
