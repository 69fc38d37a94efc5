"""The PyTorch reference's SD-LoRA arithmetic, for timing beside ours.

A minimal re-implementation (torch only, no timm) of what the official code
computes per step (docs/semantics.md §2-§4): a timm-layout ViT whose fused qkv
output gets, for q and v of every block, the LoRA branches of *every* earlier
task on the activations, ``α_i·(x Aᵢᵀ) Bᵢᵀ / (‖Bᵢ‖_F‖Aᵢ‖_F)`` with the norms
taken at every forward, plus the current ``α_t·(x A_tᵀ) B_tᵀ``; cross-entropy
over the current task's logits; SGD with momentum 0.9 over the current
factors, the magnitudes and the head. Attention is
``F.scaled_dot_product_attention``, which timm 1.0.9 uses.

It leaves out the reference's pure overheads (re-reading every earlier
``lora_w_a_*.pt`` from disk at each step for an unused loss, building four
throw-away ``nn.Linear`` modules per forward, the second ViT copy), so its
times are a lower bound on the reference's. Used by
``experiments.benchmark --torch``, which imports it only then.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError as e:
  raise ImportError("the PyTorch comparison needs torch: pip install torch "
                    "(a CPU build is enough)") from e


def _attention(qkv_out, heads):
  b_, n, d3 = qkv_out.shape
  d = d3 // 3
  qkv = qkv_out.reshape(b_, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
  o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
  return o.transpose(1, 2).reshape(b_, n, d)


class Block(nn.Module):
  """A timm pre-norm block whose q and v carry every task's LoRA branch."""

  def __init__(self, width, heads, mlp, rank, tasks, rand):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.fc1 = nn.Linear(width, mlp)
    self.fc2 = nn.Linear(mlp, width)
    bound = 1 / math.sqrt(width)
    # Earlier tasks' factors (frozen) and the current pair, per q and v.
    self.prev = [[(rand(rank, width), rand(width, rank)) for _ in range(tasks)]
                 for _ in range(2)]
    self.cur_a = nn.ParameterList(
        [nn.Parameter(torch.empty(rank, width).uniform_(-bound, bound))
         for _ in range(2)])
    self.cur_b = nn.ParameterList(
        [nn.Parameter(torch.zeros(width, rank)) for _ in range(2)])

  def lora(self, x, p, mags):
    out = mags[-1] * F.linear(F.linear(x, self.cur_a[p]), self.cur_b[p])
    for i, (a, b) in enumerate(self.prev[p]):
      out = out + mags[i] * F.linear(F.linear(x, a), b) / (
          torch.norm(b) * torch.norm(a))
    return out

  def forward(self, x, mags=None):
    """With ``mags``, the adapted block; without, the plain one."""
    d = x.shape[-1]
    h = self.norm1(x)
    qkv = self.qkv(h)
    if mags is not None:
      q = qkv[..., :d] + self.lora(h, 0, mags)
      v = qkv[..., 2 * d:] + self.lora(h, 1, mags)
      qkv = torch.cat([q, qkv[..., d:2 * d], v], dim=-1)
    x = x + self.proj(_attention(qkv, self.heads))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
  """timm's ViT layout, a linear head and one magnitude per task."""

  def __init__(self, depth, width, heads, mlp, image_size, patch, num_classes,
               rank, tasks, rand):
    super().__init__()
    self.patch = nn.Conv2d(3, width, patch, patch)
    self.cls = nn.Parameter(rand(1, 1, width))
    self.pos = nn.Parameter(rand(1, 1 + (image_size // patch) ** 2, width))
    self.blocks = nn.ModuleList([Block(width, heads, mlp, rank, tasks, rand)
                                 for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.mags = nn.Parameter(torch.full((tasks + 1,), 0.8))
    self.head = nn.Linear(width, num_classes)

  def forward(self, x, lora=True):
    x = self.patch(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
    for blk in self.blocks:
      x = blk(x, self.mags if lora else None)
    return self.head(self.norm(x)[:, 0])


def build(depth=12, width=768, heads=12, mlp=3072, image_size=224, patch=16,
          num_classes=200, rank=10, tasks=0, seed=0):
  """Returns ``(model, trainable params)`` with ``tasks`` earlier directions."""
  g = torch.Generator().manual_seed(seed)

  def rand(*shape, scale=0.02):
    return torch.randn(*shape, generator=g) * scale

  model = ViT(depth, width, heads, mlp, image_size, patch, num_classes, rank,
              tasks, rand)
  for name, p in model.named_parameters():
    if not (name.startswith(("mags", "head")) or ".cur_" in name):
      p.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  return model, trainable


def workload(tasks: int, batch: int, eval_batch: int | None = None,
             seed: int = 0, **dims) -> dict:
  """Zero-argument callables ``step``, ``eval`` and ``plain`` (the ViT with
  no adapter branch) on a model with ``tasks`` earlier directions."""
  image = dims.get("image_size", 224)
  num_classes = dims.get("num_classes", 200)
  g = torch.Generator().manual_seed(seed + 1)
  x = torch.rand(batch, 3, image, image, generator=g)
  xe = torch.rand(eval_batch or batch, 3, image, image, generator=g)
  lo, hi = 0, min(10, num_classes)
  y = torch.randint(lo, hi, (batch,), generator=g)
  model, trainable = build(tasks=tasks, seed=seed, **dims)
  opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(x)[:, lo:hi]
    F.cross_entropy(logits, y - lo).backward()
    opt.step()

  @torch.no_grad()
  def evaluate():
    model(xe)

  @torch.no_grad()
  def plain():
    model(xe, lora=False)

  return {"step": step, "eval": evaluate, "plain": plain}


def _median_seconds(fn, repeats: int) -> float:
  fn()                                                  # warm-up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def time_reference(tasks=(0, 19), batch=4, repeats=3, **dims) -> dict:
  """Median seconds of the train step at each t, eval forward, plain forward."""
  out = {"threads": torch.get_num_threads(), "version": torch.__version__,
         "step": {}, "eval": {}}
  for t in tasks:
    calls = workload(t, batch, **dims)
    out["step"][t] = _median_seconds(calls["step"], repeats)
    out["eval"][t] = _median_seconds(calls["eval"], repeats)
    if t == tasks[0]:
      out["plain_eval"] = _median_seconds(calls["plain"], repeats)
    del calls
  return out


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
  """Answers timing requests, one JSON object per line, until ``quit``.

  ``{"op": "load", "key": k, "tasks": t, "batch": b, "eval_batch": e,
  "dims": {...}}`` builds a workload; ``{"op": "time", "key": k, "call":
  "step"|"eval"|"plain"}`` runs it once and answers its seconds;
  ``{"op": "info"}`` answers the torch version and thread count; ``{"op":
  "clear"}`` drops every workload. The
  benchmark drives this from its own process (experiments/benchmark/
  versus_torch.py), so XLA's and PyTorch's thread pools never run at once.
  """
  loaded = {}
  for line in stdin:
    req = json.loads(line)
    op = req["op"]
    if op == "quit":
      break
    if op == "clear":
      loaded.clear()
      ans = {"ok": True}
    elif op == "info":
      ans = {"version": torch.__version__, "threads": torch.get_num_threads(),
             "pid": os.getpid()}
    elif op == "load":
      loaded[req["key"]] = workload(req["tasks"], req["batch"],
                                    req.get("eval_batch"), **req["dims"])
      ans = {"ok": True}
    elif op == "time":
      fn = loaded[req["key"]][req["call"]]
      t0 = time.perf_counter()
      fn()
      ans = {"seconds": time.perf_counter() - t0}
    else:
      ans = {"error": f"unknown op {op!r}"}
    stdout.write(json.dumps(ans) + "\n")
    stdout.flush()


if __name__ == "__main__":
  if "--serve" in sys.argv:
    threads = os.environ.get("SLORA_JAX_TORCH_THREADS")
    if threads:
      torch.set_num_threads(int(threads))
    serve()
  else:
    print(time_reference())
