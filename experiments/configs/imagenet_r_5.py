"""ImageNet-R, 5 tasks of 40 classes (log InR-T5.log: seed 1995, lr 0.01)."""

from experiments.configs import base


def get_config():
  c = base.base()
  c.benchmark = "imagenet_r_5"
  c.data.source = "folder"
  c.data.name = "imagenet_r"
  c.data.root = "./data/imagenet-r"
  c.data.init_cls = c.data.increment = 40
  base.constant_lr(c, 0.01)
  c.data.num_tasks = 5
  base.inflora_preset(c, "imagenet_r_5")
  return c
