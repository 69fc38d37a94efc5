"""The data-parallel train step on 4 (simulated) devices equals the 1-device step."""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 4, jax.devices()
    import slora_jax as sl
    from experiments.configs import base
    from slora_jax.runner import config, methods, parallel, steps
    from slora_jax.models import vit

    cfg = vit.ViTConfig(image_size=16, patch_size=4, width=32, depth=2,
                        num_heads=4, mlp_dim=64)
    backbone = jax.device_get(vit.init_params(cfg, jax.random.key(0)))
    n_cls = 6
    rng = np.random.default_rng(0)
    batches = [{"image": rng.random((8, 16, 16, 3), np.float32),
                "label": rng.integers(2, 4, 8).astype(np.int32),
                "mask": np.array([1] * 7 + [0], np.float32)} for _ in range(3)]

    def make_run(name):
      c = base.base()
      c.method, c.adapter.rank = name, 4
      c.model.name = "custom"
      c.model.image_size, c.model.patch_size, c.model.width = 16, 4, 32
      c.model.depth, c.model.num_heads, c.model.mlp_dim = 2, 4, 64
      exp = config.from_config(c)
      return exp.method, methods.base.Run(
          exp=exp, settings=exp.methods.get(name), seed=3,
          model=vit.VisionTransformer(cfg), model_config=cfg,
          backbone_template=backbone, width=cfg.width, num_classes=n_cls,
          num_phases=3)

    def second_task(method, run):
      arrays = method.init(run, backbone).arrays
      if "adapters" in arrays:   # one stored direction, a second begun
        ad = sl.begin_task(arrays["adapters"], jax.random.key(1), 4)
        ad, _ = sl.end_task(ad)
        arrays = {**arrays, "adapters": sl.begin_task(ad, jax.random.key(2), 4)}
      else:                      # InfLoRA: a designed-like A
        arrays = {**arrays, "a": jax.tree.map(
            lambda a: jax.random.normal(jax.random.key(4), a.shape) / 8,
            arrays["a"])}
      return arrays

    # Each method at its own scale of rate: Adam's steps are ±lr wherever a
    # gradient is far above its eps, so InfLoRA runs at its official 5e-4.
    RATES = {"sdlora": 0.05, "inflora": 5e-4}

    def run(name, mesh):
      method, r = make_run(name)
      step = steps.make_train_step(method, r)
      arrays = second_task(method, r)
      state = steps.TrainState(arrays, steps.init_opt_state(method, r, arrays))
      state, bb = parallel.replicate((state, backbone), mesh)
      losses = []
      for b in batches:
        state, m = step(state, parallel.global_batch(b, mesh),
                        steps.task_args(1, 2, 4, RATES[name]), bb)
        losses.append(float(m["loss"]))
      return jax.device_get(method.trainable(state.arrays)), losses, state

    for name in ("sdlora", "inflora"):
      one, l1, _ = run(name, parallel.make_mesh(jax.devices()[:1]))
      four, l4, st4 = run(name, parallel.make_mesh())
      assert all(len(x.sharding.device_set) == 4
                 for x in jax.tree.leaves(st4.arrays))
      np.testing.assert_allclose(l1, l4, rtol=1e-5, atol=1e-6)
      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      assert l1[0] != l1[-1], name  # the step really trained
      print("OK", name, l1)
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
