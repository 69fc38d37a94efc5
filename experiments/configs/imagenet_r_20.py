"""ImageNet-R, 20 tasks of 10 classes (log ``InR-T10.log``: seed 1995, lr 0.01).

The official logs' file names for N=10 and N=20 are swapped (docs/semantics.md
§8.1): the N=20 run is ``InR-T10.log``.
"""

from experiments.configs import base


def get_config():
  c = base.base()
  c.benchmark = "imagenet_r_20"
  c.data.source = "folder"
  c.data.name = "imagenet_r"
  c.data.root = "./data/imagenet-r"
  c.data.init_cls = c.data.increment = 10
  base.constant_lr(c, 0.01)
  c.data.num_tasks = 20
  base.inflora_preset(c, "imagenet_r_20")
  return c
