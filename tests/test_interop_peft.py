"""`slora_jax.interop.peft`: the PEFT LoRA is the SD-LoRA update, per timm
Linear, for the fused and the split attention layouts (no torch needed)."""

import jax
import numpy as np
import pytest

import slora_jax as sl
from slora_jax.interop import peft
from slora_jax.models import convert
from slora_jax.models import vit

EPS = np.finfo(np.float32).eps


def _state(qkv: str):
  cfg = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1,
                      num_heads=2, mlp_dim=32, qkv=qkv)
  params = vit.init_params(cfg, jax.random.key(0))
  rules = (*sl.vit_qv_rules(qkv), sl.kernel(r"blocks_\d+/mlp/fc1/kernel"))
  st = sl.init_adapters(params, rules, capacity=3, max_rank=4,
                        policy=sl.paper())

  def bump(s, rank):
    # As training moves them: the pair's first `rank` rows and columns (the
    # rest of the max_rank-wide pair stays zero) and the magnitudes.
    cur = {n: {"A": p["A"].at[:rank].add(0.3), "B": p["B"].at[:, :rank].add(0.3)}
           for n, p in s.trainable["current"].items()}
    mags = jax.tree.map(lambda x: x + 0.3, s.trainable["magnitudes"])
    return s.replace(trainable={**s.trainable, "current": cur,
                                "magnitudes": mags})

  st, _ = sl.end_task(bump(sl.begin_task(st, jax.random.key(1), 4), 4))
  st, _ = sl.end_task(bump(sl.begin_task(st, jax.random.key(2), 2), 2))
  # A task in training: its current direction is part of the update too.
  return cfg, params, bump(sl.begin_task(st, jax.random.key(3), 3), 3)


@pytest.mark.parametrize("qkv", ["fused", "split"])
def test_peft_lora_is_the_merged_update(qkv):
  cfg, params, st = _state(qkv)
  tensors, config = peft.to_peft(st, cfg)
  assert config["r"] == config["lora_alpha"] == 2 * (4 + 2 + 3)   # q and v
  assert config["target_modules"] == [
      f"blocks.{i}.{m}" for i in range(1) for m in ("attn.qkv", "mlp.fc1")]
  with jax.default_matmul_precision("highest"):
    merged = convert.to_timm_arrays(sl.merge(params, st), cfg)
  base = convert.to_timm_arrays(params, cfg)
  for module in config["target_modules"]:
    a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    want = merged[f"{module}.weight"] - base[f"{module}.weight"]
    # Rounding of W0 + ΔW in float32, and of ΔW's sum over r terms.
    tol = 2 * EPS * np.abs(merged[f"{module}.weight"]).max() + (
        config["r"] * EPS * np.abs(b).max() * np.abs(a).max())
    np.testing.assert_allclose(b @ a, want, rtol=0, atol=tol)
  # k's rows of the fused qkv carry no update.
  b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
  assert not b[16:32].any() and b[:16].any() and b[32:].any()


def test_a_kernel_timm_has_no_linear_for_is_refused():
  cfg, params, _ = _state("fused")
  st = sl.init_adapters(params, (sl.kernel("patch_embed/kernel", in_dims=3),),
                        capacity=1, max_rank=1)
  with pytest.raises(ValueError, match="not a Linear layer of timm's ViT"):
    peft.to_peft(st, cfg)
