"""Orbax checkpointing of the loop state and the config fingerprint check."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.runner import checkpoint as ckpt_lib


def _state(x):
  return {"a": jnp.full((3, 2), x, jnp.float32),
          "nested": {"b": jnp.arange(4, dtype=jnp.int32) * int(x)},
          "scalar": jnp.asarray(x, jnp.float32)}


def test_save_restore_keeps_latest_and_meta(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  assert c.read_meta() is None
  for i in range(1, 4):
    c.save(_state(float(i)), {"cursor": {"task": i}, "done": [i] * i})
  assert c.latest_step() == 3
  state, meta = c.restore(jax.eval_shape(lambda: _state(0.0)))
  np.testing.assert_array_equal(state["a"], np.full((3, 2), 3.0))
  np.testing.assert_array_equal(state["nested"]["b"], np.arange(4) * 3)
  assert meta == {"cursor": {"task": 3}, "done": [3, 3, 3]}
  assert c.read_meta()["cursor"]["task"] == 3
  # LatestN(2): the oldest checkpoint was removed.
  kept = sorted(d for d in os.listdir(c.directory) if d.isdigit())
  assert kept == ["2", "3"]
  c.close()


def test_restore_in_new_process_object(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path))
  c.save(_state(5.0), {"k": "v"})
  c.close()
  c2 = ckpt_lib.Checkpointer(str(tmp_path))
  state, meta = c2.restore(jax.eval_shape(lambda: _state(0.0)))
  assert float(state["scalar"]) == 5.0 and meta == {"k": "v"}


def test_fingerprint_mismatch_names_the_field():
  saved = {"method": "sdlora", "seed": 1993, "class_order": [1, 0]}
  ckpt_lib.check_fingerprint(saved, dict(saved))
  with pytest.raises(ckpt_lib.ConfigMismatchError, match=r"seed=1993.*seed=1994"):
    ckpt_lib.check_fingerprint(saved, dict(saved, seed=1994))
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="method"):
    ckpt_lib.check_fingerprint(saved, dict(saved, method="sdlora_kd"))
