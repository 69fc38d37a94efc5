"""DomainNet, 5 tasks of 69 classes.

No logged run exists and the reference cannot load DomainNet (docs/semantics.md §6.1); the
schedule is ``sdlora_dom.json``'s: 10 epochs, lr 0.02, milestones [4, 6, 8]
with gamma 0.005 (effectively 4 epochs of training).
"""

from experiments.configs import base


def get_config():
  c = base.base()
  c.benchmark = "domainnet_5"
  c.data.source = "folder"
  c.data.name = "domainnet"
  c.data.root = "./data/domainnet"
  c.data.init_cls = c.data.increment = 69
  c.train.epochs = 10
  c.train.init_lr = c.train.lr = 0.02
  c.train.init_milestones = c.train.milestones = (4, 6, 8)
  c.train.init_lr_decay = c.train.lr_decay = 0.005
  c.data.num_tasks = 5
  base.inflora_preset(c, "domainnet_5")
  return c
