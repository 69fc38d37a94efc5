"""The smallest runnable config (tests): generated data, a 1-block random ViT.

Three tasks of two classes, four steps each, a checkpoint every two steps:
a whole run is a few seconds once compiled. Used as a file by the CLI tests
(``--config=tests/tiny_config.py``) and through `get_config` in process.
"""

from experiments.configs import base


def get_config():
  c = base.base()
  c.seeds = (1993,)
  c.model.name = "custom"
  c.model.init = "random"
  c.model.weights = ""
  c.model.image_size = 16
  c.model.patch_size = 8
  c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 16, 1, 2, 32
  c.data.source = c.data.name = "synthetic"
  c.data.image_size = c.data.resize_size = 16
  c.data.synthetic.update(dict(num_classes=6, train_per_class=16,
                               test_per_class=8))
  c.data.init_cls = c.data.increment = 2
  c.data.num_tasks = 3
  c.data.num_workers = 2
  c.adapter.rank = 2
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.epochs = 1
  c.train.max_steps_per_task = 4
  base.constant_lr(c, 0.05)
  c.checkpoint.every_steps = 2
  c.log_every_steps = 1
  return c
