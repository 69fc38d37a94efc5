"""What the benchmark measures: one dataclass field per command-line option.

Each field carries its flag's help (and choices, and a flag name where it
differs from the field's), so `__main__` derives every flag from here and an
option is described once. Building a `Settings` defines no flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

from slora_jax.models import vit


def _option(default, help_text: str, *, choices=None, flag: str | None = None):
  return dataclasses.field(default=default, metadata={
      "help": help_text, "choices": choices, "flag": flag})


@dataclasses.dataclass
class Settings:
  """What to measure (the command-line flags)."""
  model: str = _option("vit_b16", "ViT size.", choices=list(vit.PRESETS))
  image_size: int = _option(224, "Input side in pixels.")
  patch_size: int = _option(16, "Patch side in pixels.")
  depth: int = _option(0, "Transformer blocks; 0: the preset's (fewer make a "
                       "quick smoke run).")
  batch: int = _option(4, "Train and eval batch size.")
  tasks: tuple[int, ...] = _option(
      (0, 1, 5, 10, 19, 49, 99),
      "Numbers t of stored earlier directions to time.")
  rank: int = _option(10, "LoRA rank (SD-LoRA and plain LoRA).")
  capacity: int = _option(
      100, "Stored-direction slots of the timed state (at least max(--tasks) "
      "+ 1 and --sim_tasks); fixed, so the step compiles once.")
  run_capacity: int = _option(
      20, "Also time t=0 with this capacity (what a run of that many tasks "
      "allocates); 0 skips it.")
  dtype: str = _option("float32", "ViT compute dtype.",
                       choices=list(vit.DTYPES))
  repeats: int = _option(3, "Timed rounds (median taken).")
  sim_tasks: int = _option(20, "Tasks of the simulated run (one step each).")
  num_classes: int = _option(200, "Head classes.")
  pipeline: bool = _option(True, "Measure the input pipeline.")
  pipeline_batch: int = _option(32, "Batch size of the input pipeline.")
  pipeline_batches: int = _option(6, "Timed input-pipeline batches.")
  workers: int = _option(4, "Input-pipeline threads.")
  json: str | None = _option(None, "Also save the table as JSON here.",
                             flag="json_out")
  torch: bool = _option(
      False, "Also time the PyTorch port (experiments/torch_reference.py) in "
      "a separate process, alternating with ours call by call: at --batch, "
      "at --torch_batch and at the demo config's size (--torch_demo).")
  torch_batch: int = _option(32, "Second batch size of the PyTorch "
                             "comparison; 0 skips it.")
  torch_demo: bool = _option(True, "With --torch, also compare at the demo "
                             "config's model and batch sizes.")
  adapter_form: str = _option(
      "activation", "How the SD-LoRA train step applies adapters (the "
      "sdlora plug-in's adapter_form, slora_jax/runner/methods/lora.py): on "
      "activations (default) or on the kernels.",
      choices=["activation", "weight"])
  profile: int = _option(
      0, "Also profile the t=min(--tasks) train step (jax.profiler) and list "
      "this many op groups by time (HLO op names, blocks merged).")

  def __post_init__(self):
    self.tasks = tuple(sorted({int(t) for t in self.tasks}))
    if not self.tasks or self.tasks[0] < 0:
      raise ValueError(f"tasks must be non-negative integers, got {self.tasks}")
    need = max(self.tasks[-1] + 1, self.sim_tasks)
    if self.capacity < need:
      raise ValueError(f"capacity {self.capacity} < {need}: it must hold "
                       "max(tasks) + 1 and sim_tasks directions")
    if self.sim_tasks < 1 or self.num_classes < self.sim_tasks:
      raise ValueError("need sim_tasks >= 1 and num_classes >= sim_tasks")
    if self.repeats < 1 or self.batch < 1:
      raise ValueError("repeats and batch must be at least 1")

  def vit_config(self) -> vit.ViTConfig:
    """The timed ViT: the preset at this size, depth and compute dtype."""
    extra = {"depth": self.depth} if self.depth else {}
    return vit.preset(self.model, image_size=self.image_size,
                      patch_size=self.patch_size,
                      dtype=vit.dtype_from_name(self.dtype), **extra)


@dataclasses.dataclass(frozen=True)
class Option:
  """One command-line option: its flag, the field it sets, default and help."""
  flag: str
  field: str
  default: Any
  help: str
  choices: list[str] | None


def options() -> Iterator[Option]:
  """Every `Settings` field as an option, in field order."""
  for f in dataclasses.fields(Settings):
    yield Option(f.metadata["flag"] or f.name, f.name, f.default,
                 f.metadata["help"], f.metadata["choices"])


def from_values(values: Mapping[str, Any]) -> Settings:
  """`Settings` from ``{flag name: value}`` (e.g. parsed flags)."""
  return Settings(**{o.field: values[o.flag] for o in options()})
