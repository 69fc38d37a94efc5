"""The library on models we did not write (issue #23).

Hugging Face transformers' Flax BERT and GPT-2 (Linen; GPT-2 stores its
kernels (out, in) with a fused qkv) and an NNX transformer built from Flax's
own layers, each from a tiny config (no download), through a rank schedule of
three tasks in both forms: equal values and gradients at every step, one
compilation per form for the whole schedule, merge and save/load.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import BertConfig, FlaxBertModel, FlaxGPT2Model, GPT2Config

import slora_jax as sl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = np.finfo(np.float32).eps
RANKS = (4, 2, 2)                       # an SD-LoRA-RR schedule: 4 → 2 → 2
BATCH, LENGTH, WIDTH = 2, 8, 32


def _tokens(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 50, (BATCH, LENGTH)), jnp.int32)


def bert():
  cfg = BertConfig(vocab_size=50, hidden_size=WIDTH, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=16)
  model = FlaxBertModel(cfg, seed=0)
  apply_fn = lambda p, t: model.module.apply(
      {"params": p}, t, jnp.ones_like(t), jnp.zeros_like(t),
      jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), None,
      deterministic=True)[0]
  rules = [sl.kernel(r".*attention/self/(query|value)/kernel"),
           sl.kernel(r".*attention/output/dense/kernel")]
  return model.params, apply_fn, rules, 64


def gpt2():
  cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=WIDTH, n_layer=2,
                   n_head=4)
  model = FlaxGPT2Model(cfg, seed=0)
  apply_fn = lambda p, t: model.module.apply(
      {"params": p}, t, jnp.ones_like(t),
      jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape),
      deterministic=True)[0]
  # Conv1D kernels are stored (out, in): c_attn (3d, d), c_proj (d, d).
  rules = [sl.fused_slices(r"h/\d+/attn/c_attn/kernel", layout="out_in"),
           sl.kernel(r"h/\d+/attn/c_proj/kernel", layout="out_in")]
  return model.params, apply_fn, rules, 4 * WIDTH


class NnxEncoder(nnx.Module):
  """A small text encoder of Flax's NNX layers (attention, MLP, embedding)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(50, WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(4, WIDTH, decode=False, rngs=rngs)
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 64, rngs=rngs)
    self.down = nnx.Linear(64, WIDTH, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = h + self.attn(self.norm(h))
    return h + self.down(nnx.gelu(self.up(h)))


def nnx_encoder():
  graphdef, params, rest = nnx.split(NnxEncoder(nnx.Rngs(0)), nnx.Param, ...)
  apply_fn = lambda p, t: nnx.merge(graphdef, p, rest)(t)
  rules = [sl.kernel(r"attn/(query|value)/kernel"),
           sl.kernel(r"attn/out/kernel", in_dims=2),
           sl.kernel(r"(up|down)/kernel")]
  return params, apply_fn, rules, 64


MODELS = {"bert": bert, "gpt2": gpt2, "nnx": nnx_encoder}


def _grad_steps(apply_fn, params):
  def loss(form, trainable, ad, tokens):
    ad = ad.replace(trainable=trainable)
    out = (apply_fn(sl.apply_adapters(params, ad), tokens) if form == "weight"
           else sl.apply_with_adapters(apply_fn, params, ad, tokens))
    return jnp.sum(jnp.sin(out))

  def weight_form(ad, tokens):
    return jax.value_and_grad(loss, 1)("weight", ad.trainable, ad, tokens)

  def activation_form(ad, tokens):
    return jax.value_and_grad(loss, 1)("activation", ad.trainable, ad, tokens)

  return jax.jit(weight_form), jax.jit(activation_form)


def run_schedule(name, steps=2, lr=0.05):
  """Trains ``RANKS`` tasks on model ``name`` with the activation form,
  checking the weight form's value and gradients at every step.

  Returns (params, apply_fn, adapters, largest gradient difference relative
  to the largest gradient of its kind, compilations per form).
  """
  params, apply_fn, rules, widest = MODELS[name]()
  ad = sl.init_adapters(params, rules, capacity=len(RANKS),
                        max_rank=max(RANKS))
  weight_form, activation_form = _grad_steps(apply_fn, params)
  # Each gradient entry is a float32 sum over the tokens of products summed
  # over at most the widest contraction, in two different orders. Its
  # rounding is relative to the cotangents flowing back, whose scale is that
  # of the largest gradient of the same kind (A, B, magnitudes): a leaf made
  # small by cancellation (a q projection at init) carries their error.
  tol = BATCH * LENGTH * widest * EPS
  worst = 0.0
  for task, rank in enumerate(RANKS):
    ad = sl.begin_task(ad, jax.random.key(task), rank)
    for step in range(steps):
      tokens = _tokens(10 * task + step)
      (vw, gw), (va, ga) = weight_form(ad, tokens), activation_form(ad, tokens)
      out = apply_fn(sl.apply_adapters(params, ad), tokens)
      assert abs(float(va) - float(vw)) <= tol * float(jnp.sum(jnp.abs(out)))
      leaves = jax.tree_util.tree_leaves_with_path(gw)
      kind = lambda path: str(path[-1]) if path[0].key == "current" else "mag"
      scales = {}
      for path, want in leaves:
        scales[kind(path)] = max(scales.get(kind(path), 0.0),
                                 float(jnp.max(jnp.abs(want))))
      for (path, want), got in zip(leaves, jax.tree.leaves(ga)):
        scale = scales[kind(path)] or 1.0
        diff = float(jnp.max(jnp.abs(got - want))) / scale
        assert diff <= tol, (jax.tree_util.keystr(path), diff, tol)
        worst = max(worst, diff)
      ad = ad.replace(trainable=jax.tree.map(lambda p, g: p - lr * g,
                                             ad.trainable, ga))
    ad, _ = sl.end_task(ad)
  compiles = (weight_form._cache_size(), activation_form._cache_size())
  return params, apply_fn, ad, worst, compiles


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rank_schedule_in_both_forms_merge_and_save(name, tmp_path):
  params, apply_fn, ad, _, compiles = run_schedule(name)
  assert compiles == (1, 1)             # one program for ranks 4, 2 and 2
  assert int(sl.num_stored(ad)) == 3
  np.testing.assert_array_equal(sl.stored_ranks(ad), RANKS)
  tokens = _tokens(99)
  merged = sl.merge(params, ad)
  np.testing.assert_array_equal(
      np.asarray(apply_fn(merged, tokens)),
      np.asarray(apply_fn(sl.apply_adapters(params, ad), tokens)))
  assert float(jnp.max(jnp.abs(apply_fn(merged, tokens)
                               - apply_fn(params, tokens)))) > 1e-3
  sl.save_adapters(tmp_path / "ad", ad)
  back = sl.load_adapters(tmp_path / "ad")
  assert back.spec == ad.spec
  for a, b in zip(jax.tree.leaves(ad), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gpt2_fused_qkv_stored_out_in_against_a_hand_written_merge():
  params, _, rules, _ = gpt2()
  ad = sl.init_adapters(params, rules[:1], capacity=1, max_rank=2)
  ad = sl.begin_task(ad, jax.random.key(0), 2)
  rng = np.random.default_rng(0)
  ad = ad.replace(trainable=jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
      ad.trainable))
  alpha = float(ad.trainable["magnitudes"]["current"])
  kernel = np.asarray(params["h"]["0"]["attn"]["c_attn"]["kernel"], np.float64)
  want = kernel.copy()                  # rows: q 0:d, k d:2d, v 2d:3d
  for part, rows in (("q", slice(0, WIDTH)), ("v", slice(2 * WIDTH, None))):
    cur = ad.trainable["current"][f"h/0/attn/c_attn/kernel[{part}]"]
    want[rows] += alpha * np.asarray(cur["B"], np.float64) @ np.asarray(
        cur["A"], np.float64)
  got = np.asarray(sl.merge(params, ad)["h"]["0"]["attn"]["c_attn"]["kernel"])
  # One product of rank 2 and one float32 sum with the kernel per entry.
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=4 * EPS * np.abs(want).max())
  np.testing.assert_array_equal(got[WIDTH:2 * WIDTH], kernel[WIDTH:2 * WIDTH])


def test_gpt2_without_its_layout_is_an_error():
  params, apply_fn, _, _ = gpt2()
  with pytest.raises(ValueError, match=r"fused axis may be the input \(a "
                     r"kernel stored \(out, in\), like GPT-2's c_attn, needs "
                     r"layout='out_in'\)"):
    sl.init_adapters(params, [sl.fused_slices(r"h/\d+/attn/c_attn/kernel")],
                     capacity=1, max_rank=1)
  # c_proj is square: the shapes fit either way, the probe does not.
  ad = sl.init_adapters(params, [sl.kernel(r"h/\d+/attn/c_proj/kernel")],
                        capacity=1, max_rank=1)
  with pytest.raises(ValueError, match=r"h/0/attn/c_proj/kernel: FlaxConv1D "
                     r"is no Flax Dense.*does not change with the kernel as "
                     r"input·kernel.*use the weight form"):
    sl.apply_with_adapters(apply_fn, params, sl.begin_task(
        ad, jax.random.key(0), 1), _tokens())


def test_nnx_evaluate_then_continue_leaves_the_backbone_alone():
  """docs/library.md's NNX idiom: evaluate on a model merged from a copy."""
  model = NnxEncoder(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  before = jax.tree.map(np.array, params)
  ad = sl.init_adapters(params, [sl.kernel(r"(up|down)/kernel")], capacity=2,
                        max_rank=2)
  ad = sl.begin_task(ad, jax.random.key(0), 2)
  ad = ad.replace(trainable=jax.tree.map(lambda x: x + 0.5, ad.trainable))
  evaluated = nnx.merge(graphdef, sl.merge(params, ad), rest)(_tokens())
  assert evaluated.shape == (BATCH, LENGTH, WIDTH)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # What the manual said before: nnx.update writes into the Variables that
  # nnx.split returned, so `params` itself moves.
  nnx.update(model, sl.merge(params, ad))
  assert any(np.any(np.asarray(a) != b) for a, b in
             zip(jax.tree.leaves(params), jax.tree.leaves(before)))


def test_the_manuals_gpt2_example_runs():
  text = open(os.path.join(ROOT, "docs", "library.md"), encoding="utf-8").read()
  section = text.split("\n## Models we did not write: Hugging Face GPT-2")[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  exec(code, {})  # pylint: disable=exec-used


def test_the_manuals_nnx_example_evaluates_without_nnx_update():
  """Example 2 evaluates after every task on a model merged anew, and calls
  nnx.update only after its last task (it asserts `params` unchanged)."""
  text = open(os.path.join(ROOT, "docs", "library.md"), encoding="utf-8").read()
  code = re.search(r"```python\n(.*?)```",
                   text.split("\n## Example 2")[1], re.S).group(1)
  loop_end = code.index("assert all(np.array_equal")
  assert "nnx.merge(graphdef, sl.merge(params, adapters), rest)" in code
  assert "evaluate(adapters" in code[:loop_end]
  assert "nnx.update(" not in code[:loop_end]
