"""An SD-LoRA state as one Hugging Face PEFT LoRA adapter for timm's ViT.

At any point SD-LoRA's update of a map is a sum of low-rank terms,

    ΔW = Σ_i c_i·B_i A_i  (+ c_cur·B_t A_t while a task is being trained),

with c_i = (α_i + absorbed_i)·s_i (`slora_jax.adapters.slot_coefficients`).
That is exactly one LoRA of rank Σ r_i: stack the A_i, scale each B_i by its
c_i. Several targets of one timm Linear (q and v of the fused qkv) become one
LoRA of that Linear whose B is zero on the rows no target touches. PEFT
computes ``scaling·B·A`` with ``scaling = lora_alpha / r``, so ``lora_alpha =
r`` makes it ``B·A``. What PEFT cannot hold: the per-task split and the
magnitudes α_i (folded into B), so the adapter can be run or fine-tuned as a
plain LoRA, not continued as SD-LoRA; `slora_jax.save_adapters` keeps those.

Files (``save_peft``): ``adapter_model.safetensors`` with PEFT's keys
(``base_model.model.<module>.lora_{A,B}.weight``; the head, if given, as the
``modules_to_save`` module ``head``) and ``adapter_config.json``.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import safetensors.numpy

from slora_jax import adapters as adapters_lib
from slora_jax.models import vit as vit_lib

__all__ = ["lora_factors", "timm_module", "to_peft", "save_peft"]

_PREFIX = "base_model.model."
_PATH = re.compile(r"blocks_(\d+)/(attn|mlp)/(qkv|proj|query|key|value|out|"
                   r"fc1|fc2)/kernel")
_SPLIT_QKV = {"query": 0, "key": 1, "value": 2}


def lora_factors(adapters: adapters_lib.AdapterState
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per target, ``(A (k, d_in), B (d_out, k))`` with ``B @ A`` its ΔWᵀ.

  Stored directions enter at their own rank (zero padding dropped), the
  current one only if its B is non-zero; ``k`` is the same for every target.
  """
  spec = adapters.spec
  n = int(adapters_lib.num_stored(adapters))
  ranks = adapters_lib.stored_ranks(adapters)
  coefs = {k: np.asarray(v) for k, v in
           adapters_lib.slot_coefficients(adapters).items()}
  out = {}
  for t in spec.targets:
    prev = adapters.frozen["previous"][t.name]
    a_prev, b_prev = np.asarray(prev["A"]), np.asarray(prev["B"])
    a_parts = [a_prev[i, :ranks[i]] for i in range(n)]
    b_parts = [b_prev[i, :, :ranks[i]] * coefs[t.name][i] for i in range(n)]
    cur = adapters.trainable["current"][t.name]
    if np.any(np.asarray(cur["B"])):
      scale = adapters_lib.current_scale(adapters, cur["A"], cur["B"])
      r = adapters.rank        # the pair is max_rank wide, zero past the rank
      a_parts.append(np.asarray(cur["A"])[:r])
      b_parts.append(np.asarray(cur["B"])[:, :r] * np.asarray(scale))
    if not a_parts:
      a_parts = [np.zeros((1, t.d_in), np.float32)]
      b_parts = [np.zeros((t.d_out, 1), np.float32)]
    out[t.name] = (np.concatenate(a_parts).astype(np.float32),
                   np.concatenate(b_parts, axis=1).astype(np.float32))
  return out


def timm_module(path: str, cfg: vit_lib.ViTConfig) -> tuple[str, int, int]:
  """``(timm module, its out features, row of our column 0)`` of a kernel.

  Raises:
    ValueError: the kernel is not one of timm's ViT Linear layers.
  """
  m = _PATH.fullmatch(path)
  if m is None:
    raise ValueError(f"{path} is not a Linear layer of timm's ViT; PEFT's "
                     "LoRA for timm covers the blocks' qkv, proj, fc1, fc2")
  block, part, name = m.groups()
  d = cfg.width
  module = f"blocks.{block}.{part}."
  if name in _SPLIT_QKV:
    return module + "qkv", 3 * d, _SPLIT_QKV[name] * d
  name = {"out": "proj"}.get(name, name)
  return module + name, {"qkv": 3 * d, "fc1": cfg.mlp_dim}.get(name, d), 0


def to_peft(adapters: adapters_lib.AdapterState, cfg: vit_lib.ViTConfig,
            head: dict | None = None) -> tuple[dict, dict]:
  """``(tensors, adapter_config)`` of the PEFT LoRA equal to ``adapters``.

  Args:
    adapters: the state (any point of a run: between tasks or inside one).
    cfg: the ViT the adapters were made for.
    head: optional ``{'kernel': (D, n), 'bias': (n,)}`` saved as PEFT's
      ``modules_to_save`` head.
  """
  factors = lora_factors(adapters)
  modules: dict[str, list] = {}
  for t in adapters.spec.targets:
    module, rows, row0 = timm_module(t.path, cfg)
    lo = row0 + (t.cols[0] if t.cols else 0)
    modules.setdefault(module, []).append((rows, lo, *factors[t.name]))
  rank = max(sum(a.shape[0] for _, _, a, _ in parts)
             for parts in modules.values())
  tensors = {}
  for module, parts in modules.items():
    d_in = parts[0][2].shape[1]
    a_mod = np.zeros((rank, d_in), np.float32)
    b_mod = np.zeros((parts[0][0], rank), np.float32)
    k = 0
    for _, lo, a, b in parts:   # each target its own rank columns and rows
      a_mod[k:k + a.shape[0]] = a
      b_mod[lo:lo + b.shape[0], k:k + a.shape[0]] = b
      k += a.shape[0]
    tensors[f"{_PREFIX}{module}.lora_A.weight"] = a_mod
    tensors[f"{_PREFIX}{module}.lora_B.weight"] = b_mod
  config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank,
            "target_modules": sorted(modules), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "task_type": None,
            "base_model_name_or_path": None,
            "modules_to_save": ["head"] if head is not None else None}
  if head is not None:
    tensors[f"{_PREFIX}head.weight"] = np.asarray(head["kernel"]).T
    tensors[f"{_PREFIX}head.bias"] = np.asarray(head["bias"])
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  return tensors, config


def save_peft(directory: str, adapters: adapters_lib.AdapterState,
              cfg: vit_lib.ViTConfig, head: dict | None = None) -> dict:
  """Writes `to_peft`'s files into ``directory``; returns the config."""
  tensors, config = to_peft(adapters, cfg, head)
  os.makedirs(directory, exist_ok=True)
  # Through open(): safetensors' save_file creates the file 0600.
  with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
    f.write(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
  with open(os.path.join(directory, "adapter_config.json"), "w",
            encoding="utf-8") as f:
    json.dump(config, f, indent=1)
  return config
