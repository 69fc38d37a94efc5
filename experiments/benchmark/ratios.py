"""The measured ratios, each against its target."""

from __future__ import annotations

from experiments.benchmark.evaluation import EvalTimes
from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table, ratio, within
from experiments.benchmark.train_steps import StepTimes


def ratio_rows(table: Table, s: Settings, times: StepTimes, ev: EvalTimes,
               pipeline: dict[str, float], consume) -> None:
  """Rows: step growth with t, SD-LoRA vs plain LoRA, merged vs plain eval,
  JPEG pipeline vs what the step consumes (``consume``, images/s)."""
  for t, bound in ((19, 1.05), (99, 1.15)):
    r = ratio(times.step.get(t), times.step.get(0))
    table.check(f"step(t={t}) / step(t=0)", r, "", f"<= {bound}",
                within(r, bound))
  r = ratio(times.step.get(0), times.lora)
  table.check(f"step(t=0) / plain LoRA step (capacity {s.capacity})", r, "",
              "<= 1.05", within(r, 1.05))
  if s.run_capacity:
    r = ratio(times.run, times.lora)
    table.check(f"step(t=0) / plain LoRA step (capacity {s.run_capacity})",
                r, "", "<= 1.05", within(r, 1.05))
  t_hi = s.tasks[-1]
  r = ratio(ev.merged[t_hi], ev.plain)
  table.check(f"merged eval (t={t_hi}) / plain ViT eval", r, "", "<= 1.02",
              within(r, 1.02))
  folder = next((v for k, v in pipeline.items() if k.startswith("JPEG")), None)
  r = ratio(folder, consume)
  table.check("JPEG pipeline / train step images/s", r, "",
              ">= 3 (at vit_s16)", within(r, 3, at_least=True),
              applicable=s.model == "vit_s16")
