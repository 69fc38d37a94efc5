"""Defaults shared by every experiment config.

Each config file in this folder starts from `base()` and changes what its
benchmark needs; every field can be overridden on the command line
(``--config.train.batch_size=64``). Values follow the PyTorch reference's
logged runs (docs/semantics.md §5) unless a comment says otherwise.
"""

import dataclasses

import ml_collections

from slora_jax.runner import methods as methods_lib
from ml_collections import config_dict

# The paper reports the mean of five runs; the seeds are the reference's
# 1993-1997 convention.
PAPER_SEEDS = (1993, 1994, 1995, 1996, 1997)


def base() -> ml_collections.ConfigDict:
  """Every field the runner reads (slora_jax/runner/config.py), with defaults."""
  c = ml_collections.ConfigDict()
  # A key of slora_jax/runner/methods/__init__.py's METHODS: sdlora |
  # sdlora_rr | sdlora_kd | seq_lora (one LoRA fine-tuned on every task in
  # turn) | linear_probe | joint (one LoRA on all classes at once: the upper
  # bound) | inflora | simplecil; 'all' runs each in turn.
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
  # The whole loop with 2 train steps and 2 eval batches per task, then the
  # step's memory, FLOPs and projected wall time (slora_jax/runner/dry_run.py).
  c.dry_run = False
  c.dry_run_batch_size = 0       # >0: the train batch it executes (CPU)
  c.dry_run_image_size = 0       # >0: the image size it executes at (CPU)
  c.model = _model()
  c.data = _data()
  c.adapter = _adapter()
  c.train = _train()
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, every_steps=200))
  # Metric writers: TensorBoard events, and a W&B run when wandb_project is
  # set (wandb_mode: '' = W&B's default / WANDB_MODE, 'online', 'offline').
  c.log = ml_collections.ConfigDict(dict(
      tensorboard=True, wandb_project="", wandb_entity="", wandb_mode=""))
  # Each method's own settings (methods.<name>), defaults from its module;
  # only the running method's section is read (and fingerprinted).
  c.methods = ml_collections.ConfigDict({
      name: dataclasses.asdict(settings)
      for name, settings in methods_lib.default_settings().items()})
  return c


def _model() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.name = "vit_b16"       # vit_b16 | vit_s16 | vit_ti16 | custom
  m.weights = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
  m.init = "pretrained"    # pretrained | random | synthetic_pretrain
  m.checkpoint = ""        # local model.safetensors (timm) or .npz (AugReg)
  m.image_size = 224
  m.patch_size = 0         # 0: the preset's value
  m.width = 0
  m.depth = 0
  m.num_heads = 0
  m.mlp_dim = 0
  m.qkv = "fused"
  m.dtype = "float32"      # compute dtype; 'bfloat16' keeps f32 params
  m.seed = 0
  # model.init='synthetic_pretrain' (see slora_jax/runner/backbone.py): task is
  # 'rotation' (self-supervised on num_classes*train_per_class unlabeled
  # training images of the run's data) or 'patterns' (generated classes).
  m.pretrain = ml_collections.ConfigDict(dict(
      task="patterns", num_classes=32, train_per_class=256, steps=600,
      batch_size=128, lr=1e-3, seed=7, cache_dir=""))
  return m


def _data() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "folder"       # folder | tfds | idx | renditions | synthetic
  d.name = ""
  d.root = ""               # image folders / IDX files
  d.data_dir = ""           # TFDS data_dir
  d.tfds_split_mode = "reference"
  d.tfds_split_seed = 0     # test_80_20 only: the split's seed
  d.image_size = 224
  d.resize_size = 256       # test: bicubic resize, then center crop
  d.crop_scale = (0.05, 1.0)  # train: RandomResizedCrop's area range
  d.normalize = "none"      # none (the reference feeds [0,1]) | imagenet | inception
  d.num_classes = 0         # 0: every class of the source
  d.init_cls = 20
  d.increment = 20
  d.num_tasks = 0           # >0: refuse data with fewer classes than that needs
  d.shuffle_classes = True
  d.max_train_per_class = 0 # 0: all
  d.max_test_per_class = 0
  d.num_workers = 8         # decoding threads (worker_processes = 0)
  d.prefetch = 2            # batches ready ahead (per worker process)
  # >0: folder and TFDS sources assemble batches in this many grain worker
  # processes (the same batches as threads, see data/processes.py); 0: threads
  # in this process. The in-memory sources (idx, renditions, synthetic) always
  # use threads: their decoding is trivial and a worker's start-up (~2 s) is not.
  d.worker_processes = 0
  d.synthetic = ml_collections.ConfigDict(dict(
      num_classes=10, train_per_class=200, test_per_class=100, seed=0))
  # data.source='renditions': Fashion-MNIST-R over the IDX files in data.root.
  d.renditions = ml_collections.ConfigDict(dict(
      styles=("inverted", "edges", "texture", "elastic", "sketch"),
      classes="garment", skip_train=0))
  return d


def _adapter() -> ml_collections.ConfigDict:
  a = ml_collections.ConfigDict()
  a.rank = 10
  a.rank_schedule = ((0, 10), (4, 8), (8, 6))   # sdlora_rr
  a.capacity = 0         # stored directions; 0: the number of tasks
  a.targets = "qv"       # q and v of every block, as the reference
  # Policy overrides (None: the semantics' default, see slora_jax/policy.py).
  a.magnitude_init = config_dict.placeholder(float)
  a.current_norm_floor = config_dict.placeholder(float)
  a.kd_threshold = config_dict.placeholder(float)
  a.kd_residual = config_dict.placeholder(str)
  a.kd_offset = config_dict.placeholder(str)
  return a


def _train() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = 128
  t.eval_batch_size = 128
  t.epochs = 20
  t.max_steps_per_task = 0 # 0: no cap (CI and demos shorten runs)
  t.init_lr = 0.01         # task 0
  t.init_milestones = (10000,)
  t.init_lr_decay = 0.0
  t.lr = 0.01              # tasks >= 1
  t.milestones = (10000,)
  t.lr_decay = 0.0
  t.momentum = 0.9
  return t


def inflora_preset(c, benchmark: str):
  """InfLoRA's hyper-parameters of its official ViT-B/16 run of
  ``benchmark`` (`slora_jax.runner.methods.inflora.PRESETS`), read when
  ``--config.method=inflora`` (or ``all``)."""
  c.methods.inflora.update(dataclasses.asdict(
      methods_lib.inflora.PRESETS[benchmark]))
  return c


def constant_lr(c, lr):
  """The logged runs' schedule: one rate, milestones never reached."""
  t = c.train
  t.init_lr = t.lr = lr
  t.init_milestones = t.milestones = (10000,)
  t.init_lr_decay = t.lr_decay = 0.0
  return c
