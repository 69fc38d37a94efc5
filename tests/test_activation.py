"""The activation form of the adapters (`slora_jax.apply_with_adapters`).

Its pieces are checked against dense NumPy formulas (the stored ΔW and the
magnitudes' cotangent ⟨xᵀg, B_i A_i⟩, on chunk boundaries and both routes),
and the whole against the weight form on ViTs with fused and split qkv, both
semantics, KD offsets and a smaller current rank (SD-LoRA-RR).
"""

import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np
import pytest

import slora_jax as sl
from slora_jax import activation
from slora_jax.runner import methods
from slora_jax.runner import steps as steps_lib
from slora_jax.runner.methods import base
from slora_jax.models import vit


def _factors(capacity=7, rank=4, d_in=6, d_out=5, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(capacity, rank, d_in)).astype(np.float32)
  b = rng.normal(size=(capacity, d_out, rank)).astype(np.float32)
  coef = rng.normal(size=(capacity,)).astype(np.float32)
  return a, b, coef


@pytest.fixture
def small_chunks(monkeypatch):
  # Rank 4: a loop over chunks of 3 slots, then at most one of 2 and of 1.
  monkeypatch.setattr(activation, "_BIG_COLUMNS", 12)


@pytest.mark.parametrize("capacity,rank", [(7, 4), (40, 4), (3, 4), (5, 100),
                                           (100, 10)])
def test_chunks_cover_each_occupied_slot_once(capacity, rank):
  def body(start, k, count):
    return jax.lax.dynamic_update_slice_in_dim(
        count, jax.lax.dynamic_slice_in_dim(count, start, k) + 1, start, 0)
  run = jax.jit(lambda n: activation._slots_loop(
      n, capacity, rank, body, jnp.zeros((capacity,), jnp.int32)))
  for n in range(capacity + 1):
    np.testing.assert_array_equal(run(jnp.int32(n)),
                                  (np.arange(capacity) < n).astype(np.int32))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 6, 7])
def test_stored_delta_sums_occupied_slots(small_chunks, n):
  a, b, coef = _factors()
  got = jax.jit(activation.stored_delta)(coef, a, b, jnp.int32(n))
  want = sum((coef[i] * b[i] @ a[i]).T for i in range(n)) if n else 0 * got
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", ["activations", "kernel_gradient"])
@pytest.mark.parametrize("n", [0, 1, 4, 6, 7])
def test_magnitude_cotangent(small_chunks, monkeypatch, route, n):
  monkeypatch.setattr(activation, "_G_ROUTE_COLUMNS_PER_TOKEN",
                      np.inf if route == "activations" else 0.0)
  a, b, _ = _factors()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 6)).astype(np.float32)
  g = rng.normal(size=(9, 5)).astype(np.float32)
  fn = jax.jit(lambda *args: activation.magnitude_cotangent(*args))
  got = fn(x, g, a, b, jnp.int32(n))
  grad_w = x.T @ g
  want = np.array([np.sum(grad_w * (b[i] @ a[i]).T) if i < n else 0.0
                   for i in range(7)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _trained_state(params, rules, policy, *, stored=3, rank=4, max_rank=4,
                   capacity=7, absorbed=False):
  ad = sl.init_adapters(params, rules, capacity=capacity, max_rank=max_rank,
                        policy=policy)
  noise = lambda tree, k: jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(k, x.shape), tree)
  for i in range(stored):
    ad = sl.begin_task(ad, jax.random.key(i), max_rank)
    ad = ad.replace(trainable=noise(ad.trainable, jax.random.key(50 + i)))
    ad, _ = sl.end_task(ad)
  ad = sl.begin_task(ad, jax.random.key(99), rank)
  tr = noise(ad.trainable, jax.random.key(98))
  tr["magnitudes"]["previous"] += 0.1 * jnp.arange(capacity, dtype=jnp.float32)
  frozen = dict(ad.frozen)
  if absorbed:
    frozen["absorbed"] = 0.3 * jnp.ones((capacity,), jnp.float32)
  return ad.replace(trainable=tr, frozen=frozen)


def _both_forms(model, params, ad, x):
  apply_fn = lambda p, im: model.apply({"params": p}, im)

  def weight(tr):
    out = apply_fn(sl.apply_adapters(params, ad.replace(trainable=tr)), x)
    return jnp.sum(jnp.sin(out))

  def act(tr):
    out = sl.apply_with_adapters(apply_fn, params, ad.replace(trainable=tr), x)
    return jnp.sum(jnp.sin(out))

  return (jax.value_and_grad(weight)(ad.trainable),
          jax.jit(jax.value_and_grad(act))(ad.trainable))


@pytest.mark.parametrize("qkv,policy,rank,absorbed", [
    ("fused", "reference", 4, False),
    ("fused", "paper", 4, False),
    ("split", "reference", 2, True),     # RR: current rank below max_rank
    ("split", "paper", 4, False),
])
def test_same_value_and_gradients_as_weight_form(qkv, policy, rank, absorbed):
  cfg = vit.vit_ti16(image_size=32, patch_size=8, depth=2, qkv=qkv)
  model = vit.VisionTransformer(cfg)
  params = vit.init_params(cfg, jax.random.key(0))
  ad = _trained_state(params, sl.vit_qv_rules(qkv), sl.get_policy(policy),
                      rank=rank, absorbed=absorbed)
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  (vw, gw), (va, ga) = _both_forms(model, params, ad, x)
  # The two forms add the same terms in different orders. A float32 sum of K
  # terms may move by K·eps of the sum of their magnitudes; K is the longest
  # contraction (the MLP's hidden width), and the loss Σ sin(logit) moves by
  # at most Σ |Δlogit|, so the bound is K·eps·Σ|logit| (a wrong term or slot
  # moves it by O(1) of Σ|logit|).
  logits = model.apply({"params": sl.apply_adapters(params, ad)}, x)
  bound = cfg.mlp_dim * np.finfo(np.float32).eps * float(jnp.sum(jnp.abs(logits)))
  assert abs(float(va) - float(vw)) <= bound, (float(va), float(vw), bound)
  mags = gw["magnitudes"]["previous"]
  assert np.all(np.asarray(mags[:3]) != 0) and np.all(np.asarray(mags[3:]) == 0)
  for path, want in jax.tree_util.tree_leaves_with_path(gw):
    got = ga
    for key in path:
      got = got[key.key]
    # float32 sums over thousands of terms in different orders: 1e-4 of the
    # leaf's largest entry (a wrong term or slot is O(1) of it).
    scale = float(jnp.max(jnp.abs(want))) + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


class _TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


def test_train_step_forms_agree():
  """The runner's step over SD-LoRA in either adapter form, on a model that
  is not a ViT."""
  model = _TwoDense()
  params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  rules = [sl.kernel(r"hidden/kernel"), sl.kernel(r"out/kernel")]
  ad = _trained_state(params, rules, sl.reference(), stored=2, rank=2,
                      max_rank=2, capacity=4)
  exp = types.SimpleNamespace(train=types.SimpleNamespace(momentum=0.9))
  run = base.Run(exp=exp, settings=None, seed=0, model=model,
                 model_config=None, backbone_template=params, width=3,
                 num_classes=4, num_phases=4)
  head = sl.init_head(jax.random.key(1), 3, 4)
  batch = {"image": jax.random.normal(jax.random.key(2), (6, 5)),
           "label": jnp.array([0, 1, 2, 3, 0, 1]), "mask": jnp.ones((6,))}
  outs = {}
  for form in ("weight", "activation"):
    method = dataclasses.replace(methods.get_method("sdlora"),
                                 adapter_form=form)
    arrays = jax.tree.map(jnp.copy, {"adapters": ad, "head": head})
    state = steps_lib.TrainState(
        arrays, steps_lib.init_opt_state(method, run, arrays))
    outs[form] = steps_lib.make_train_step(method, run)(
        state, batch, steps_lib.task_args(0, 0, 4, 0.1), params)
  (w, mw), (a, ma) = outs["weight"], outs["activation"]
  assert float(mw["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5,
                                                       atol=1e-6),
               (w.arrays["adapters"].trainable, w.arrays["head"]),
               (a.arrays["adapters"].trainable, a.arrays["head"]))


def test_module_never_called_is_a_clear_error():
  model = _TwoDense()
  params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  ad = sl.init_adapters(params, [sl.kernel(r"hidden/kernel")], capacity=2,
                        max_rank=2)
  # An apply_fn that bypasses Linen: the interceptor never sees the module.
  manual = lambda p, x: x @ p["hidden"]["kernel"]
  with pytest.raises(ValueError, match=r"never called.*apply_adapters"):
    sl.apply_with_adapters(manual, params, ad, jnp.ones((2, 5)))


def test_bad_step_form_is_rejected():
  with pytest.raises(ValueError, match="adapter_form"):
    dataclasses.replace(methods.get_method("sdlora"), adapter_form="both")
