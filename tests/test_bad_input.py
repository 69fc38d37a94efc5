"""Bad input: one clear ``error:`` line, exit code 2, the workdir untouched.

Each test is a row of README's table: it runs the entry point in a
subprocess on `tests/tiny_config.py` with one thing wrong, checks the single
line (the problem and its fix) and, where a workdir already existed, that
nothing in it changed. A read-only workdir and a full disk are real when the
tests run as root with mount permission (small tmpfs / read-only bind mounts,
unmounted afterwards); otherwise those rows are skipped or use permissions.
"""

import contextlib
import errno
import os
import shutil
import subprocess
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from cli_util import cli_env, error_line, run_cli, snapshot, tail
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import experiment_data
from slora_jax.runner import config as config_lib
from slora_jax.runner import session
from slora_jax.models import convert
from slora_jax.models import vit as vit_lib
import tiny_config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return cli_env(tmp_path_factory)


@pytest.fixture
def old_run(tmp_path):
  """A workdir holding an earlier run's files, and their snapshot."""
  workdir = tmp_path / "run"
  seed_dir = workdir / "seed_1993"
  (seed_dir / "checkpoints").mkdir(parents=True)
  (seed_dir / "results.json").write_text('{"earlier": "run"}\n')
  (seed_dir / "tensorboard").mkdir()
  (seed_dir / "tensorboard" / "events.out.tfevents.1").write_bytes(b"\0" * 64)
  return workdir, snapshot(workdir)


def _image_folders(root, classes=("a", "b", "c", "d", "e", "f"), n=3):
  for split in ("train", "test"):
    for ci, cls in enumerate(classes):
      os.makedirs(root / split / cls)
      for k in range(n):
        Image.new("RGB", (16, 16), (40 * ci, 20 * k, 9)).save(
            root / split / cls / f"{k}.png")
  return root


def _folder_flags(root):
  return ("--config.data.source=folder", f"--config.data.root={root}")


def test_missing_data_directory(env, old_run, tmp_path):
  workdir, before = old_run
  missing = tmp_path / "nope"
  line = error_line(run_cli(env, workdir, *_folder_flags(missing)))
  assert line == (f"error: data directory '{missing}' does not exist; set "
                  "--config.data.root to the folder holding train/ and test/")
  assert snapshot(workdir) == before


def test_empty_data_directory(env, old_run, tmp_path):
  workdir, before = old_run
  empty = tmp_path / "empty"
  empty.mkdir()
  line = error_line(run_cli(env, workdir, *_folder_flags(empty)))
  assert line.startswith(f"error: data directory '{empty}' is empty; put the "
                         "data there or point --config.data.root at it")
  assert snapshot(workdir) == before


def test_class_folder_without_images(env, old_run, tmp_path):
  workdir, before = old_run
  root = _image_folders(tmp_path / "data")
  for split in ("train", "test"):
    os.makedirs(root / split / "g_empty")
  line = error_line(run_cli(env, workdir, *_folder_flags(root)))
  assert line.startswith(f"error: {root / 'train' / 'g_empty'}: class folder "
                         "has no images")
  assert "add images or remove the class from both splits" in line
  assert snapshot(workdir) == before


def test_truncated_image_names_the_file(env, tmp_path):
  root = _image_folders(tmp_path / "data")
  bad = root / "train" / "c" / "1.png"
  bad.write_bytes(bad.read_bytes()[:60])
  workdir = tmp_path / "run"
  # One task holding every class, so the first training batch reads the file.
  line = error_line(run_cli(env, workdir, *_folder_flags(root),
                            "--config.data.init_cls=6",
                            "--config.data.num_tasks=1",
                            "--config.train.batch_size=18"))
  assert line.startswith(f"error: {bad}: unreadable or truncated image (")
  assert line.endswith("replace or delete the file")
  assert not [d for d in os.listdir(workdir / "seed_1993" / "checkpoints")
              if d.isdigit()]                     # nothing was saved from it


def test_fewer_classes_than_the_tasks_need(env, old_run):
  workdir, before = old_run
  line = error_line(run_cli(env, workdir,
                            "--config.data.synthetic.num_classes=5"))
  assert line == (
      "error: the generated data has fewer classes (5) than init_cls + "
      "increment*(N-1) = 2 + 2*(3-1) = 6 for N=3 tasks; use fewer tasks or "
      "classes per task, or a data set with more classes")
  assert snapshot(workdir) == before


def test_unknown_config_key_suggests_the_nearest(env, old_run):
  workdir, before = old_run
  line = error_line(run_cli(env, workdir, "--config.trian.lr=1"))
  assert line.startswith("error: unknown config key 'trian.lr' (in "
                         "--config.trian.lr=1); did you mean --config.train.lr?")
  line = error_line(run_cli(env, workdir, "--config.train.bach_size=4"))
  assert "did you mean --config.train.batch_size?" in line
  line = error_line(run_cli(env, workdir, "--config.train.lr=abc"))
  assert line == ("error: flag --config.train.lr=abc: could not convert "
                  "string to float: 'abc'; see --helpfull")
  assert snapshot(workdir) == before


def test_config_file_missing_or_without_get_config(env, old_run, tmp_path):
  workdir, before = old_run
  line = error_line(run_cli(env, workdir, config=str(tmp_path / "nope.py")))
  assert line.startswith(f"error: config file '{tmp_path / 'nope.py'}' does "
                         "not exist; pass --config=PATH") and "demo" in line
  (tmp_path / "plain.py").write_text("x = 1\n")
  line = error_line(run_cli(env, workdir, config=str(tmp_path / "plain.py")))
  assert line == (f"error: config file '{tmp_path / 'plain.py'}' defines no "
                  "get_config(); a config file must define get_config() "
                  "returning an ml_collections.ConfigDict (see "
                  "experiments/configs/base.py)")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  line = error_line(run_cli(env, workdir, config=str(tmp_path / "broken.py")))
  assert line.startswith(f"error: config file '{tmp_path / 'broken.py'}' "
                         "could not be loaded: SyntaxError")
  assert snapshot(workdir) == before


def test_unknown_method_and_wrong_value_type_are_one_line(env, old_run):
  workdir, before = old_run
  line = error_line(run_cli(env, workdir, "--config.method=sdlora_xx"))
  assert line.startswith("error: unknown method 'sdlora_xx'; choose one of "
                         "sdlora, sdlora_rr, sdlora_kd, seq_lora")
  line = error_line(run_cli(env, workdir, "--config.data.crop_scale=(0.5,)"))
  assert line == ("error: data.crop_scale must have 2 values, got (0.5,)")
  assert snapshot(workdir) == before


def test_checkpoint_of_another_config_names_the_field(env, tmp_path):
  workdir = tmp_path / "run"
  exp = config_lib.from_config(tiny_config.get_config())
  data = experiment_data.prepare(exp.data, exp.train, 1993)
  fp = session.fingerprint(exp, 1993, data.class_order, data.task_sizes)
  ckpt = ckpt_lib.Checkpointer(str(workdir / "seed_1993"))
  ckpt.save({"x": np.zeros(3, np.float32)},
            {"fingerprint": fp, "cursor": {"task": 1, "step": 0,
                                           "begun": False}})
  ckpt.close()
  before = snapshot(workdir)
  line = error_line(run_cli(env, workdir, "--config.train.batch_size=4"))
  assert line == (
      "error: the checkpoint in this workdir was written with "
      "train.batch_size=8, but the config says train.batch_size=4; use "
      "another --workdir, or the original config to resume")
  assert snapshot(workdir) == before


def test_pretrained_weights_of_another_shape(env, old_run, tmp_path):
  workdir, before = old_run
  cfg = vit_lib.ViTConfig(image_size=16, patch_size=8, width=32, depth=1,
                          num_heads=2, mlp_dim=32)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                        vit_lib.abstract_params(cfg))
  weights = tmp_path / "model.safetensors"
  convert.save_timm_safetensors(params, weights, cfg)
  line = error_line(run_cli(env, workdir, "--config.model.init=pretrained",
                            f"--config.model.checkpoint={weights}"))
  assert line.startswith(f"error: {weights} does not match ViT(image=16, "
                         "patch=8, width=16, depth=1, heads=2, mlp=32) (")
  assert ("cls_token: checkpoint has shape (1, 1, 32), model expects "
          "(1, 1, 16)") in line
  assert line.endswith("use weights made for this architecture, or set the "
                       "model config (name, patch_size, width, depth, "
                       "num_heads, mlp_dim) to the checkpoint's")
  assert snapshot(workdir) == before


def test_workdir_is_a_file(env, tmp_path):
  path = tmp_path / "results.txt"
  path.write_text("not a directory\n")
  line = error_line(run_cli(env, path))
  assert line == (f"error: the workdir {path / 'seed_1993'} is not a "
                  "directory (a file is in the way); pass another --workdir")
  assert path.read_text() == "not a directory\n"


def test_checkpoints_folder_is_a_file(env, tmp_path):
  seed_dir = tmp_path / "run" / "seed_1993"
  seed_dir.mkdir(parents=True)
  (seed_dir / "checkpoints").write_text("not a directory\n")
  before = snapshot(tmp_path / "run")
  line = error_line(run_cli(env, tmp_path / "run"))
  assert line == (f"error: {seed_dir / 'checkpoints'} is not a directory (a "
                  "file is in the way); move it away, or pass another "
                  "--workdir")
  assert snapshot(tmp_path / "run") == before


# ------------------------------------------- read-only workdir, full disk


def _mount(*args) -> str | None:
  """Runs mount; returns its error text, or None when it worked."""
  if os.geteuid() != 0 or not shutil.which("mount"):
    return "not root"
  r = subprocess.run(["mount", *args], capture_output=True, text=True)
  return None if r.returncode == 0 else (r.stderr.strip() or "mount failed")


@contextlib.contextmanager
def _mounted(path, *args):
  """``mount *args path``, unmounted on exit; skips the test if refused."""
  problem = _mount(*args, str(path))
  if problem:
    pytest.skip(f"needs root with mount permission ({problem})")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def _read_only(path):
  """``path`` read-only: a read-only bind mount as root (where chmod does not
  stop writes), permissions otherwise."""
  if os.geteuid() != 0:
    modes = {p: os.stat(p).st_mode for p in (path, path / "seed_1993")}
    for p in modes:
      os.chmod(p, 0o555)
    try:
      yield "permission denied"
    finally:
      for p, mode in modes.items():
        os.chmod(p, mode)
    return
  with _mounted(path, "--bind", str(path)):
    if _mount("-o", "remount,bind,ro", str(path)):
      pytest.skip("cannot remount the bind mount read-only")
    yield "read-only file system"


def test_read_only_workdir(env, old_run):
  workdir, before = old_run
  with _read_only(workdir) as why:
    line = error_line(run_cli(env, workdir))
  assert line == (f"error: the workdir {workdir / 'seed_1993'} is not "
                  f"writable ({why}); pass a writable --workdir, or copy the "
                  "run to one to resume it")
  assert snapshot(workdir) == before


def _fill(directory, keep_inodes=None):
  """Fills the filesystem of ``directory``: every byte, or every inode but
  ``keep_inodes``."""
  os.makedirs(directory)
  if keep_inodes is not None:
    for i in range(os.statvfs(directory).f_ffree - keep_inodes):
      open(os.path.join(directory, str(i)), "w").close()
    return
  fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
  try:
    while True:
      os.write(fd, b"\0" * (1 << 16))
  except OSError as e:
    assert e.errno == errno.ENOSPC
  finally:
    os.close(fd)


def test_full_disk_at_start(env, tmp_path):
  fs = tmp_path / "fs"
  fs.mkdir()
  with _mounted(fs, "-t", "tmpfs", "-o", "size=2m", "tmpfs"):
    workdir = fs / "run"
    (workdir / "seed_1993").mkdir(parents=True)
    (workdir / "seed_1993" / "results.json").write_text("{}\n")
    _fill(fs / "fill")
    before = snapshot(workdir)
    line = error_line(run_cli(env, workdir))
    assert line == (
        f"error: the disk holding {workdir / 'seed_1993'} is full (0 KiB "
        "free); free some space or use another --workdir (no checkpoint was "
        "saved yet: a rerun starts from the beginning)")
    assert snapshot(workdir) == before


def test_full_disk_during_run_keeps_the_last_checkpoint(env, tmp_path):
  fs = tmp_path / "fs"
  fs.mkdir()
  # Few inodes: the disk fills up at a checkpoint write, with bytes to spare.
  with _mounted(fs, "-t", "tmpfs", "-o", "size=16m,nr_inodes=400", "tmpfs"):
    workdir = fs / "run"
    r = run_cli(env, workdir, kill="between_tasks:1")   # task 1 done
    assert r.returncode == -9, tail(r)
    ckpts = workdir / "seed_1993" / "checkpoints"
    kept = snapshot(ckpts)
    _fill(fs / "fill", keep_inodes=3)
    r = run_cli(env, workdir)
    line = error_line(r)
    # Only the run's own lines: no writer thread's or exit hook's traceback.
    assert [l for l in r.stderr.splitlines() if not l.startswith(
        "resuming after task 1/3 from ")] == [line], tail(r)
    assert line.startswith(
        f"error: the disk holding {ckpts} is full (no free inodes, ")
    assert line.endswith(
        " KiB free) while writing checkpoint 4; free some space or use "
        "another --workdir (the last complete checkpoint is kept: rerun to "
        "resume from it)")
    after = {k: v for k, v in snapshot(ckpts).items()
             if "orbax-checkpoint-tmp" not in k}
    assert after == kept
    meta = ckpt_lib.Checkpointer(str(workdir / "seed_1993")).read_meta()
    assert meta["cursor"] == {"task": 1, "step": 0, "begun": False}


def test_full_disk_in_a_checkpoint_write_library(tmp_path, monkeypatch):
  """Without mount permission: Orbax's save fails as on a full disk."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.save({"x": np.ones(3, np.float32)}, {"n": 1})

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device",
                  os.path.join(ckpt.directory, "2.orbax-checkpoint-tmp"))

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    ckpt.save({"x": np.zeros(3, np.float32)}, {"n": 2})
  assert str(e.value).startswith(f"the disk holding {ckpt.directory} is full (")
  assert "while writing checkpoint 2;" in str(e.value)
  monkeypatch.undo()
  state, meta = ckpt.restore({"x": np.zeros(3, np.float32)})
  assert meta == {"n": 1} and state["x"].tolist() == [1.0, 1.0, 1.0]
  ckpt.close()


class _FullDisk:
  """A record file whose every write fails as on a full disk."""

  def write(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")

  flush = close = lambda self: self.write(b"")


def test_full_disk_for_tensorboard_events_is_quiet(tmp_path, monkeypatch,
                                                   capfd):
  broken = []
  monkeypatch.setattr(threading, "excepthook", broken.append)
  writer = session.EventWriter(str(tmp_path / "tb"))
  writer.add_scalar("loss", 1.0, 0)
  writer.flush()
  # pylint: disable=protected-access
  events = writer._writer._get_file_writer().event_writer
  records = getattr(events._ev_writer, "_records", events._ev_writer)
  records._py_recordio_writer = _FullDisk()                    # the disk fills
  for step in range(1, 6):   # fewer than its queue holds: no hang if it dies
    writer.add_scalar("loss", 1.0, step)
  writer.flush()
  writer.close()
  assert not broken and capfd.readouterr().err == ""
