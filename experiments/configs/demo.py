"""The embedded default: Split Fashion-MNIST, 5 tasks of 2 classes, offline.

The backbone is a small ViT pre-trained for a few minutes on generated images
(cached under ~/.cache/slora_jax), never on Fashion-MNIST. Without the Debian
``dataset-fashion-mnist`` files the demo falls back to generated data.
"""

import os

from experiments.configs import base

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def get_config():
  c = base.base()
  c.seeds = (1993,)
  c.benchmark = "split_fashion_mnist_5"
  c.model.name = "custom"
  c.model.weights = "demo ViT pre-trained on generated images"
  c.model.init = "synthetic_pretrain"
  c.model.image_size = 32
  c.model.patch_size = 4
  c.model.width = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 256
  if os.path.isdir(FASHION_MNIST):
    c.data.source = "idx"
    c.data.name = "fashion_mnist"
    c.data.root = FASHION_MNIST
  else:
    c.data.source = "synthetic"
    c.data.name = "synthetic"
  c.data.image_size = 32
  c.data.resize_size = 32
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
