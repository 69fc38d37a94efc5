"""Split Fashion-MNIST, 5 tasks of 2 classes, on a label-free backbone (offline).

The demo before Fashion-MNIST-R (experiments/configs/demo.py); kept as the
small, fast end-to-end config of the runner's tests.

The backbone is a small ViT pre-trained for about two minutes without any
label: it learns to tell which of four rotations was applied to 8,192 of the
training images (self-supervised; cached under ~/.cache/slora_jax). The
continual learner then sees the labels task by task. Without the Debian
``dataset-fashion-mnist`` files the demo uses generated data instead.
"""

import os

from experiments.configs import base

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def get_config():
  c = base.base()
  c.seeds = (1993,)
  c.benchmark = "split_fashion_mnist_5"
  c.model.name = "custom"
  c.model.weights = "demo ViT, self-supervised rotation pre-training"
  c.model.init = "synthetic_pretrain"
  c.model.image_size = 32
  c.model.patch_size = 8
  c.model.width = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 256
  c.model.pretrain.task = "rotation"
  c.model.pretrain.steps = 400
  if os.path.isdir(FASHION_MNIST):
    c.data.source = "idx"
    c.data.name = "fashion_mnist"
    c.data.root = FASHION_MNIST
  else:
    c.data.source = "synthetic"
    c.data.name = "synthetic"
  c.data.image_size = 32
  c.data.resize_size = 32
  # Crops of 5% of a 28-px image (the reference's ImageNet setting) leave
  # almost nothing of a garment.
  c.data.crop_scale = (0.5, 1.0)
  c.data.init_cls = c.data.increment = 2
  c.data.max_train_per_class = 1000
  c.data.max_test_per_class = 500
  c.data.num_workers = 2
  c.adapter.rank = 4
  c.train.batch_size = 64
  c.train.eval_batch_size = 250
  c.train.epochs = 2
  base.constant_lr(c, 0.05)
  c.checkpoint.every_steps = 20
  c.data.num_tasks = 5
  return c
