"""Defaults shared by every experiment config.

Each config file in this folder starts from `base()` and changes what its
benchmark needs; every field can be overridden on the command line
(``--config.train.batch_size=64``). Values follow the PyTorch reference's
logged runs (docs/semantics.md §5) unless a comment says otherwise.
"""

import ml_collections
from ml_collections import config_dict

# The paper reports the mean of five runs; the seeds are the reference's
# 1993-1997 convention.
PAPER_SEEDS = (1993, 1994, 1995, 1996, 1997)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # sdlora | sdlora_rr | sdlora_kd | seq_lora (one LoRA fine-tuned on every task
  # in turn) | joint (one LoRA on all classes at once: the upper bound).
  c.method = "sdlora"
  # 'reference': what the official code does (magnitudes 0.8, re-created per
  # task, factor-norm normalisation); 'paper': what the paper writes.
  c.semantics = "reference"
  c.seeds = PAPER_SEEDS
  # Key into slora_jax/runner/reference_data/reference_numbers.json for `compare`.
  c.benchmark = ""
  c.log_every_steps = 10
  c.distributed = False          # jax.distributed.initialize() (multi-host)
  c.stop_after_steps = 0         # >0: leave after that many steps (preemption tests)

  c.model = ml_collections.ConfigDict()
  c.model.name = "vit_b16"       # vit_b16 | vit_s16 | vit_ti16 | custom
  c.model.weights = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
  c.model.init = "pretrained"    # pretrained | random | synthetic_pretrain
  c.model.checkpoint = ""        # local model.safetensors (timm) or .npz (AugReg)
  c.model.image_size = 224
  c.model.patch_size = 0         # 0: the preset's value
  c.model.width = 0
  c.model.depth = 0
  c.model.num_heads = 0
  c.model.mlp_dim = 0
  c.model.qkv = "fused"
  c.model.dtype = "float32"      # compute dtype; 'bfloat16' keeps f32 params
  c.model.seed = 0
  # model.init='synthetic_pretrain' (see slora_jax/runner/backbone.py): task is
  # 'rotation' (self-supervised on num_classes*train_per_class unlabeled
  # training images of the run's data) or 'patterns' (generated classes).
  c.model.pretrain = ml_collections.ConfigDict(dict(
      task="patterns", num_classes=32, train_per_class=256, steps=600,
      batch_size=128, lr=1e-3, seed=7, cache_dir=""))

  c.data = ml_collections.ConfigDict()
  c.data.source = "folder"       # folder | tfds | idx | synthetic
  c.data.name = ""
  c.data.root = ""               # image folders / IDX files
  c.data.data_dir = ""           # TFDS data_dir
  c.data.tfds_split_mode = "reference"
  c.data.tfds_split_seed = 0     # test_80_20 only: the split's seed
  c.data.image_size = 224
  c.data.resize_size = 256       # test: bicubic resize, then center crop
  c.data.crop_scale = (0.05, 1.0)  # train: RandomResizedCrop's area range
  c.data.normalize = "none"      # none (the reference feeds [0,1]) | imagenet | inception
  c.data.num_classes = 0         # 0: every class of the source
  c.data.init_cls = 20
  c.data.increment = 20
  c.data.num_tasks = 0           # >0: refuse data with fewer classes than that needs
  c.data.shuffle_classes = True
  c.data.max_train_per_class = 0 # 0: all
  c.data.max_test_per_class = 0
  c.data.num_workers = 8
  c.data.prefetch = 2
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_classes=10, train_per_class=200, test_per_class=100, seed=0))

  c.adapter = ml_collections.ConfigDict()
  c.adapter.rank = 10
  c.adapter.rank_schedule = ((0, 10), (4, 8), (8, 6))   # sdlora_rr
  c.adapter.capacity = 0         # stored directions; 0: the number of tasks
  c.adapter.targets = "qv"       # q and v of every block, as the reference
  # Policy overrides (None: the semantics' default, see slora_jax/policy.py).
  c.adapter.magnitude_init = config_dict.placeholder(float)
  c.adapter.current_norm_floor = config_dict.placeholder(float)
  c.adapter.kd_threshold = config_dict.placeholder(float)
  c.adapter.kd_residual = config_dict.placeholder(str)
  c.adapter.kd_offset = config_dict.placeholder(str)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.eval_batch_size = 128
  c.train.epochs = 20
  c.train.max_steps_per_task = 0 # 0: no cap (CI and demos shorten runs)
  c.train.init_lr = 0.01         # task 0
  c.train.init_milestones = (10000,)
  c.train.init_lr_decay = 0.0
  c.train.lr = 0.01              # tasks >= 1
  c.train.milestones = (10000,)
  c.train.lr_decay = 0.0
  c.train.momentum = 0.9

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2
  c.checkpoint.every_steps = 200
  return c


def constant_lr(c, lr):
  """The logged runs' schedule: one rate, milestones never reached."""
  c.train.init_lr = c.train.lr = lr
  c.train.init_milestones = c.train.milestones = (10000,)
  c.train.init_lr_decay = c.train.lr_decay = 0.0
  return c
