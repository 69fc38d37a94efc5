"""InfLoRA and SimpleCIL as the official PyTorch code computes them, for parity.

A small re-implementation in our own words (torch + NumPy, no timm), float32
as the official runs: a timm-layout ViT from a ``state_dict`` whose attention
adds ``x (Σ_{i≤t} B_i A_i)ᵀ`` to k and v (one A per task per k and v, both set
to the same designed matrix), the running-mean input covariance, the A design
by ``torch.linalg.svd``, Adam with the per-epoch cosine, per-task linear
heads with cross-entropy over the current task's slice, and the DualGPM
update in NumPy float32. docs/methods.md cites the official functions.
"""

from __future__ import annotations

import math

import numpy as np

try:
  import torch
  from torch.nn import functional as F
except ImportError as e:
  raise ImportError("the PyTorch port needs torch: pip install torch "
                    "(a CPU build is enough)") from e


class InfLoRAViT:
  """The official ``SiNet`` + ``Attention_LoRA`` forward and task steps."""

  def __init__(self, sd, *, depth, heads, rank, tasks, classes_per_task,
               head_init=None):
    self.w = {k: torch.tensor(np.asarray(v), dtype=torch.float32)
              for k, v in sd.items()}
    self.depth, self.heads, self.rank = depth, heads, rank
    d = self.w["cls_token"].shape[-1]
    z = lambda *s: torch.zeros(*s)
    self.lora = [[{"A_k": z(rank, d), "A_v": z(rank, d), "B_k": z(d, rank),
                   "B_v": z(d, rank)} for _ in range(depth)]
                 for _ in range(tasks)]
    self.cur = [z(d, d) for _ in range(depth)]
    self.n_cur = [0] * depth
    self.cpt = classes_per_task
    self.heads_w = []
    for t in range(tasks):
      w, b = (head_init[t] if head_init else (z(classes_per_task, d),
                                                z(classes_per_task)))
      self.heads_w.append((torch.tensor(np.asarray(w)),
                           torch.tensor(np.asarray(b))))
    self.feature_list, self.project_type, self.feature_mat = [], [], []

  def _ln(self, x, p):
    return F.layer_norm(x, x.shape[-1:], self.w[p + ".weight"],
                        self.w[p + ".bias"], 1e-6)

  def _attention(self, x, i, task, collect):
    w, p = self.w, f"blocks.{i}.attn."
    if collect:   # the official running mean of x xᵀ over tokens
      n = x.shape[0] * x.shape[1]
      s = torch.bmm(x.detach().permute(0, 2, 1), x.detach()).sum(0)
      self.cur[i] = (self.cur[i] * self.n_cur[i] + s) / (self.n_cur[i] + n)
      self.n_cur[i] += n
    b_, n_, d = x.shape
    hd = d // self.heads
    qkv = F.linear(x, w[p + "qkv.weight"], w[p + "qkv.bias"])
    q, k, v = qkv.reshape(b_, n_, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
    wk = torch.stack([self.lora[t][i]["B_k"] @ self.lora[t][i]["A_k"]
                      for t in range(task + 1)]).sum(0)
    wv = torch.stack([self.lora[t][i]["B_v"] @ self.lora[t][i]["A_v"]
                      for t in range(task + 1)]).sum(0)
    split = lambda y: y.reshape(b_, n_, self.heads, hd).permute(0, 2, 1, 3)
    k = k + split(F.linear(x, wk))
    v = v + split(F.linear(x, wv))
    attn = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1)
    o = (attn @ v).transpose(1, 2).reshape(b_, n_, d)
    return F.linear(o, w[p + "proj.weight"], w[p + "proj.bias"])

  def features(self, images, task, collect=False):
    """Final-norm class token; ``images`` NHWC numpy."""
    w = self.w
    x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2)
    t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"],
                 stride=w["patch_embed.proj.weight"].shape[-1])
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([w["cls_token"].expand(len(t), -1, -1), t], 1)
    t = t + w["pos_embed"]
    for i in range(self.depth):
      p = f"blocks.{i}."
      t = t + self._attention(self._ln(t, p + "norm1"), i, task, collect)
      y = F.gelu(F.linear(self._ln(t, p + "norm2"), w[p + "mlp.fc1.weight"],
                          w[p + "mlp.fc1.bias"]))
      t = t + F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return self._ln(t, "norm")[:, 0]

  def logits(self, images, task):
    """All heads up to ``task`` concatenated (the official ``interface``)."""
    f = self.features(images, task)
    return torch.cat([F.linear(f, *self.heads_w[t])
                      for t in range(task + 1)], 1)

  def collect(self, batches, task):
    with torch.no_grad():
      for images, _ in batches:
        self.features(images, task, collect=True)
    out = [m.clone() for m in self.cur]
    self.cur = [torch.zeros_like(m) for m in self.cur]
    self.n_cur = [0] * self.depth
    return out

  def design(self, task, covs):
    """Sets A_k = A_v = top-r left singular vectors / √3 (official signs)."""
    for i, cov in enumerate(covs):
      if task > 0:
        proj = self.feature_mat[i] @ cov
        cov = cov - proj if self.project_type[i] == "remove" else proj
      u = torch.linalg.svd(cov, full_matrices=False)[0]
      a = u[:, :self.rank].T / math.sqrt(3)
      self.lora[task][i]["A_k"] = a.clone()
      self.lora[task][i]["A_v"] = a.clone()

  def train(self, task, batches, epochs, lr):
    """Adam on B_k, B_v and the task's head; the lagging per-epoch cosine."""
    params = [self.lora[task][i][n].requires_grad_(True)
              for i in range(self.depth) for n in ("B_k", "B_v")]
    hw, hb = (p.clone().requires_grad_(True) for p in self.heads_w[task])
    opt = torch.optim.Adam(params + [hw, hb], lr=lr, betas=(0.9, 0.999))
    losses = []
    for e in range(epochs):
      # The official scheduler's counter restarts after its constructor's
      # step, so epoch e uses the formula's epoch e − 1 (epoch 0: e = 0).
      lag = max(e - 1, 0)
      for g in opt.param_groups:
        g["lr"] = lr * math.cos(99 * math.pi * lag / (200 * max(epochs - 1, 1)))
      for images, labels in batches:
        logits = F.linear(self.features(images, task), hw, hb)
        target = torch.tensor(np.asarray(labels)).long() - task * self.cpt
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in params:
      p.requires_grad_(False)
    self.heads_w[task] = (hw.detach(), hb.detach())
    return losses

  def update_memory(self, covs, thresh):
    """The DualGPM update and the remove→retain switch (NumPy float32)."""
    mats = [c.numpy() for c in covs]
    if not self.feature_list:
      for m in mats:
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        r = int(np.sum(np.cumsum(s ** 2 / (s ** 2).sum()) < thresh))
        self.feature_list.append(u[:, :max(r, 1)])
        self.project_type.append("remove" if r < m.shape[0] / 2 else "retain")
    else:
      for i, m in enumerate(mats):
        self._grow(i, m, thresh)
    for i, f in enumerate(self.feature_list):
      if self.project_type[i] == "remove" and f.shape[1] > f.shape[0] / 2:
        self.feature_list[i] = np.linalg.svd(f)[0][:, f.shape[1]:]
        self.project_type[i] = "retain"
    self.feature_mat = [torch.tensor(f @ f.T) for f in self.feature_list]

  def _grow(self, i, m, thresh):
    f = self.feature_list[i]
    total = (np.linalg.svd(m, full_matrices=False)[1] ** 2).sum()
    remove = self.project_type[i] == "remove"
    hat = m - f @ (f.T @ m) if remove else f @ (f.T @ m)
    u, s, _ = np.linalg.svd(hat, full_matrices=False)
    ratios = s ** 2 / total
    acc = (total - (s ** 2).sum()) / total if remove else (s ** 2).sum() / total
    r = 0
    for x in ratios:
      if remove and acc < thresh:
        acc, r = acc + x, r + 1
      elif not remove and acc >= 1 - thresh:
        acc, r = acc - x, r + 1
      else:
        break
    if r == 0:
      return
    if remove:
      self.feature_list[i] = np.hstack([f, u[:, :r]])[:, :f.shape[0]]
    else:
      left = np.linalg.svd(f - u[:, :r] @ (u[:, :r].T @ f))[0]
      self.feature_list[i] = left[:, :f.shape[1] - r]


def simplecil_logits(train_feats, train_labels, classes, feats):
  """The official SimpleCIL: class means into a CosineLinear (sigma 1)."""
  emb, lab = torch.tensor(train_feats), torch.tensor(train_labels)
  weight = torch.zeros(len(classes), emb.shape[1])
  for c in classes:
    weight[c] = emb[(lab == c).nonzero().squeeze(-1)].mean(0)
  out = F.linear(F.normalize(torch.tensor(feats), p=2, dim=1),
                 F.normalize(weight, p=2, dim=1))
  return weight.numpy(), (1.0 * out).numpy()
