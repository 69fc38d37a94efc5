"""The one boundary between an ``ml_collections`` config and the runner.

`from_config` reads and validates the whole ``ConfigDict`` once, into small
frozen dataclasses; every function below the entry point takes the section it
needs (`ModelSettings`, `DataSettings`, ...), never the config itself. The
defaults live in one place, ``experiments/configs/base.py``: here every field
is required, and a key that the config has but no dataclass knows (or the
reverse) is an error, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from slora_jax import policy as policy_lib
from slora_jax import targets as targets_lib
from slora_jax.models import vit as vit_lib
from slora_jax.runner import methods as methods_lib

__all__ = ["ConfigError", "PretrainSettings", "ModelSettings", "SyntheticSettings",
           "RenditionSettings", "DataSettings", "AdapterSettings", "TrainSettings",
           "CheckpointSettings", "Experiment", "from_config", "settings_dict"]


class ConfigError(ValueError):
  """A config value the runner cannot use (one line, names the field)."""


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
  """The demo backbone's label-free pre-training (`backbone.synthetic_pretrain`)."""
  task: str                   # 'rotation' | 'patterns'
  num_classes: int
  train_per_class: int
  steps: int
  batch_size: int
  lr: float
  seed: int
  cache_dir: str              # '': $SLORA_JAX_CACHE or ~/.cache/slora_jax


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The backbone: a preset or custom ViT and where its weights come from."""
  name: str                   # a key of vit.PRESETS, or 'custom'
  weights: str                # human-readable name of the weights
  init: str                   # 'pretrained' | 'random' | 'synthetic_pretrain'
  checkpoint: str             # local timm .safetensors or AugReg .npz
  image_size: int
  patch_size: int             # 0: the preset's (likewise the next four)
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  qkv: str
  dtype: str                  # a key of vit.DTYPES
  seed: int
  pretrain: PretrainSettings

  def vit_config(self) -> vit_lib.ViTConfig:
    """The `ViTConfig`: the preset with every non-zero field overriding it."""
    fields = {k: getattr(self, k) for k in (
        "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
              if getattr(self, k)}
    if self.qkv:
      fields["qkv"] = self.qkv
    fields["dtype"] = vit_lib.dtype_from_name(self.dtype)
    if self.name == "custom":
      return vit_lib.ViTConfig(**fields)
    return vit_lib.preset(self.name, **fields)


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
  """Generated images (`data.source='synthetic'`)."""
  num_classes: int
  train_per_class: int
  test_per_class: int
  seed: int


@dataclasses.dataclass(frozen=True)
class RenditionSettings:
  """Fashion-MNIST-R (`data.source='renditions'`, data/sources/renditions.py)."""
  styles: tuple[str, ...]
  classes: str                # 'garment' | 'pair' (garment, style)
  skip_train: int             # training images left out (the backbone's)


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the images come from, how they are split into tasks and read."""
  source: str                 # idx | renditions | folder | tfds | synthetic
  name: str
  root: str
  data_dir: str               # TFDS data_dir ('' : TFDS's default)
  tfds_split_mode: str
  tfds_split_seed: int
  image_size: int
  resize_size: int            # test resize before the center crop (0: 8/7·size)
  crop_scale: tuple[float, float]
  normalize: str
  num_classes: int            # 0: every class of the source
  init_cls: int
  increment: int              # 0: init_cls
  num_tasks: int              # >0: refuse data with fewer classes than needed
  shuffle_classes: bool
  max_train_per_class: int    # 0: all
  max_test_per_class: int
  num_workers: int
  prefetch: int
  worker_processes: int       # >0: grain processes for folder/tfds sources
  synthetic: SyntheticSettings
  renditions: RenditionSettings

  @property
  def test_resize(self) -> int:
    return self.resize_size or int(round(self.image_size * 256 / 224))


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
  """Rank, capacity, targets and `Policy` overrides (None: the semantics')."""
  rank: int
  rank_schedule: tuple[tuple[int, int], ...]
  capacity: int               # 0: one slot per task
  targets: str                # 'qv' or comma-separated kernel path regexes
  magnitude_init: float | None
  current_norm_floor: float | None
  kd_threshold: float | None
  kd_residual: str | None
  kd_offset: str | None

  def policy_overrides(self) -> dict:
    return {k: getattr(self, k) for k in (
        "magnitude_init", "current_norm_floor", "kd_threshold", "kd_residual",
        "kd_offset") if getattr(self, k) is not None}

  def rules(self, qkv: str) -> tuple[targets_lib.Rule, ...]:
    """The target rules: q and v of every block, or one per path regex."""
    if self.targets == "qv":
      return targets_lib.vit_qv_rules(qkv)
    return tuple(targets_lib.kernel(p) for p in self.targets.split(","))


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Batch sizes, epochs and the SGD schedule (task 0 has its own)."""
  batch_size: int
  eval_batch_size: int        # 0: batch_size
  epochs: int
  max_steps_per_task: int     # 0: no cap
  init_lr: float
  init_milestones: tuple[int, ...]
  init_lr_decay: float
  lr: float
  milestones: tuple[int, ...]
  lr_decay: float
  momentum: float

  def learning_rate(self, task: int, epoch: int) -> float:
    """The rate at ``epoch`` of ``task``: a step decay at the milestones."""
    base, milestones, gamma = (
        (self.init_lr, self.init_milestones, self.init_lr_decay) if task == 0
        else (self.lr, self.milestones, self.lr_decay))
    return float(base * gamma ** sum(epoch >= m for m in milestones))


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  keep: int
  every_steps: int


@dataclasses.dataclass(frozen=True)
class LogSettings:
  """Where metrics go (`slora_jax.runner.writers`); never a number's value."""
  tensorboard: bool           # WORKDIR/seed_<seed>/tensorboard/
  wandb_project: str          # '': no Weights & Biases run
  wandb_entity: str           # '': W&B's default entity
  wandb_mode: str             # '' (W&B's default, WANDB_MODE) | online | offline


# A config saved before the log section existed (results.json, config.json of
# older runs) reads as TensorBoard only, what those runs wrote.
_LOG_DEFAULTS = {"tensorboard": True, "wandb_project": "", "wandb_entity": "",
                 "wandb_mode": ""}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A whole validated config. ``raw`` is the config as a plain dict (for
  results.json); nothing reads settings from it."""
  method: methods_lib.Method
  methods: dict               # {name: settings dataclass} (methods.<name>)
  semantics: str
  seeds: tuple[int, ...]
  benchmark: str
  log_every_steps: int
  distributed: bool
  stop_after_steps: int       # >0: leave after that many steps (tests)
  dry_run: bool               # 2 steps and 2 eval batches per task; a report
  dry_run_batch_size: int     # >0: the train batch a dry run executes
  dry_run_image_size: int     # >0: the image size a dry run executes at
  model: ModelSettings
  data: DataSettings
  adapter: AdapterSettings
  train: TrainSettings
  checkpoint: CheckpointSettings
  log: LogSettings
  raw: dict = dataclasses.field(compare=False, repr=False)

  def policy(self) -> policy_lib.Policy:
    """The semantics' `Policy` with the config's and the method's overrides."""
    return policy_lib.get_policy(self.semantics, **{
        **self.adapter.policy_overrides(), **self.method.policy_overrides()})

  def rank(self, task: int) -> int:
    """The rank of the direction trained at ``task``."""
    if self.method.rank_reduction:
      return policy_lib.rank_schedule(task, self.adapter.rank_schedule)
    return self.adapter.rank


def _convert(tp, value, where: str):
  """``value`` as type ``tp`` (tuples from lists, ints from floats refused)."""
  origin = typing.get_origin(tp)
  if origin in (types.UnionType, typing.Union):      # X | None
    if value is None:
      return None
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return _convert(inner, value, where)
  if origin is tuple:
    args = typing.get_args(tp)
    items = list(value)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, where) for v in items)
    if len(items) != len(args):
      raise ConfigError(f"{where} must have {len(args)} values, got {value!r}")
    return tuple(_convert(a, v, where) for a, v in zip(args, items))
  if dataclasses.is_dataclass(tp):
    return _build(tp, value, where)
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where} must be True or False, got {value!r}")
    return value
  if tp is int and isinstance(value, float) and not value.is_integer():
    raise ConfigError(f"{where} must be an integer, got {value!r}")
  try:
    return tp(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{where} must be a {tp.__name__}, got {value!r}") from None


def _build(cls, node, where: str):
  hints = typing.get_type_hints(cls)
  fields = [f.name for f in dataclasses.fields(cls) if f.name != "raw"]
  keys = set(node.keys())
  missing = [f for f in fields if f not in keys]
  unknown = sorted(keys - set(fields))
  prefix = f"{where}." if where else ""
  if missing or unknown:
    raise ConfigError(
        f"config section {where or '(top)'} does not match the runner's "
        f"settings: missing {[prefix + m for m in missing]}, unknown "
        f"{[prefix + u for u in unknown]}; start configs from "
        "experiments/configs/base.py")
  return cls(**{f: _convert(hints[f], node[f], prefix + f) for f in fields})


def from_config(config) -> Experiment:
  """Validates ``config`` (a ConfigDict or dict) into an `Experiment`.

  Raises:
    ConfigError: one line naming the field that is wrong or missing.
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  d = dict(config.items())
  d.setdefault("log", dict(_LOG_DEFAULTS))
  # A config saved before the methods section existed reads as the defaults.
  methods_node = dict(d.pop("methods", None) or {})
  try:
    method = methods_lib.get_method(str(d.pop("method", "")))
    policy_lib.get_policy(str(d.get("semantics", "")))
  except ValueError as e:
    raise ConfigError(f"{e} (--config.method / --config.semantics)") from None
  hints = typing.get_type_hints(Experiment)
  names = [f.name for f in dataclasses.fields(Experiment)
           if f.name not in ("method", "methods", "raw")]
  unknown = sorted(set(d) - set(names))
  missing = [n for n in names if n not in d]
  if unknown or missing:
    raise ConfigError(f"config does not match the runner's settings: missing "
                     f"{missing}, unknown {unknown}; start configs from "
                     "experiments/configs/base.py")
  values = {n: _convert(hints[n], d[n], n) for n in names}
  exp = Experiment(method=method, methods=_method_settings(methods_node),
                   raw=raw, **values)
  _validate(exp)
  return exp


def _method_settings(node: dict) -> dict:
  """Each registered method's settings from ``methods.<name>`` (defaults
  for a section the config lacks); an unknown section is an error."""
  out = {}
  unknown = sorted(set(node) - set(methods_lib.METHODS))
  if unknown:
    raise ConfigError(f"config section methods has {unknown}, which name no "
                      f"method; the methods are {', '.join(methods_lib.METHODS)}")
  for name, defaults in methods_lib.default_settings().items():
    section = node.get(name)
    if section is None:
      out[name] = defaults
    else:
      out[name] = _build(type(defaults), dict(section), f"methods.{name}")
  return out


# --- values that cannot be right ----------------------------------------------

def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _validate(exp: Experiment) -> None:
  """Refuses values no run can use, before any data is read or compiled."""
  _check_seeds(exp.seeds)
  _check_train(exp.train)
  c = exp.checkpoint
  # keep=0 would keep no checkpoint, so nothing could ever be resumed.
  _require(c.keep >= 1, f"checkpoint.keep must be at least 1 (0 keeps no "
           f"checkpoint to resume from), got {c.keep}")
  _require(c.every_steps >= 1, "checkpoint.every_steps must be at least 1, "
           f"got {c.every_steps}")
  _require(exp.log.wandb_mode in ("", "online", "offline"),
           "log.wandb_mode must be '', 'online' or 'offline', got "
           f"{exp.log.wandb_mode!r}")
  _check_adapter(exp, _vit_config(exp.model))
  exp.method.check(exp)


def _check_seeds(seeds: tuple[int, ...]) -> None:
  _require(bool(seeds), "seeds is empty, so nothing would run; give at least "
           "one, e.g. --config.seeds='(1993,)'")
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  _require(not repeated, f"seeds repeats {', '.join(map(str, repeated))} "
           f"(in {seeds}): a repeated seed is the same run, not another "
           "sample; give distinct seeds")


def _check_train(t: TrainSettings) -> None:
  for name in ("init_lr", "lr"):
    v = getattr(t, name)
    _require(math.isfinite(v) and v > 0, f"train.{name} must be a positive "
             f"number, got {v!r}")
  for name in ("init_lr_decay", "lr_decay"):
    v = getattr(t, name)
    _require(math.isfinite(v) and v >= 0, f"train.{name} must be a number "
             f">= 0, got {v!r}")
  _require(0 <= t.momentum < 1, "train.momentum must be in [0, 1), got "
           f"{t.momentum!r}")
  for name in ("batch_size", "epochs"):
    _require(getattr(t, name) >= 1, f"train.{name} must be at least 1, got "
             f"{getattr(t, name)}")
  for name in ("eval_batch_size", "max_steps_per_task"):
    _require(getattr(t, name) >= 0, f"train.{name} must be >= 0 (0: the "
             f"default), got {getattr(t, name)}")


def _vit_config(m: ModelSettings) -> vit_lib.ViTConfig:
  _require(m.name == "custom" or m.name in vit_lib.PRESETS,
           f"model.name must be 'custom' or one of {sorted(vit_lib.PRESETS)}, "
           f"got {m.name!r}")
  _require(m.dtype in vit_lib.DTYPES, f"model.dtype must be one of "
           f"{sorted(vit_lib.DTYPES)}, got {m.dtype!r}")
  try:
    return m.vit_config()
  except (TypeError, ValueError) as e:
    # e.g. a patch size that does not divide the image size
    raise ConfigError(f"the model settings make no ViT: {e}; change "
                      "--config.model.image_size, patch_size, width, "
                      "num_heads or qkv") from None


def _check_adapter(exp: Experiment, cfg: vit_lib.ViTConfig) -> None:
  """Targets that match kernels, ranks from 1 to the narrowest one's width."""
  a = exp.adapter
  try:
    found = targets_lib.find_targets(vit_lib.abstract_params(cfg),
                                     a.rules(cfg.qkv))
  except ValueError as e:
    raise ConfigError(f"{e} (--config.adapter.targets={a.targets})") from None
  narrow = min(found, key=lambda t: min(t.d_in, t.d_out))
  limit = min(narrow.d_in, narrow.d_out)
  if exp.method.rank_reduction:
    _require(any(start == 0 for start, _ in a.rank_schedule),
             "adapter.rank_schedule must give the rank of task 0 (a pair "
             f"(0, rank)), got {a.rank_schedule}")
    ranks = [("a rank in adapter.rank_schedule", r) for _, r in a.rank_schedule]
  else:
    ranks = [("adapter.rank", a.rank)]
  for field, r in ranks:
    _require(r >= 1, f"{field} must be at least 1, got {r}")
    _require(r <= limit, f"{field} is {r}, more than the adapted map "
             f"{narrow.name} ({narrow.d_in} -> {narrow.d_out}) can use; give "
             f"a rank of at most {limit}")


def settings_dict(exp: Experiment) -> dict:
  """Every validated field as nested plain values (the method by its name)."""
  out = {"method": exp.method.name}
  mine = exp.methods.get(exp.method.name)
  if mine is not None:          # only the running method's section counts
    out["methods"] = {exp.method.name: dataclasses.asdict(mine)}
  for f in dataclasses.fields(exp):
    if f.name not in ("method", "methods", "raw"):
      v = getattr(exp, f.name)
      out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
  return out
