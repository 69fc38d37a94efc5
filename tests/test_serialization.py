"""`slora_jax.save_adapters` / `load_adapters`: the adapter state alone."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

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


def test_files_read_without_jax_or_orbax(tmp_path):
  # The arrays are one safetensors file beside the JSON spec: numpy and json
  # read them, and B·A from them is the stored direction of the state.
  _, st = _state()
  sl.save_adapters(tmp_path / "d", st)
  assert sorted(os.listdir(tmp_path / "d")) == ["adapters.json",
                                                "adapters.safetensors"]
  doc = json.loads((tmp_path / "d" / "adapters.json").read_text())
  assert doc["num_stored"] == 1 and doc["policy"]["normalize_current"]
  flat = safetensors.numpy.load_file(str(tmp_path / "d" / "adapters.safetensors"))
  name = doc["targets"][0]["name"]
  np.testing.assert_array_equal(
      flat[f"frozen/previous/{name}/A"],
      np.asarray(st.frozen["previous"][name]["A"]))
  assert flat["trainable/magnitudes/previous"].shape == (3,)


def test_reads_the_earlier_orbax_format(tmp_path):
  _, st = _state()
  sl.save_adapters(tmp_path / "e", st, metadata={"run": "old"})
  doc = json.loads((tmp_path / "e" / "adapters.json").read_text())
  (tmp_path / "e" / "adapters.safetensors").unlink()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "e" / "arrays", {"trainable": st.trainable,
                                           "frozen": st.frozen, "extra": {}})
  doc["format"] = "slora_jax.adapters/1"
  (tmp_path / "e" / "adapters.json").write_text(json.dumps(doc))
  back = sl.read_adapters(tmp_path / "e")
  assert back.metadata == {"run": "old"} and back.adapters.spec == st.spec
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(back.adapters)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
