"""Comparisons with the PyTorch reference: its recorded times and a live port."""

from __future__ import annotations

from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table, ratio, within

# The PyTorch reference (ViT-B/16, 224 px, batch 4, float32) on this machine.
REFERENCE_SETTING = dict(model="vit_b16", image_size=224, patch_size=16,
                         depth=0, batch=4, dtype="float32")
REFERENCE_STEP_S = {0: 2.34, 5: 2.53, 10: 2.84, 19: 3.28}
REFERENCE_EVAL_S = {0: 1.08, 5: 1.16, 10: 1.25, 19: 1.42}
REFERENCE_PLAIN_EVAL_S = 1.04


def is_reference_setting(s: Settings) -> bool:
  """Whether ``s`` times what the recorded reference times were taken at."""
  return all(getattr(s, k) == v for k, v in REFERENCE_SETTING.items())


def reference_rows(table: Table, s: Settings, step_s: dict,
                   merged_eval: dict) -> None:
  """Rows: our step and merged eval against the recorded reference times."""
  is_ref = is_reference_setting(s)
  for t, factor in ((19, 0.8), (0, 1.0)):
    ours, theirs = step_s.get(t), REFERENCE_STEP_S[t]
    table.check(f"step(t={t}) vs PyTorch reference ({theirs} s)",
                ratio(ours, theirs) if is_ref else None, "x",
                f"<= {factor} ({factor * theirs:.3g} s)",
                None if ours is None else ours <= factor * theirs,
                applicable=is_ref)
  for t in merged_eval:
    if t in REFERENCE_EVAL_S:
      table.add(f"merged eval(t={t}) vs PyTorch eval ({REFERENCE_EVAL_S[t]} s)",
                ratio(merged_eval[t], REFERENCE_EVAL_S[t]) if is_ref else None,
                "x")


def implied_peak_row(table: Table, s: Settings, eval_flops,
                     peak: dict[str, float]) -> None:
  """Row: the GFLOP/s the reference's plain eval time implies on this machine."""
  # A reference time is only comparable if this machine could run it at all.
  is_ref = is_reference_setting(s)
  implied = (eval_flops / REFERENCE_PLAIN_EVAL_S / 1e9
             if is_ref and eval_flops else None)
  best = max(peak.values())
  table.check(f"GFLOP/s the reference plain eval ({REFERENCE_PLAIN_EVAL_S} s) "
              "implies", implied, "GFLOP/s",
              f"<= 1.1 x matmul peak ({1.1 * best:.0f})",
              within(implied, 1.1 * best), applicable=is_ref)


def measured_rows(table: Table, s: Settings, cfg, step_s: dict,
                  merged_eval: dict, plain_eval) -> None:
  """Times the reference's arithmetic in PyTorch and compares, same process."""
  # torch is optional: only --torch needs it (the module fails without it).
  from experiments import torch_reference  # pylint: disable=import-outside-toplevel
  tasks = tuple(t for t in (0, 19) if t in step_s)
  ref = torch_reference.time_reference(
      tasks=tasks, batch=s.batch, repeats=s.repeats, depth=cfg.depth,
      width=cfg.width, heads=cfg.num_heads, mlp=cfg.mlp_dim,
      image_size=cfg.image_size, patch=cfg.patch_size,
      num_classes=s.num_classes, rank=s.rank)
  table.add(f"PyTorch {ref['version']} ({ref['threads']} threads): plain eval",
            ref["plain_eval"], "s")
  for t in tasks:
    table.add(f"PyTorch reference port: train step t={t}", ref["step"][t], "s")
    table.add(f"PyTorch reference port: eval forward t={t}", ref["eval"][t], "s")
  for t, factor in ((19, 0.8), (0, 1.0)):
    if t in tasks:
      r = ratio(step_s[t], ref["step"][t])
      table.check(f"step(t={t}) / PyTorch port step(t={t}), measured", r, "x",
                  f"<= {factor}", within(r, factor))
  r = ratio(plain_eval, ref["plain_eval"])
  table.add("plain eval / PyTorch plain eval, measured", r, "x")
  t_hi = max(merged_eval)
  if t_hi in ref["eval"]:
    table.add(f"merged eval(t={t_hi}) / PyTorch port eval(t={t_hi}), measured",
              ratio(merged_eval[t_hi], ref["eval"][t_hi]), "x")
