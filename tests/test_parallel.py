"""The data-parallel train step on 4 (simulated) devices equals the 1-device step."""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 4, jax.devices()
    import slora_jax as sl
    from slora_jax.runner import parallel, steps
    from slora_jax.models import vit

    cfg = vit.ViTConfig(image_size=16, patch_size=4, width=32, depth=2,
                        num_heads=4, mlp_dim=64)
    model = vit.VisionTransformer(cfg)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    backbone = jax.device_get(vit.init_params(cfg, jax.random.key(0)))
    n_cls = 6
    tx = steps.make_optimizer()
    step = steps.make_train_step(apply_fn, n_cls, tx)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.random((8, 16, 16, 3), np.float32),
                "label": rng.integers(2, 4, 8).astype(np.int32),
                "mask": np.array([1] * 7 + [0], np.float32)} for _ in range(3)]

    def run(mesh):
      ad = sl.init_adapters(backbone, sl.vit_qv_rules("fused"), capacity=3,
                            max_rank=4, policy=sl.get_policy("reference"))
      ad = sl.begin_task(ad, jax.random.key(1), 4)
      ad, _ = sl.end_task(ad)
      ad = sl.begin_task(ad, jax.random.key(2), 4)
      head = sl.init_head(jax.random.key(3), cfg.width, n_cls)
      opt = tx.init(sl.trainable_params(ad, head))
      ad, head, opt, bb = parallel.replicate((ad, head, opt, backbone), mesh)
      losses = []
      for b in batches:
        ad, head, opt, m = step(ad, head, opt, bb, parallel.global_batch(b, mesh),
                                2, 4, 0.05)
        losses.append(float(m["loss"]))
      return jax.device_get((ad.trainable, head)), losses, ad

    one, l1, _ = run(parallel.make_mesh(jax.devices()[:1]))
    four, l4, ad4 = run(parallel.make_mesh())
    assert len(ad4.trainable["current"][next(iter(ad4.trainable["current"]))]["A"]
               .sharding.device_set) == 4
    np.testing.assert_allclose(l1, l4, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert l1[0] != l1[-1]  # the step really trained
    print("OK", l1)
""")


def test_four_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "OK" in r.stdout


def test_config_validation_leaves_the_backend_alone():
  """The runner validates its config before `jax.distributed.initialize()`,
  which refuses to run once any JAX call has started the XLA backend."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = textwrap.dedent("""
      import sys
      sys.path.insert(0, "tests")
      import tiny_config
      from jax._src import xla_bridge
      from slora_jax.runner import config
      config.from_config(tiny_config.get_config())
      print(xla_bridge.backends_are_initialized())
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=root, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == "False"
