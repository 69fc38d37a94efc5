"""The method registry and what each method trains."""

import jax
import numpy as np
import optax
import pytest

import slora_jax as sl
from experiments.configs import base
from slora_jax.models import vit
from slora_jax.runner import config as config_lib
from slora_jax.runner import methods
from slora_jax.runner import steps

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1,
                    num_heads=2, mlp_dim=32)


def _tree():
  params = vit.init_params(CFG, jax.random.key(0))
  ad = sl.init_adapters(params, sl.vit_qv_rules(), capacity=2, max_rank=2)
  ad = sl.begin_task(ad, jax.random.key(1), 2)
  return sl.trainable_params(ad, sl.init_head(jax.random.key(2), 16, 4))


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_each_method_updates_exactly_what_it_trains(name):
  m = methods.get_method(name)
  tx = steps.make_optimizer(train_magnitudes=m.trains_magnitudes,
                            train_adapters=m.trains_adapters)
  tree = _tree()
  state = steps._set_lr(tx.init(tree), 0.1)
  grads = jax.tree.map(np.ones_like, tree)
  upd, _ = tx.update(grads, state, tree)
  moved = lambda t: any(bool(np.any(np.asarray(x) != 0)) for x in jax.tree.leaves(t))
  assert moved(upd["head"])
  assert moved(upd["adapters"]["current"]) == m.trains_adapters
  assert moved(upd["adapters"]["magnitudes"]) == (m.trains_magnitudes and
                                                   m.trains_adapters)


def test_methods_fix_the_policy_they_need():
  c = base.base()
  c.method = "seq_lora"
  pol = config_lib.from_config(c).policy()
  assert pol.magnitude_init == 1.0 and not pol.reset_magnitudes
  c.method = "sdlora"
  assert config_lib.from_config(c).policy().magnitude_init == 0.8
  assert methods.get_method("joint").capacity(0, 1) == 1
  assert methods.get_method("sdlora").capacity(0, 7) == 7
  with pytest.raises(ValueError, match="unknown method 'lora'; choose one of"):
    methods.get_method("lora")


def test_rank_reduction_follows_the_schedule():
  c = base.base()
  c.method = "sdlora_rr"
  exp = config_lib.from_config(c)
  assert [exp.rank(t) for t in (0, 3, 4, 7, 8, 19)] == [10, 10, 8, 8, 6, 6]
  c.method = "sdlora"
  assert config_lib.from_config(c).rank(19) == 10
