"""The activation (training) form on other people's Flax models: NNX layers
and attention, Linen attention and einsums, against the weight form.

Every case trains nothing: it compares the value and the gradients of
``sum(sin(model(x)))`` w.r.t. the trainable adapters in the two forms, with
stored directions, non-trivial magnitudes and a current pair away from zero.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slora_jax as sl

D, H = 8, 2


def _trained(params, rules, stored=2, rank=3):
  ad = sl.init_adapters(params, rules, capacity=4, max_rank=rank,
                        policy=sl.paper())
  noise = lambda tree, k: jax.tree.map(
      lambda x: x + 0.3 * jax.random.normal(k, x.shape), tree)
  for i in range(stored):
    ad = sl.begin_task(ad, jax.random.key(i), rank)
    ad = ad.replace(trainable=noise(ad.trainable, jax.random.key(50 + i)))
    ad, _ = sl.end_task(ad)
  ad = sl.begin_task(ad, jax.random.key(9), rank)
  return ad.replace(trainable=noise(ad.trainable, jax.random.key(8)))


def _assert_forms_agree(apply_fn, params, ad, *args):
  def loss(tr, form):
    a = ad.replace(trainable=tr)
    out = (apply_fn(sl.apply_adapters(params, a), *args) if form == "weight"
           else sl.apply_with_adapters(apply_fn, params, a, *args))
    return jnp.sum(jnp.sin(out))

  vw, gw = jax.value_and_grad(loss)(ad.trainable, "weight")
  va, ga = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
      ad.trainable, "activation")
  np.testing.assert_allclose(va, vw, rtol=1e-5, atol=1e-5)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(gw),
                               jax.tree.leaves(ga)):
    scale = float(jnp.max(jnp.abs(want))) + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(gw["current"][ad.spec.targets[0].name]["B"]).max()) > 0


# --- NNX ----------------------------------------------------------------------

class NnxNet(nnx.Module):
  """Linear, LinearGeneral (head axes out, and in) and an Einsum."""

  def __init__(self, rngs):
    self.up = nnx.Linear(D, 2 * D, rngs=rngs)
    self.heads = nnx.LinearGeneral(2 * D, (H, D // H), rngs=rngs)
    self.merge = nnx.LinearGeneral((H, D // H), D, axis=(-2, -1), rngs=rngs)
    self.mix = nnx.Einsum("btd,dk->btk", (D, D), (D,), rngs=rngs)

  def __call__(self, x):
    h = self.heads(jnp.tanh(self.up(x)))
    return self.mix(jnp.tanh(self.merge(h)))


def test_nnx_linear_linear_general_and_einsum():
  model = NnxNet(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rules = [sl.kernel("up/kernel"), sl.kernel("heads/kernel"),
           sl.kernel("merge/kernel", in_dims=2), sl.kernel("mix/kernel")]
  ad = _trained(state, rules)
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  _assert_forms_agree(lambda s, x: nnx.merge(graphdef, s)(x), state, ad, x)


class NnxAttention(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(H, D, decode=False, rngs=rngs)
    self.fc = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.attn(x).mean(1))


def test_nnx_multi_head_attention_q_k_v_and_out():
  model = NnxAttention(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rules = [sl.kernel(r"attn/(query|key|value)/kernel"),
           sl.kernel("attn/out/kernel", in_dims=2)]
  ad = _trained(params, rules)
  assert len(ad.spec.targets) == 4
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  _assert_forms_agree(lambda p, x: nnx.merge(graphdef, p, rest)(x), params,
                      ad, x)


def test_nnx_layers_are_restored_after_the_call():
  calls = [nnx.Linear.__call__, nnx.LinearGeneral.__call__, nnx.Einsum.__call__]
  test_nnx_linear_linear_general_and_einsum()
  assert [nnx.Linear.__call__, nnx.LinearGeneral.__call__,
          nnx.Einsum.__call__] == calls


def test_nnx_training_loop_begin_end_merge():
  """Three tasks of an NNX classifier trained in the activation form; after
  each, the merged model computes what the training form does."""
  model = NnxAttention(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  apply_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  ad = sl.init_adapters(params, [sl.kernel(r"attn/(query|value)/kernel")],
                        capacity=3, max_rank=2)
  head = sl.init_head(jax.random.key(1), 3, 6)
  tx = optax.sgd(0.1)

  @jax.jit
  def step(ad, head, opt, x, y):
    def loss(tree):
      a, h = sl.with_trainable_params(ad, tree)
      logits = sl.apply_head(h, sl.apply_with_adapters(apply_fn, params, a, x))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    tree = sl.trainable_params(ad, head)
    value, grads = jax.value_and_grad(loss)(tree)
    updates, opt = tx.update(grads, opt, tree)
    return *sl.with_trainable_params(ad, optax.apply_updates(tree, updates)), opt, value

  rng = np.random.default_rng(0)
  for task in range(3):
    ad = sl.begin_task(ad, jax.random.key(10 + task), 2)
    opt = tx.init(sl.trainable_params(ad, head))
    x = rng.normal(size=(4, 5, D)).astype(np.float32)
    y = np.array([2 * task, 2 * task + 1] * 2)
    losses = []
    for _ in range(3):
      ad, head, opt, value = step(ad, head, opt, x, y)
      losses.append(float(value))
    assert losses[-1] < losses[0]
    # The merged model computes what the training form does.
    np.testing.assert_allclose(
        apply_fn(sl.merge(params, ad), x),
        sl.apply_with_adapters(apply_fn, params, ad, x), atol=1e-5)
    ad, _ = sl.end_task(ad)
  assert int(sl.num_stored(ad)) == 3
  merged = sl.merge(params, ad)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(apply_fn(merged, x), apply_fn(
      sl.apply_adapters(params, ad), x), atol=1e-6)


# --- Linen --------------------------------------------------------------------

class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=H, name="attn")(x)
    return nn.Dense(3, name="fc")(h.mean(1))


def test_linen_multi_head_dot_product_attention():
  model = LinenAttention()
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  params = model.init(jax.random.key(0), x)["params"]
  rules = [sl.kernel(r"attn/(query|key|value)/kernel"),
           sl.kernel("attn/out/kernel", in_dims=2)]
  ad = _trained(params, rules)
  _assert_forms_agree(lambda p, x: model.apply({"params": p}, x), params, ad, x)


class LinenEinsums(nn.Module):
  """An Einsum with the free axes reordered, a DenseGeneral on a middle axis."""

  @nn.compact
  def __call__(self, x):                                     # (b, t, d)
    h = nn.Einsum((D, H, D), "btd,dhk->tbhk", name="proj")(x)  # (t, b, h, k)
    g = nn.DenseGeneral(4, axis=1, name="mid")(h)            # (t, h, k, 4)
    return jnp.tanh(g)


def test_linen_einsum_and_dense_general_on_a_middle_axis():
  model = LinenEinsums()
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  params = model.init(jax.random.key(0), x)["params"]
  ad = _trained(params, [sl.kernel("proj/kernel"), sl.kernel("mid/kernel")])
  _assert_forms_agree(lambda p, x: model.apply({"params": p}, x), params, ad, x)


def test_einsum_whose_kernel_is_not_one_map_is_a_clear_error():
  class PerHead(nn.Module):
    @nn.compact
    def __call__(self, x):                                   # (b, h, d)
      return nn.Einsum((H, D, 3), "bhd,hdk->bhk", use_bias=False,
                       name="w")(x)
  model = PerHead()
  x = jnp.ones((2, H, D))
  params = model.init(jax.random.key(0), x)["params"]
  ad = _trained(params, [sl.kernel("w/kernel", in_dims=2)], stored=0)
  with pytest.raises(ValueError, match=r"w/kernel: einsum 'bhd,hdk->bhk' is "
                     r"not a product.*apply_adapters"):
    sl.apply_with_adapters(lambda p, x: model.apply({"params": p}, x), params,
                           ad, x)


# --- layers whose map of the kernel is not known (issue #23) ----------------

class _OwnKernel(nn.Module):
  """A hand-written layer: its kernel (``shape``) used as ``how`` says."""
  shape: tuple
  how: str

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.normal(1.0), self.shape)
    return {"plain": lambda: x @ k, "scaled": lambda: x @ (2 * k),
            "transposed": lambda: x @ k.T,
            "plus_input": lambda: x @ k + jnp.tanh(x)}[self.how]()


class _Wrapped(nn.Module):
  shape: tuple
  how: str

  @nn.compact
  def __call__(self, x):
    return _OwnKernel(self.shape, self.how, name="lin")(x)


class _DenseTimesTwo(nn.Dense):
  def __call__(self, inputs):
    return super().__call__(2 * inputs)


def _own_layer(shape, how, layout):
  model = _Wrapped(shape, how)
  x = jax.random.normal(jax.random.key(1), (2, 3, D))
  params = model.init(jax.random.key(0), x)["params"]
  rules = [sl.kernel("lin/kernel", layout=layout)]
  return (lambda p, x: model.apply({"params": p}, x)), params, rules, x


@pytest.mark.parametrize("shape,how,layout", [
    ((D, D), "scaled", "in_out"),        # square: the shapes fit, the map not
    ((D, D), "transposed", "in_out"),
    ((D, D), "plain", "out_in"),
    ((2 * D, D), "transposed", "in_out"),   # (out, in) read as (in, out)
])
def test_a_kernel_used_otherwise_than_input_times_kernel_is_refused(
    shape, how, layout):
  apply_fn, params, rules, x = _own_layer(shape, how, layout)
  ad = _trained(params, rules, stored=1)
  with pytest.raises(ValueError, match=r"apply_with_adapters: lin/kernel: "
                     r"_OwnKernel is no Flax Dense.*use the weight form"):
    jax.grad(lambda tr: jnp.sum(sl.apply_with_adapters(
        apply_fn, params, ad.replace(trainable=tr), x)))(ad.trainable)


@pytest.mark.parametrize("shape,how,layout", [
    ((D, 2 * D), "plain", "in_out"),
    ((2 * D, D), "transposed", "out_in"),   # HF Conv1D / PyTorch layout
    ((D, D), "transposed", "out_in"),
    ((D, D), "plus_input", "in_out"),       # a term free of the kernel is fine
])
def test_a_hand_written_layer_verified_by_the_probe_agrees(shape, how, layout):
  apply_fn, params, rules, x = _own_layer(shape, how, layout)
  _assert_forms_agree(apply_fn, params, _trained(params, rules), x)


@pytest.mark.parametrize("layer", [
    lambda: _DenseTimesTwo(D, name="lin"),     # the tap would see x, not 2x
    lambda: nn.Dense(D, name="lin", dot_general=(
        lambda a, b, *args, **kw: jax.lax.dot_general(a, 2 * b, *args, **kw))),
])
def test_a_dense_whose_map_is_changed_is_probed_and_refused(layer):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layer()(x)
  model = Net()
  x = jnp.ones((2, D))
  params = model.init(jax.random.key(0), x)["params"]
  ad = _trained(params, [sl.kernel("lin/kernel")], stored=0)
  with pytest.raises(ValueError, match=r"lin/kernel: \w+ is no Flax Dense.*"
                     r"does not change with the kernel as input·kernel"):
    sl.apply_with_adapters(lambda p, x: model.apply({"params": p}, x), params,
                           ad, x)


def test_nnx_linear_with_a_replaced_product_is_refused():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(D, D, rngs=rngs, dot_general=(
          lambda a, b, *args, **kw: jax.lax.dot_general(a, b.T, *args, **kw)))

    def __call__(self, x):
      return self.lin(x)
  graphdef, params = nnx.split(Net(nnx.Rngs(0)))
  ad = _trained(params, [sl.kernel("lin/kernel")], stored=0)
  with pytest.raises(ValueError,
                     match=r"lin/kernel: Linear .*replaced product"):
    sl.apply_with_adapters(lambda s, x: nnx.merge(graphdef, s)(x), params, ad,
                           jnp.ones((2, D)))
