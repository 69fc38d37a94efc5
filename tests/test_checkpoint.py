"""Orbax checkpointing of the loop state and the config fingerprint check."""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import config as config_lib
from slora_jax.runner import methods as methods_lib
from slora_jax.runner import session
import tiny_config


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


# --- the fingerprint covers every field that can change a number -------------

def _tiny_experiment(method="sdlora"):
  c = tiny_config.get_config()
  c.method = method
  return config_lib.from_config(c)


# A method without settings, and one with its own config section.
METHODS = ["sdlora", "inflora"]


def _leaves(tree, prefix=""):
  """Dotted names of the leaves of nested dicts (tuples are leaves)."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield prefix + k


def _fingerprinted(fp):
  """Dotted names of the config fields a fingerprint holds."""
  names = set()
  for k, v in fp.items():
    if k in ("version", "seed", "class_order", "task_sizes"):
      continue                       # the run's own, not config fields
    names |= (set(_leaves(json.loads(v), f"{k}.")) if isinstance(v, str)
              and v.startswith("{") else {k})
  return names


def _fp(exp):
  return session.fingerprint(exp, 1993, [1, 0, 2], [2, 1])


@pytest.mark.parametrize("method", METHODS)
def test_every_config_field_is_fingerprinted_or_allowed(method):
  exp = _tiny_experiment(method)
  fields = set(_leaves(config_lib.settings_dict(exp)))
  allowed = set(session.NOT_FINGERPRINTED)
  assert allowed <= fields, allowed - fields            # no stale names
  assert _fingerprinted(_fp(exp)) == fields - allowed


def _changed(value):
  """Another valid-looking value of the same kind."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  if isinstance(value, str):
    return value + "_x"
  if isinstance(value, tuple):
    return value + (value[-1],) if value else (1,)
  assert value is None, value
  return 0.5


def _get(settings, dotted: str):
  for part in dotted.split("."):
    settings = (settings[part] if isinstance(settings, dict)
                else getattr(settings, part))
  return settings


def _replace(settings, dotted: str, value):
  head, _, rest = dotted.partition(".")
  if rest:
    value = _replace(_get(settings, head), rest, value)
  if isinstance(settings, dict):           # Experiment.methods
    return {**settings, head: value}
  return dataclasses.replace(settings, **{head: value})


@pytest.mark.parametrize("method", METHODS)
def test_a_changed_field_is_refused_by_name_unless_allowed(method):
  exp = _tiny_experiment(method)
  saved = _fp(exp)
  for name in _leaves(config_lib.settings_dict(exp)):
    if name == "method":
      new = dataclasses.replace(exp, method=methods_lib.get_method("sdlora_kd"))
    else:
      new = _replace(exp, name, _changed(_get(exp, name)))
    if name in session.NOT_FINGERPRINTED:
      ckpt_lib.check_fingerprint(saved, _fp(new))
      continue
    with pytest.raises(ckpt_lib.ConfigMismatchError) as e:
      ckpt_lib.check_fingerprint(saved, _fp(new))
    assert f"written with {name}=" in str(e.value), (name, str(e.value))
    assert f"the config says {name}=" in str(e.value), (name, str(e.value))


def test_a_checkpoint_of_the_old_fingerprint_is_refused():
  fp = _fp(_tiny_experiment())
  old = {k: fp[k] for k in ("method", "semantics", "seed", "class_order",
                            "task_sizes")}
  with pytest.raises(ckpt_lib.ConfigMismatchError, match=re.escape(
      "written by another slora-jax version (settings fingerprint v1, this "
      "one is v3), so whether this config matches it cannot be checked; use "
      "another --workdir, or that version to resume")):
    ckpt_lib.check_fingerprint(old, fp)
# ------------------------------------------------------------ corruption


def _corrupt(step_dir, kind):
  """Damages one committed checkpoint the way a disk or a person might."""
  if kind in ("truncated", "flipped"):
    data_files = [os.path.join(step_dir, "state", "d", n)
                  for n in os.listdir(os.path.join(step_dir, "state", "d"))]
    path = max(data_files, key=os.path.getsize)     # the arrays' file
    data = bytearray(open(path, "rb").read())
    if kind == "truncated":
      data = data[:len(data) // 2]
    else:
      for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
  elif kind == "meta_cut":
    path = os.path.join(step_dir, "meta", "metadata")
    text = open(path).read()
    open(path, "w").write(text[:len(text) // 2])
  elif kind == "metadata_emptied":
    open(os.path.join(step_dir, "state", "_METADATA"), "w").close()
  elif kind == "stale_arrays":
    # Valid arrays of another step: Orbax reads them without complaint,
    # only the digest saved in meta tells them apart.
    other = os.path.join(os.path.dirname(step_dir), "1", "state")
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(other, os.path.join(step_dir, "state"))
  else:
    raise ValueError(kind)


KINDS = ("truncated", "flipped", "meta_cut", "metadata_emptied",
         "stale_arrays")


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_latest_is_set_aside_and_the_previous_restored(
    tmp_path, capsys, kind):
  c = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  for i in (1, 2):
    c.save(_state(float(i) + 0.5), {"cursor": {"task": i}})
  c.close()
  _corrupt(os.path.join(c.directory, "2"), kind)
  c = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  with pytest.raises(ckpt_lib.CorruptCheckpointError):
    c.restore(jax.eval_shape(lambda: _state(0.0)))
  capsys.readouterr()
  step, state, meta = c.restore_intact(lambda meta: _state(0.0))
  assert step == 1 and meta == {"cursor": {"task": 1}}
  np.testing.assert_array_equal(state["a"], np.full((3, 2), 1.5))
  lines = capsys.readouterr().err.splitlines()
  aside = os.path.join(str(tmp_path), "checkpoints_corrupt", "2")
  assert len(lines) == 1 and lines[0].startswith(
      f"warning: checkpoint 2 in {c.directory} is corrupt (its ")
  assert lines[0].endswith(f"); moved to {aside}; resuming from checkpoint 1")
  assert os.listdir(aside) and c.all_steps() == [1]   # kept, out of sight
  # The next save takes number 2 again; its own corruption is kept apart.
  assert c.save(_state(3.0), {"cursor": {"task": 3}}) == 2
  _corrupt(os.path.join(c.directory, "2"), "meta_cut")
  assert c.restore_intact(lambda meta: _state(0.0))[0] == 1
  assert os.path.isdir(aside + ".1")
  c.close()


def test_no_intact_checkpoint_starts_over_and_read_only_moves_nothing(
    tmp_path, capsys):
  c = ckpt_lib.Checkpointer(str(tmp_path))
  c.save(_state(1.0), {"n": 1})
  c.close()
  _corrupt(os.path.join(c.directory, "1"), "metadata_emptied")
  r = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  assert r.restore_intact(lambda meta: None) is None
  line, = capsys.readouterr().err.splitlines()
  assert line.startswith(f"warning: checkpoint 1 in {c.directory} is corrupt "
                         "(its arrays are unreadable: ")
  assert line.endswith("); skipped (left in place); none is intact")
  assert r.all_steps() == [1]
  c = ckpt_lib.Checkpointer(str(tmp_path))
  assert c.restore_intact(lambda meta: _state(0.0)) is None
  line, = capsys.readouterr().err.splitlines()
  assert line.endswith("; no intact checkpoint left: starting from the "
                       "beginning")
  assert c.latest_step() is None
