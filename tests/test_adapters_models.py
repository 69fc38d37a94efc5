"""Adapters on real Flax modules (Linen and NNX), merge, and property tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import slora_jax as sl

D = 8


class FusedAttnIn(nn.Module):
  """A fused qkv projection followed by a nonlinearity (Linen)."""

  @nn.compact
  def __call__(self, x):
    qkv = nn.Dense(3 * D, name="qkv")(x)
    return jnp.tanh(qkv)


def activation_space_forward(params, x, history, mags, current, alpha):
  """The PyTorch reference's way: per-task LoRA branches on activations.

  Independent of the library: x·W0 + b, then Σ_i α_i·(x Aᵢᵀ Bᵢᵀ)/(‖Bᵢ‖‖Aᵢ‖)
  + α_cur·x Aᵀ Bᵀ added to the q and v output columns (docs/semantics.md §3.8).
  """
  w = np.asarray(params["qkv"]["kernel"], np.float64)
  y = x @ w + np.asarray(params["qkv"]["bias"])
  for part, lo in (("q", 0), ("v", 2 * D)):
    name = f"qkv/kernel[{part}]"
    for i, h in enumerate(history):
      a, b = h[name]
      y[:, lo:lo + D] += mags[i] * (x @ a.T @ b.T) / (
          np.linalg.norm(b) * np.linalg.norm(a))
    a, b = current[name]
    y[:, lo:lo + D] += alpha * (x @ a.T @ b.T)
  return np.tanh(y)


def random_trained(ad, key):
  """The current pair moved as training moves it: its task's rank rows of A
  and columns of B (the pair is max_rank wide; the rest gets zero gradient)."""
  rank = ad.rank
  cur = {}
  for i, (name, p) in enumerate(sorted(ad.trainable["current"].items())):
    ka, kb = jax.random.split(jax.random.fold_in(key, i))
    a = p["A"].at[:rank].add(0.5 * jax.random.normal(ka, p["A"][:rank].shape))
    b = p["B"].at[:, :rank].add(
        0.5 * jax.random.normal(kb, p["B"][:, :rank].shape))
    cur[name] = {"A": a, "B": b}
  return ad.replace(trainable=ad.trainable | {"current": cur})


def snap(ad):
  return {n: (np.asarray(c["A"], np.float64), np.asarray(c["B"], np.float64))
          for n, c in ad.trainable["current"].items()}


def test_linen_merge_equals_activation_space_reference():
  model = FusedAttnIn()
  x = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  ad = sl.init_adapters(params, [sl.fused_slices("qkv/kernel")], capacity=3,
                        max_rank=4)
  history = []
  for t in range(3):
    ad = random_trained(sl.begin_task(ad, jax.random.key(t), 4),
                        jax.random.key(10 + t))
    if t < 2:
      history.append(snap(ad))
      ad, _ = sl.end_task(ad)
  mags = np.array([0.9, 1.4])
  ad = ad.replace(trainable=ad.trainable | {"magnitudes": {
      "current": jnp.asarray(1.1), "previous": jnp.asarray([0.9, 1.4, 0.8])}})
  merged = jax.jit(sl.merge)(params, ad)
  got = model.apply({"params": merged}, x)
  via_apply = model.apply({"params": sl.apply_adapters(params, ad)}, x)
  want = activation_space_forward(jax.tree.map(np.asarray, params),
                                  x.astype(np.float64), history, mags,
                                  snap(ad), 1.1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got), np.asarray(via_apply), atol=1e-5)
  # The merged tree is a plain parameter tree of the model's own shapes.
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert a.shape == b.shape and a.dtype == b.dtype


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.query = nnx.LinearGeneral(D, (2, D // 2), rngs=rngs)
    self.fc = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.query(x).reshape(x.shape[0], D))


def test_nnx_state_is_a_supported_tree():
  model = NnxBlock(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  ad = sl.init_adapters(state, [sl.kernel("query/kernel"), sl.kernel("fc/kernel")],
                        capacity=2, max_rank=2)
  assert [t.name for t in ad.spec.targets] == ["fc/kernel", "query/kernel"]
  ad = random_trained(sl.begin_task(ad, jax.random.key(0), 2), jax.random.key(1))
  new_state = sl.apply_adapters(state, ad)
  x = np.random.default_rng(1).normal(size=(3, D)).astype(np.float32)
  got = nnx.merge(graphdef, new_state)(jnp.asarray(x))
  pure = nnx.to_pure_dict(state)
  cur = snap(ad)
  wq = np.asarray(pure["query"]["kernel"], np.float64).reshape(D, D)
  a, b = cur["query/kernel"]
  wq = wq + 0.8 * (b @ a).T
  wf = np.asarray(pure["fc"]["kernel"], np.float64)
  a, b = cur["fc/kernel"]
  wf = wf + 0.8 * (b @ a).T
  h = x @ wq + np.asarray(pure["query"]["bias"]).reshape(D)
  want = h @ wf + np.asarray(pure["fc"]["bias"])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_unmatched_rule_is_a_clear_error():
  params = {"dense": {"kernel": jnp.zeros((3, 4))}}
  with pytest.raises(ValueError, match=r"matched no parameter.*dense/kernel"):
    sl.find_targets(params, [sl.kernel("blocks_.*/qkv/kernel")])
  with pytest.raises(ValueError, match="do not split"):
    sl.find_targets(params, [sl.fused_slices("dense/kernel", parts=3)])


@settings(max_examples=12, deadline=None)
@given(d_in=st.integers(2, 9), d_out=st.integers(2, 9),
       ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       extra_capacity=st.integers(0, 2), semantics=st.sampled_from(["reference", "paper"]))
def test_shapes_and_ranks_vary_per_task(d_in, d_out, ranks, extra_capacity, semantics):
  params = {"w": {"kernel": jnp.ones((d_in, d_out))}}
  max_rank = max(ranks)
  cap = len(ranks) + extra_capacity
  ad = sl.init_adapters(params, [sl.kernel("w/kernel")], capacity=cap,
                        max_rank=max_rank, policy=sl.get_policy(semantics))
  for t, r in enumerate(ranks):
    ad = sl.begin_task(ad, jax.random.key(t), r)
    assert ad.rank == r
    cur = ad.trainable["current"]["w/kernel"]
    # max_rank wide whatever the task's rank (a rank change never
    # recompiles a step), zero past it.
    assert cur["A"].shape == (max_rank, d_in)
    assert cur["B"].shape == (d_out, max_rank)
    assert not np.any(np.asarray(cur["A"])[r:])
    bound = 1 / np.sqrt(d_in)
    assert np.all(np.abs(np.asarray(cur["A"])) <= bound) and not np.any(cur["B"])
    ad = random_trained(ad, jax.random.key(100 + t))
    w = sl.apply_adapters(params, ad)["w"]["kernel"]
    assert w.shape == (d_in, d_out) and np.all(np.isfinite(np.asarray(w)))
    ad, _ = sl.end_task(ad)
  prev = ad.frozen["previous"]["w/kernel"]
  assert prev["A"].shape == (cap, max_rank, d_in)
  assert prev["B"].shape == (cap, d_out, max_rank)
  np.testing.assert_array_equal(sl.stored_ranks(ad), ranks)
  assert int(sl.num_stored(ad)) == len(ranks)
