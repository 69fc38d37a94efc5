"""Metric writers: what a tiny run leaves in TensorBoard and W&B (offline).

Both are read back from their files: TensorBoard's event records
(tensorboardX's protos) and the offline W&B run's ``.wandb`` log (W&B's
protos, in LevelDB's log framing), with no network and no W&B account.
"""

import glob
import os
import struct

import pytest

from slora_jax.runner import config as config_lib
from slora_jax.runner import progress
from slora_jax.runner import train
from tests import tiny_config

STEPS = 4           # tiny_config: 3 tasks of 4 steps, logged every step


def test_bar_images_per_s_leaves_out_the_compiling_step(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
  bar = progress.Bar("task 1/1", total=3, initial=0, batch_size=8)
  for t in (100.0, 101.0, 102.0):  # the first step ends at 100 s (compiling)
    now[0] = t
    bar.update(1)
  assert bar.images_per_s() == pytest.approx(2 * 8 / 2.0)


def _tfrecords(path):
  data = open(path, "rb").read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    yield data[pos + 12:pos + 12 + n]
    pos += 16 + n


def _tensorboard(directory):
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars, plugins = {}, set()
  for path in glob.glob(os.path.join(directory, "events.*")):
    for rec in _tfrecords(path):
      ev = event_pb2.Event.FromString(rec)
      for v in ev.summary.value:
        if v.metadata.plugin_data.plugin_name:
          plugins.add(v.metadata.plugin_data.plugin_name)
        if v.HasField("simple_value"):
          scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return scalars, plugins


def _wandb_records(path):
  """The records of an offline run: a 7-byte header, then LevelDB log
  records (crc, length, type) in 32 KiB blocks."""
  from wandb.proto import wandb_internal_pb2 as pb  # pylint: disable=import-outside-toplevel
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  pos, block, chunks = 7, 32768, b""
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunks = (b"" if kind in (1, 2) else chunks) + data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):                       # a full record, or its last part
      yield pb.Record.FromString(chunks)


def _wandb(directory):
  (path,) = glob.glob(os.path.join(directory, "wandb", "offline-run-*",
                                   "*.wandb"))
  run, config, history = None, {}, {}
  for r in _wandb_records(path):
    kind = r.WhichOneof("record_type")
    if kind == "run":
      run = r.run
      config.update({i.key: i.value_json for i in r.run.config.update})
    elif kind == "config":
      config.update({i.key: i.value_json for i in r.config.update})
    elif kind == "history":
      row = {i.key or "/".join(i.nested_key): i.value_json
             for i in r.history.item}
      for k, v in row.items():
        history.setdefault(k, []).append((r.history.step.num, float(v)))
  return run, config, history


@pytest.mark.skipif(not __import__("importlib").util.find_spec("wandb"),
                    reason="needs wandb")
def test_a_run_logs_one_step_axis_lr_alpha_eval_and_config(tmp_path,
                                                           monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  os.makedirs(tmp_path / "wb")
  c = tiny_config.get_config()
  c.log.wandb_project, c.log.wandb_mode = "slora-tests", "offline"
  train.run_seed(config_lib.from_config(c), 1993,
                 str(tmp_path / "run" / "seed_1993"))
  tb, plugins = _tensorboard(str(tmp_path / "run" / "seed_1993" / "tensorboard"))
  run, config, history = _wandb(str(tmp_path / "wb"))
  total = 3 * STEPS
  for scalars in (tb, history):
    # One step axis across tasks: 1..12, never restarting at a task.
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, total + 1))
    # TensorBoard keeps float32: one rounding.
    assert [v for _, v in scalars["train/lr"]] == pytest.approx(
        [0.05] * total, rel=2.0**-24)
    assert [s for s, _ in scalars["eval/top1"]] == [4, 8, 12]
    assert [s for s, _ in scalars["eval/top1_task1"]] == [4, 8, 12]
    assert [s for s, _ in scalars["eval/top1_task3"]] == [12]
    # α of task 1 from its first step on; of task 3 from task 3 on.
    assert scalars["alpha/task1"][0][0] == 1
    assert scalars["alpha/task3"][0][0] == 2 * STEPS + 1
  assert "hparams" in plugins and "text" in plugins
  assert run.project == "slora-tests" and run.display_name == "run-seed1993"
  assert config["train.init_lr"] == "0.05" and config["seed"] == "1993"
  assert config["method"] == '"sdlora"'


def test_log_settings_default_for_older_configs_and_refuse_a_bad_mode():
  # results.json of runs made before the log section still load (export).
  c = tiny_config.get_config().to_dict()
  del c["log"]
  assert config_lib.from_config(c).log == config_lib.LogSettings(
      tensorboard=True, wandb_project="", wandb_entity="", wandb_mode="")
  c = tiny_config.get_config()
  c.log.wandb_mode = "cloud"
  with pytest.raises(config_lib.ConfigError, match="log.wandb_mode must be"):
    config_lib.from_config(c)
