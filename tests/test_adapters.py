"""SD-LoRA adapter core: formulas against numpy, freezing, gradients, KD."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slora_jax as sl

D = 12          # model width of the toy trees
H, HD = 3, 4    # heads × head_dim = D


def toy_params(seed=0):
  """A tree with a fused qkv Dense, a plain Dense and DenseGeneral kernels."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "blocks_0": {"attn": {"qkv": {"kernel": f(D, 3 * D), "bias": f(3 * D)}},
                   "mlp": {"fc1": {"kernel": f(D, 2 * D), "bias": f(2 * D)}}},
      "blocks_1": {"attn": {"query": {"kernel": f(D, H, HD)},
                            "out": {"kernel": f(H, HD, D)}}},
  }


RULES = (sl.fused_slices(r"blocks_0/attn/qkv/kernel"),
         sl.kernel(r"blocks_0/mlp/fc1/kernel"),
         sl.kernel(r"blocks_1/attn/query/kernel"),
         sl.kernel(r"blocks_1/attn/out/kernel", in_dims=2))


def train_like(adapters, key):
  """Gives the current factors and magnitudes arbitrary non-zero values."""
  leaves, tdef = jax.tree.flatten(adapters.trainable)
  keys = jax.random.split(key, len(leaves))
  leaves = [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return adapters.replace(trainable=jax.tree.unflatten(tdef, leaves))


def np_norm(b, a, how):
  if how == "factor_norms":
    return np.linalg.norm(b) * np.linalg.norm(a)
  return np.linalg.norm(b @ a)


def expected_kernels(params, history, current, mags_prev, alpha_cur, pol,
                     absorbed=None):
  """W0 + Σ α_i D_i + α_cur c B A computed directly in float64 numpy.

  ``history`` is a list (one entry per stored task) of {target: (A, B)} as they
  were at the end of that task; ``current`` is {target: (A, B)}.
  """
  tgts = sl.find_targets(params, RULES)
  out = {}
  for t in tgts:
    d = np.zeros((t.d_out, t.d_in))
    for i, h in enumerate(history):
      a, b = (np.asarray(x, np.float64) for x in h[t.name])
      mag = mags_prev[i] + (0 if absorbed is None else absorbed[i])
      d += mag * (b @ a) / np_norm(b, a, pol.direction_norm)
    a, b = (np.asarray(x, np.float64) for x in current[t.name])
    c = 1.0
    if pol.normalize_current:
      c = 1.0 / max(np.linalg.norm(b @ a), pol.current_norm_floor)
    d += alpha_cur * c * (b @ a)
    out.setdefault(t.path, []).append((t, d.T))  # Flax layout: (d_in, d_out)
  flat = {}
  for path, items in out.items():
    w0 = np.asarray(_get(params, path), np.float64)
    t0 = items[0][0]
    w = w0.reshape(t0.d_in, t0.d_out_total).copy()
    for t, dt in items:
      lo, hi = t.cols or (0, t.d_out_total)
      w[:, lo:hi] += dt
    flat[path] = w.reshape(w0.shape)
  return flat


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def snapshot(adapters):
  return {n: (np.asarray(c["A"]), np.asarray(c["B"]))
          for n, c in adapters.trainable["current"].items()}


@pytest.mark.parametrize("semantics", ["reference", "paper"])
def test_apply_matches_numpy_formula(semantics):
  params = toy_params()
  pol = sl.get_policy(semantics)
  ad = sl.init_adapters(params, RULES, capacity=4, max_rank=3, policy=pol)
  key = jax.random.key(0)
  history = []
  ranks = [3, 2, 3]
  for t, r in enumerate(ranks):
    ad = sl.begin_task(ad, jax.random.fold_in(key, t), r)
    ad = train_like(ad, jax.random.fold_in(key, 100 + t))
    if t < len(ranks) - 1:
      history.append(snapshot(ad))
      ad, _ = sl.end_task(ad)
  mags = np.asarray(ad.trainable["magnitudes"]["previous"], np.float64)
  alpha = float(ad.trainable["magnitudes"]["current"])
  want = expected_kernels(params, history, snapshot(ad), mags, alpha, pol)
  got = jax.jit(sl.apply_adapters)(params, ad)
  for path, w in want.items():
    np.testing.assert_allclose(np.asarray(_get(got, path)), w, rtol=1e-5,
                               atol=1e-5, err_msg=path)
  # Leaves that are not targets come back untouched.
  np.testing.assert_array_equal(got["blocks_0"]["attn"]["qkv"]["bias"],
                                params["blocks_0"]["attn"]["qkv"]["bias"])
  # The k third of the fused kernel is never adapted.
  np.testing.assert_array_equal(got["blocks_0"]["attn"]["qkv"]["kernel"][:, D:2 * D],
                                params["blocks_0"]["attn"]["qkv"]["kernel"][:, D:2 * D])


def test_reference_resets_and_paper_carries_magnitudes():
  params = toy_params()
  for pol, expect_reset in ((sl.reference(), True), (sl.paper(), False)):
    ad = sl.init_adapters(params, RULES, capacity=3, max_rank=2, policy=pol)
    ad = sl.begin_task(ad, jax.random.key(1), 2)
    np.testing.assert_allclose(ad.trainable["magnitudes"]["current"],
                               pol.magnitude_init)
    trained = ad.trainable["magnitudes"] | {"current": jnp.asarray(1.7)}
    ad = ad.replace(trainable=ad.trainable | {"magnitudes": trained})
    ad, _ = sl.end_task(ad)
    ad = sl.begin_task(ad, jax.random.key(2), 2)
    prev0 = float(ad.trainable["magnitudes"]["previous"][0])
    assert prev0 == pytest.approx(pol.magnitude_init if expect_reset else 1.7)


def loss_fn(trainable, adapters, params, x):
  ad = adapters.replace(trainable=trainable)
  p = sl.apply_adapters(params, ad)
  w = p["blocks_0"]["attn"]["qkv"]["kernel"]
  w2 = p["blocks_1"]["attn"]["out"]["kernel"].reshape(D, D)
  h = jnp.tanh(x @ w)[:, :D] @ p["blocks_0"]["mlp"]["fc1"]["kernel"]
  return jnp.mean(jnp.square(h[:, :D] @ w2 + jnp.einsum(
      "nd,dhk->nhk", x, p["blocks_1"]["attn"]["query"]["kernel"]).reshape(-1, D)))


def test_five_tasks_freeze_previous_and_grads_reach_trainables_only():
  params = toy_params()
  ad = sl.init_adapters(params, RULES, capacity=5, max_rank=2)
  x = jax.random.normal(jax.random.key(3), (8, D))
  tx = sl.optimizer(0.05)
  step = jax.jit(lambda tr, st, ad: _sgd_step(tr, st, ad, params, x, tx))
  stored = []
  for t in range(5):
    ad = sl.begin_task(ad, jax.random.fold_in(jax.random.key(4), t), 2)
    frozen_before = jax.tree.map(np.asarray, ad.frozen)
    tr, st = ad.trainable, tx.init(ad.trainable)
    for _ in range(3):
      tr, st, grads = step(tr, st, ad)
    # The gradient tree is exactly the trainable tree: same structure, shapes.
    chex.assert_trees_all_equal_shapes(grads, ad.trainable)
    # Gradients reach the magnitudes of stored tasks and none of the unused.
    gp = np.asarray(grads["magnitudes"]["previous"])
    assert np.all(gp[t:] == 0)
    if t > 0:
      assert np.all(gp[:t] != 0)
    ad = ad.replace(trainable=tr)
    # Frozen slots are bit-identical after the training steps.
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, ad.frozen), frozen_before)
    stored.append(snapshot(ad))
    ad, _ = sl.end_task(ad)
    for i, snap in enumerate(stored):  # every earlier direction still intact
      for name, (a, b) in snap.items():
        np.testing.assert_array_equal(ad.frozen["previous"][name]["A"][i], a)
        np.testing.assert_array_equal(ad.frozen["previous"][name]["B"][i], b)
  assert int(sl.num_stored(ad)) == 5
  with pytest.raises(ValueError, match="slots are used"):
    sl.begin_task(ad, jax.random.key(0), 2)


def _sgd_step(trainable, opt_state, adapters, params, x, tx):
  grads = jax.grad(loss_fn)(trainable, adapters, params, x)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, grads


def test_frozen_slots_get_no_gradient_work():
  """The frozen factors are stop_gradient-ed: their gradient is exactly zero."""
  params = toy_params()
  ad = sl.init_adapters(params, RULES, capacity=2, max_rank=2)
  ad = train_like(sl.begin_task(ad, jax.random.key(0), 2), jax.random.key(1))
  ad, _ = sl.end_task(ad)
  x = jnp.ones((2, D))
  g = jax.grad(lambda fr: loss_fn(ad.trainable, ad.replace(frozen=fr), params, x),
               allow_int=True)(ad.frozen)
  for leaf in jax.tree.leaves(g["previous"]):
    assert not np.any(np.asarray(leaf))


def unit(v):
  return v / np.linalg.norm(v)


@pytest.mark.parametrize("semantics", ["reference", "paper"])
def test_kd_absorbs_in_span_and_keeps_out_of_span(semantics):
  """A new direction inside the span of stored ones is absorbed exactly.

  Each target gets orthonormal input vectors u0, u1 and unit output vectors
  v0, v1. Stored tasks are the rank-1 directions v_k u_k (unit norm under both
  normalisations); the new task is A = [u0; u1], B = [c0 v0, c1 v1], whose
  normalised direction is Σ_k (c_k / n) v_k u_k with n = |c| (‖BA‖) or
  √2·|c| (‖B‖‖A‖), the same in every target, so shared coefficients fit it.
  """
  params = toy_params()
  pol = sl.get_policy(semantics)
  tgts = sl.find_targets(params, RULES)
  rng = np.random.default_rng(0)
  uv = {}
  for t in tgts:
    q, _ = np.linalg.qr(rng.normal(size=(t.d_in, 2)))
    uv[t.name] = (q.T, [unit(rng.normal(size=t.d_out)) for _ in range(2)])
  ad = sl.init_adapters(params, RULES, capacity=3, max_rank=2, policy=pol)
  for k in range(2):
    ad = sl.begin_task(ad, jax.random.key(k), 1)
    cur = {n: {"A": jnp.asarray(u[k:k + 1], jnp.float32),
               "B": jnp.asarray(v[k][:, None], jnp.float32)}
           for n, (u, v) in uv.items()}
    ad = ad.replace(trainable=ad.trainable | {"current": cur})
    ad, info = sl.end_task(ad, knowledge_distillation=True)
    assert not bool(info["absorbed"])      # the first two are independent
  assert int(sl.num_stored(ad)) == 2

  c = np.array([0.6, -0.3])
  ad = sl.begin_task(ad, jax.random.key(5), 2)
  cur = {n: {"A": jnp.asarray(u, jnp.float32),
             "B": jnp.asarray(np.stack([c[0] * v[0], c[1] * v[1]], 1), jnp.float32)}
         for n, (u, v) in uv.items()}
  alpha = 1.3
  mags = ad.trainable["magnitudes"] | {"current": jnp.asarray(alpha)}
  ad = ad.replace(trainable={"current": cur, "magnitudes": mags})
  after, info = sl.end_task(ad, knowledge_distillation=True)
  assert bool(info["absorbed"]), float(info["residual"])
  assert float(info["residual"]) < 1e-5
  assert int(sl.num_stored(after)) == 2            # no new direction stored
  n = np.linalg.norm(c) * (np.sqrt(2) if pol.direction_norm == "factor_norms" else 1)
  np.testing.assert_allclose(after.frozen["absorbed"][:2], alpha * c / n,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(after.frozen["absorbed"][2:], 0)
  # The stored slots themselves are untouched by the absorption.
  chex.assert_trees_all_equal(after.frozen["previous"], ad.frozen["previous"])

  # The absorbed offsets survive the next task's magnitude re-creation.
  nxt = sl.begin_task(after, jax.random.key(6), 2)
  np.testing.assert_allclose(nxt.frozen["absorbed"][:2], alpha * c / n, rtol=1e-5)

  # A random direction is outside the span and is stored.
  nxt = train_like(nxt, jax.random.key(11))
  nxt, info = sl.end_task(nxt, knowledge_distillation=True)
  assert not bool(info["absorbed"])
  assert float(info["residual"]) > 0.1
  assert int(sl.num_stored(nxt)) == 3


def test_kd_unit_offset_and_squared_residual_settings():
  params = toy_params()
  pol = sl.reference(kd_offset="unit", kd_residual="squared", kd_threshold=0.5)
  ad = sl.init_adapters(params, RULES, capacity=2, max_rank=2, policy=pol)
  ad = train_like(sl.begin_task(ad, jax.random.key(0), 2), jax.random.key(1))
  first = ad
  ad, _ = sl.end_task(ad, knowledge_distillation=True)
  # The same direction again, at twice the scale and another magnitude: the
  # normalised directions coincide, the coefficient is 1 under 'unit'.
  cur = jax.tree.map(lambda x: 2 * x, first.trainable["current"])
  mags = ad.trainable["magnitudes"] | {"current": jnp.asarray(3.0)}
  ad = sl.begin_task(ad, jax.random.key(2), 2)
  ad = ad.replace(trainable={"current": cur, "magnitudes": mags})
  ad, info = sl.end_task(ad, knowledge_distillation=True)
  assert bool(info["absorbed"])
  np.testing.assert_allclose(ad.frozen["absorbed"][0], 1.0, rtol=1e-5)


@pytest.mark.parametrize("semantics", ["reference", "paper"])
def test_gradients_finite_at_task_start(semantics):
  """B = 0 at every task's start: ‖BA‖ = 0 must not turn gradients into NaN.

  Under the paper's normalised current direction the floor is what the
  gradient sees there: d(α·BA/floor)/dB, finite and non-zero.
  """
  params = toy_params()
  ad = sl.init_adapters(params, RULES, capacity=3, max_rank=2,
                        policy=sl.get_policy(semantics))
  ad = sl.begin_task(ad, jax.random.key(0), 2)

  def loss(trainable, state):
    out = sl.apply_adapters(params, state.replace(trainable=trainable))
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

  grads = jax.grad(loss)(ad.trainable, ad)
  chex.assert_tree_all_finite(grads)
  gb = grads["current"]["blocks_0/mlp/fc1/kernel"]["B"]
  assert float(jnp.abs(gb).max()) > 0
  if semantics == "paper":
    # Relative to the raw (reference) gradient, the floor scales it by 1/floor.
    ref = sl.init_adapters(params, RULES, capacity=3, max_rank=2)
    ref = sl.begin_task(ref, jax.random.key(0), 2)
    ref = ref.replace(trainable={**ref.trainable, "magnitudes": {
        "current": jnp.ones(()), "previous": ref.trainable["magnitudes"]["previous"]}})
    g_ref = jax.grad(loss)(ref.trainable, ref)["current"]["blocks_0/mlp/fc1/kernel"]["B"]
    floor = sl.paper().current_norm_floor
    np.testing.assert_allclose(np.asarray(gb), np.asarray(g_ref) / floor,
                               rtol=1e-4, atol=1e-6)


# --- a rank change keeps every shape (issue #23) ------------------------------

def _narrow(ad, rank):
  """``ad`` with its current pair cut to ``rank`` (the layout before the pair
  was always max_rank wide)."""
  cur = {n: {"A": p["A"][:rank], "B": p["B"][:, :rank]}
         for n, p in ad.trainable["current"].items()}
  return ad.replace(trainable={**ad.trainable, "current": cur})


@pytest.mark.parametrize("semantics", ["reference", "paper"])
def test_a_smaller_rank_is_the_padded_max_rank_pair(semantics):
  params = toy_params()
  ad = sl.init_adapters(params, RULES, capacity=3, max_rank=4,
                        policy=sl.get_policy(semantics))
  ad = sl.begin_task(ad, jax.random.key(1), 2)
  for p in ad.trainable["current"].values():
    assert p["A"].shape[0] == 4 and p["B"].shape[1] == 4
    np.testing.assert_array_equal(p["A"][2:], 0)
  assert ad.rank == 2
  # Train with Adam: rows past the rank get exactly zero gradient and update,
  # and values and gradients are those of the narrow (rank-2) pair.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, D)), jnp.float32)
  def loss(tr, a):
    merged = sl.apply_adapters(params, a.replace(trainable=tr))
    w = merged["blocks_0"]["attn"]["qkv"]["kernel"]
    query = merged["blocks_1"]["attn"]["query"]["kernel"].reshape(D, -1)
    return jnp.sum(jnp.sin(x @ w)) + jnp.sum(jnp.sin(x @ query))
  tx = optax.adamw(0.1)
  opt = tx.init(ad.trainable)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  for _ in range(3):
    (v, g), (vn, gn) = (value_and_grad(a.trainable, a)
                        for a in (ad, _narrow(ad, 2)))
    # The same products with zero terms added, summed in another order: each
    # x·W entry (D terms) may move by D·eps·Σ|terms|, the loss by their sum;
    # gradients sum over the 5 rows of x as well.
    merged = sl.apply_adapters(params, ad)
    eps = np.finfo(np.float32).eps
    mass = sum(float(jnp.sum(jnp.abs(x) @ jnp.abs(w.reshape(D, -1)))) for w in (
        merged["blocks_0"]["attn"]["qkv"]["kernel"],
        merged["blocks_1"]["attn"]["query"]["kernel"]))
    assert abs(float(v) - float(vn)) <= D * eps * mass
    for name, p in g["current"].items():
      np.testing.assert_array_equal(p["A"][2:], 0)
      np.testing.assert_array_equal(p["B"][:, 2:], 0)
      for k, want in gn["current"][name].items():
        got = p[k][:2] if k == "A" else p[k][:, :2]
        tol = 5 * D * eps * (float(jnp.max(jnp.abs(want))) + 1e-30)
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    updates, opt = tx.update(g, opt, ad.trainable)
    ad = ad.replace(trainable=optax.apply_updates(ad.trainable, updates))
    for p in ad.trainable["current"].values():
      np.testing.assert_array_equal(p["A"][2:], 0)
      np.testing.assert_array_equal(p["B"][:, 2:], 0)
  ad, _ = sl.end_task(ad)
  assert list(sl.stored_ranks(ad)) == [2]


def test_a_rank_schedule_compiles_the_step_once():
  params = toy_params()
  ad = sl.init_adapters(params, RULES, capacity=3, max_rank=4)
  step = jax.jit(lambda a: jax.grad(lambda tr: jnp.sum(jax.tree.leaves(
      sl.apply_adapters(params, a.replace(trainable=tr)))[0]))(a.trainable))
  for task, rank in enumerate((4, 2, 2)):
    ad = sl.begin_task(ad, jax.random.key(task), rank)
    step(ad)
    ad, _ = sl.end_task(ad)
  assert step._cache_size() == 1
