"""FLOP counts (by hand and XLA's), the machine's matmul peak, chip estimates."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark.settings import Settings
from experiments.benchmark.table import Table

# Public dense bf16 peaks per chip, for the accelerator estimates.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5e": 197.0, "H100 SXM": 989.0}
ESTIMATE_MFU = 0.4
ESTIMATE_BATCH = 128


def analytic_flops(cfg, batch: int, num_classes: int, stored: int,
                   rank: int, num_targets: int) -> dict[str, float]:
  """Matmul FLOPs of one train step at ``stored`` earlier directions, by hand.

  Forward: patch embedding, per block qkv/proj/fc1/fc2 and the two attention
  products, the head; the last block computes qkv for every token but its
  attention row, proj and MLP for the class token only. Backward: input
  gradients of every block (the linear layers once more, the attention
  products twice) and the head's gradients; no kernel gradient
  (`slora_jax.apply_with_adapters`). The current rank-r pair is counted as
  plain LoRA on activations costs it, 12·n·r·d per target and image (forward,
  dx, dA, dB). The stored directions cost, per target and step, 2·t·R·d² to
  merge into the kernel and min(4·N·d·t·R, 2·N·d² + 2·d²·t·R) for the
  magnitudes' gradient (N tokens in the batch), whatever the capacity.
  """
  n, d, m = cfg.seq_len, cfg.width, cfg.mlp_dim
  linear = 2 * n * (3 * d * d + d * d + 2 * d * m)
  attention = 2 * 2 * n * n * d
  # The last block: qkv on n tokens, everything after it on one.
  last_linear = 2 * n * 3 * d * d + 2 * (d * d + 2 * d * m)
  last_attention = 2 * 2 * n * d
  patch = 2 * cfg.num_patches * cfg.patch_size ** 2 * cfg.in_chans * d
  head = 2 * d * num_classes
  lora = num_targets * 12 * n * rank * d
  full = max(cfg.depth - 1, 0)
  last = 1 if cfg.depth else 0
  forward = (patch + full * (linear + attention)
             + last * (last_linear + last_attention) + head)
  backward = (full * (linear + 2 * attention)
              + last * (last_linear + 2 * last_attention) + 2 * head)
  tokens, cols = batch * n, stored * rank
  per_target = 2 * cols * d * d + min(4 * tokens * d * cols,
                                      2 * tokens * d * d + 2 * d * d * cols)
  fixed = num_targets * per_target if stored else 0
  return {"forward_per_image": float(forward),
          "train_per_image": float(forward + backward + lora),
          "delta_per_step": float(fixed),
          "train_step": float(batch * (forward + backward + lora) + fixed)}


def accelerator_estimates(flops: dict[str, float],
                          batch: int = ESTIMATE_BATCH,
                          mfu: float = ESTIMATE_MFU) -> dict[str, float]:
  """Estimated train images/s per chip from FLOPs and public bf16 peaks."""
  per_image = flops["train_per_image"] + flops["delta_per_step"] / batch
  return {chip: mfu * peak * 1e12 / per_image
          for chip, peak in PEAK_TFLOPS.items()}


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled program by XLA's cost analysis, None without one."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends have no cost model
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost["flops"]) if cost and "flops" in cost else None


def gflop(x):
  return None if x is None else x / 1e9


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """GFLOP/s of an f32 n³ matmul in XLA, numpy and (if installed) torch."""
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  out = {}
  f = jax.jit(lambda x: x @ x)
  x = jnp.asarray(a)
  calls = [("XLA", lambda: jax.block_until_ready(f(x))), ("numpy", lambda: a @ a)]
  try:  # PyTorch's BLAS (MKL on x86) sets what the reference can reach here.
    import torch  # pylint: disable=import-outside-toplevel
    ta = torch.from_numpy(a)
    calls.append(("torch", lambda: torch.mm(ta, ta)))
  except ImportError:
    pass
  for name, call in calls:
    call()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      call()
      best = min(best, time.perf_counter() - t0)
    out[name] = 2 * n ** 3 / best / 1e9
  return out


def train_step_rows(table: Table, s: Settings, cfg, num_targets: int,
                    step_compiled, lora_compiled,
                    step_s: dict[int, float | None]) -> None:
  """Rows: XLA's and the analytic FLOPs of the steps, and the rates achieved."""
  t_lo, t_hi = s.tasks[0], s.tasks[-1]
  hand = {t: analytic_flops(cfg, s.batch, s.num_classes, t, s.rank,
                            num_targets) for t in (t_lo, t_hi)}
  # XLA's static count visits each loop body and both branches of a cond
  # once, whatever the trip counts: an upper bound here, not the t=0 cost.
  table.add("FLOPs per train step (XLA cost analysis, loop bodies once)",
            gflop(xla_flops(step_compiled)), "GFLOP")
  for t in (t_lo, t_hi):
    table.add(f"FLOPs per train step t={t} (analytic)",
              gflop(hand[t]["train_step"]), "GFLOP")
  table.add("FLOPs per plain LoRA step (XLA cost analysis)",
            gflop(xla_flops(lora_compiled)), "GFLOP")
  for t in (t_lo, t_hi):
    if step_s[t]:
      table.add(f"achieved, train step t={t} (analytic FLOPs)",
                hand[t]["train_step"] / step_s[t] / 1e9, "GFLOP/s")


def estimate_rows(table: Table, s: Settings, cfg, num_targets: int) -> None:
  """Rows: train images/s per accelerator chip, estimated (not measured)."""
  est = accelerator_estimates(analytic_flops(cfg, ESTIMATE_BATCH,
                                             s.num_classes, 19, s.rank,
                                             num_targets))
  for chip, ips in est.items():
    table.add(f"estimate: train images/s per {chip}", ips, "img/s",
              f"{ESTIMATE_MFU:.0%} of bf16 peak, batch {ESTIMATE_BATCH}, t=19")
