"""`slora_jax.save_adapters` / `load_adapters`: the adapter state alone."""

import jax
import numpy as np
import pytest

import slora_jax as sl
from slora_jax.models import vit

CFG = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=2,
                    num_heads=2, mlp_dim=32)


def _state():
  params = vit.init_params(CFG, jax.random.key(0))
  st = sl.init_adapters(params, sl.vit_qv_rules(), capacity=3, max_rank=4,
                        policy=sl.paper())
  st = sl.begin_task(st, jax.random.key(1), 4)
  st = st.replace(trainable=jax.tree.map(lambda x: x + 0.5, st.trainable))
  st, _ = sl.end_task(st)
  return params, sl.begin_task(st, jax.random.key(2), 3)


def test_round_trip_restores_arrays_spec_and_function(tmp_path):
  params, st = _state()
  sl.save_adapters(tmp_path / "a", st, metadata={"run": "x"})
  back = sl.load_adapters(tmp_path / "a")
  assert back.spec == st.spec and back.rank == 3
  assert int(sl.num_stored(back)) == 1
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
  model = vit.VisionTransformer(CFG)
  want = model.apply({"params": sl.merge(params, st)}, x)
  got = model.apply({"params": sl.merge(params, back)}, x)
  np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


def test_extra_arrays_and_metadata_come_back(tmp_path):
  _, st = _state()
  head = {"kernel": np.arange(6, dtype=np.float32).reshape(3, 2),
          "bias": np.ones(2, np.float32)}
  sl.save_adapters(tmp_path / "b", st, extra={"head": head},
                   metadata={"classes": 2})
  saved = sl.read_adapters(tmp_path / "b")
  np.testing.assert_array_equal(saved.extra["head"]["kernel"], head["kernel"])
  assert saved.metadata == {"classes": 2}
  assert sl.read_adapters(tmp_path / "b").adapters.spec == st.spec


def test_refuses_to_overwrite_and_names_a_missing_save(tmp_path):
  _, st = _state()
  sl.save_adapters(tmp_path / "c", st)
  with pytest.raises(FileExistsError, match="already holds saved adapters"):
    sl.save_adapters(tmp_path / "c", st)
  sl.save_adapters(tmp_path / "c", st, overwrite=True)
  with pytest.raises(FileNotFoundError, match="holds no saved adapters"):
    sl.load_adapters(tmp_path / "nothing")


def test_a_save_with_a_narrow_current_pair_loads_padded(tmp_path):
  """Saves from before the pair was max_rank wide hold it at the task's rank;
  they load padded with zeros: the same ΔW, and the shapes a step expects."""
  params, st = _state()                                # rank 3 of max_rank 4
  narrow = {n: {"A": p["A"][:3], "B": p["B"][:, :3]}
            for n, p in st.trainable["current"].items()}
  old = st.replace(trainable={**st.trainable, "current": narrow})
  sl.save_adapters(tmp_path / "old", old)
  back = sl.load_adapters(tmp_path / "old")
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert back.rank == 3
