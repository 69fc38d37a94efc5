"""CIFAR-100 at 224 px, 10 tasks of 10 classes (log C100.log: seed 1994, lr 0.008).

The reference reads torchvision's CIFAR-100; TFDS's ``cifar100`` has the same
50k/10k split and label ids.
"""

from experiments.configs import base


def get_config():
  c = base.base()
  c.benchmark = "cifar100_10"
  c.data.source = "tfds"
  c.data.name = "cifar100"
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.init_cls = c.data.increment = 10
  base.constant_lr(c, 0.008)
  c.data.num_tasks = 10
  base.inflora_preset(c, "cifar100_10")
  return c
