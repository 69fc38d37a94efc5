"""SimpleCIL against the official arithmetic (a torch port), same features."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from slora_jax.methods import simplecil
from slora_jax.models import vit
from slora_jax.runner.methods import simplecil as methods_simplecil
from tests import method_util

torch = pytest.importorskip("torch")
from experiments import torch_inflora  # pylint: disable=wrong-import-position

EPS = np.finfo(np.float32).eps


def _features(seed, n, d=24):
  rng = np.random.default_rng(seed)
  # A shared offset, as real features have: cosines far from 0 stress rounding.
  return (rng.normal(size=(n, d)) + 2.0).astype(np.float32)


def test_prototypes_and_logits_match_the_official_code():
  c, d = 6, 24
  feats, labels = _features(0, 60, d), np.arange(60, dtype=np.int32) % c
  test = _features(1, 9, d)
  want_w, want = torch_inflora.simplecil_logits(feats, labels, range(c), test)
  # Two batches summed, as the plug-in accumulates them.
  sums = simplecil.add_class_sums(
      simplecil.class_sums(feats[:25], labels[:25], c),
      simplecil.class_sums(feats[25:], labels[25:], c))
  protos = simplecil.prototypes(sums)
  got = simplecil.cosine_logits(test, protos)
  # A mean over 10 features, a cosine over d terms: 10·eps and d·eps.
  np.testing.assert_allclose(protos, want_w, rtol=1e-5,
                             atol=10 * EPS * np.abs(want_w).max())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=d * EPS)
  assert np.abs(want).max() <= 1 + d * EPS and want.std() > 0.01


def test_unseen_classes_score_zero_and_padding_is_ignored():
  feats = jnp.asarray(_features(2, 4))
  sums = simplecil.class_sums(feats, jnp.array([0, 0, 1, 1]), 4,
                              valid=jnp.array([True, False, True, True]))
  protos = simplecil.set_prototypes(simplecil.init_prototypes(4, 24), sums,
                                    jnp.array([True, True, False, False]))
  np.testing.assert_allclose(protos[0], feats[0], rtol=1e-6)
  logits = simplecil.cosine_logits(feats, protos)
  assert not np.asarray(logits[:, 2:]).any()


def test_plugin_keeps_earlier_prototypes_and_trains_nothing():
  cfg = vit.vit_ti16(image_size=16, patch_size=8, depth=1)
  model = vit.VisionTransformer(cfg)
  params = vit.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(3)
  batches = [[(rng.uniform(0, 1, (4, 16, 16, 3)).astype(np.float32),
               np.array([2 * t, 2 * t + 1] * 2, np.int32))] for t in range(2)]
  method = methods_simplecil.SimpleCIL()
  run = method_util.run(method, model=model, model_config=cfg,
                        width=cfg.width, num_classes=4, num_phases=2)
  state = method.init(run, params)
  assert method.epochs(None) == 0 and not method.trainable(state.arrays)
  for t in range(2):
    task = method_util.task(t, 2 * t, 2 * t + 2, batches[t], epochs=0)
    state, losses, _ = method_util.run_task(method, run, state, task, params)
    assert losses == []
  apply = jax.jit(model.apply)
  feats = np.concatenate([np.asarray(apply({"params": params}, b[0][0]))
                          for b in batches])
  labels = np.concatenate([b[0][1] for b in batches])
  want_w, want = torch_inflora.simplecil_logits(feats, labels, range(4), feats)
  # Means of 2 features per class: 2 sums and a division, 4 eps at most.
  np.testing.assert_allclose(state.arrays["protos"], want_w, rtol=1e-5,
                             atol=4 * EPS * np.abs(want_w).max())
  got = jax.jit(lambda ar, x: method.logits(
      run, method.eval_arrays(run, ar, params), x))(state.arrays, np.concatenate(
      [b[0][0] for b in batches]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=cfg.width * EPS)
