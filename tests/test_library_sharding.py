"""Sharded models (4 simulated CPU devices, kernels split over a ``model``
mesh axis): the adapters keep each kernel's sharding and give the unsharded
values; the factors get the shardings `slora_jax.sharding` documents."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import slora_jax as sl
    assert jax.device_count() == 4, jax.devices()

    class Net(nn.Module):  # Megatron-style: column-, then row-parallel
      @nn.compact
      def __call__(self, x):
        h = nn.DenseGeneral((4, 4), name="heads")(x)          # (b, 4, 4)
        h = nn.relu(nn.Dense(16, name="up")(h.reshape(x.shape[0], 16)))
        return nn.Dense(8, name="down")(h)

    model = Net()
    x = jax.random.normal(jax.random.key(0), (2, 8))
    params = model.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    mesh = jax.make_mesh((4,), ("model",), axis_types=(AxisType.Auto,))
    layout = {"heads": P(None, "model"), "up": P(None, "model"),
              "down": P("model", None)}
    sharded = {k: {"kernel": jax.device_put(v["kernel"], NamedSharding(
                   mesh, layout[k])), "bias": v["bias"]}
               for k, v in params.items()}
    rules = [sl.kernel("heads/kernel"), sl.kernel("up/kernel"),
             sl.fused_slices("down/kernel", parts=2, take=((1, "second"),),
                             layout="in_out")]

    def trained(ps):
      ad = sl.init_adapters(ps, rules, capacity=3, max_rank=2)
      for t in range(2):
        ad = sl.begin_task(ad, jax.random.key(t), 2)
        ad = ad.replace(trainable=jax.tree.map(
            lambda a: a + 0.1 * (t + 1), ad.trainable))
        if t == 0:
          ad, _ = sl.end_task(ad)
      return ad

    ad = trained(params)
    sad = sl.shard_adapters(trained(sharded), sharded)
    specs = {k: tuple(v.sharding.spec) for k, v in
             sad.trainable["current"]["heads/kernel"].items()}
    assert specs == {"A": (None, None), "B": ("model", None)}, specs
    assert tuple(sad.frozen["previous"]["up/kernel"]["B"].sharding.spec) == (
        None, "model", None)
    assert tuple(sad.trainable["current"]["down/kernel[second]"]["A"]
                 .sharding.spec) == (None, "model")
    assert sad.trainable["magnitudes"]["previous"].sharding.is_fully_replicated

    def same_sharding(out, ref):
      for k in layout:
        got, want = out[k]["kernel"].sharding, ref[k]["kernel"].sharding
        assert got.is_equivalent_to(want, ref[k]["kernel"].ndim), (k, got)
        np.testing.assert_allclose(out[k]["kernel"], want_tree[k]["kernel"],
                                   atol=1e-6)

    want_tree = sl.apply_adapters(params, ad)
    for fn in (sl.apply_adapters, jax.jit(sl.apply_adapters), sl.merge,
               jax.jit(sl.merge)):
      same_sharding(fn(sharded, sad), sharded)

    # The training form: the kernels the model runs on keep their sharding,
    # and value and gradients are the unsharded ones.
    def loss(tr, ps, a, form):
      a = a.replace(trainable=tr)
      fn = lambda p, x: (apply_fn(p, x), p)
      y, base = (fn(sl.apply_adapters(ps, a), x) if form == "weight"
                 else sl.apply_with_adapters(fn, ps, a, x))
      return jnp.sum(jnp.sin(y)), base

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=3)
    (v0, _), g0 = grad(ad.trainable, params, ad, "weight")
    (v1, base), g1 = grad(sad.trainable, sharded, sad, "activation")
    want_tree = jax.tree.map(np.asarray, sl.merge(params, ad))
    same_sharding(base, sharded)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-5), g1, g0)
    print("ok")
""")


def test_sharded_kernels_keep_their_sharding_and_values():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")
