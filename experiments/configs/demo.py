"""The embedded default: Split Fashion-MNIST-R, a miniature of ImageNet-R.

The paper adapts a ViT pre-trained with labels on ImageNet-21k (photos, and
the drawings and paintings the web holds of many of its classes) to
ImageNet-R, renditions of classes it knows, learned class-incrementally. Here:

* the backbone: a 6-block ViT (width 128, 28 px, patch 7) trained with the
  ten garment labels on the first 50,000 Fashion-MNIST training images,
  clean and in each rendition style, committed as
  ``experiments/assets/demo_vit.safetensors`` (the manifest beside it gives
  the command that made it, its sha256 and accuracies);
* the data: Fashion-MNIST-R (slora_jax/runner/data/sources/renditions.py),
  renditions of the other 10,000 training images and of the test images in
  five styles; a class is a (garment, style) pair, 50 classes in 5 tasks of
  10, 200 training and 100 test images per class;
* the protocol: the reference's (per-task loss, task-agnostic evaluation of
  the merged weights), rank 4, 5 epochs per task, no random crops (a crop of
  a 28-px garment removes most of it).

Without Debian's ``dataset-fashion-mnist`` files the same pipeline runs on
generated images (and shows nothing about the method).
"""

import os

from experiments.configs import base

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
BACKBONE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "assets", "demo_vit.safetensors")


def get_config():
  c = base.base()
  c.seeds = (1993,)
  c.benchmark = "split_fashion_mnist_r"
  c.model.name = "custom"
  c.model.weights = ("demo ViT: garment labels on 50,000 Fashion-MNIST "
                     "images, clean and rendered "
                     "(experiments/make_demo_backbone.py)")
  c.model.init = "pretrained"
  c.model.checkpoint = BACKBONE
  c.model.image_size = 28
  c.model.patch_size = 7
  c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = (
      128, 6, 4, 256)
  if os.path.isdir(FASHION_MNIST):
    c.data.source = "renditions"
    c.data.name = "fashion_mnist_r"
    c.data.root = FASHION_MNIST
    c.data.renditions.classes = "pair"
    c.data.renditions.skip_train = 50000    # the backbone's training images
    c.data.num_classes = 50
    c.data.max_train_per_class = 200
    c.data.max_test_per_class = 100
  else:
    c.data.source = c.data.name = "synthetic"
    c.data.synthetic.num_classes = 50
    c.data.synthetic.train_per_class = 40
    c.data.synthetic.test_per_class = 20
  c.data.image_size = c.data.resize_size = 28
  c.data.crop_scale = (1.0, 1.0)
  c.data.init_cls = c.data.increment = 10
  c.data.num_tasks = 5
  c.data.num_workers = 2
  c.adapter.rank = 4
  c.train.batch_size = 64
  c.train.eval_batch_size = 250
  c.train.epochs = 5
  base.constant_lr(c, 0.05)
  c.checkpoint.every_steps = 50
  # InfLoRA (--config.method=inflora or all): its official optimiser (Adam,
  # lr 5e-4, the per-epoch cosine) at the demo's rank and epochs.
  c.methods.inflora.rank = c.adapter.rank
  c.methods.inflora.epochs = c.train.epochs
  return c
