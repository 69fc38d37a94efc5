"""ImageNet-R, 10 tasks of 20 classes (log InR-T10.log: seed 1995, lr 0.01)."""

from experiments.configs import base


def get_config():
  c = base.base()
  c.benchmark = "imagenet_r_10"
  c.data.source = "folder"       # the reference's pre-split train/test folders
  c.data.name = "imagenet_r"
  c.data.root = "./data/imagenet-r"
  c.data.init_cls = c.data.increment = 20
  base.constant_lr(c, 0.01)
  c.data.num_tasks = 10
  return c
