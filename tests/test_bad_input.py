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
from fake_hub import FakeHub, hub_env
from slora_jax.runner import checkpoint as ckpt_lib
from slora_jax.runner import experiment_data
from slora_jax.runner import config as config_lib
from slora_jax.runner import session
from slora_jax.runner import writers
from slora_jax.runner.data.sources import folder as folder_lib
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


def test_every_bad_image_in_one_message(env, tmp_path):
  root = _image_folders(tmp_path / "data")
  bad = [root / "train" / "c" / "1.png", root / "train" / "e" / "2.png",
         root / "test" / "a" / "0.png"]
  for b in bad:
    b.write_bytes(b.read_bytes()[:60])
  line = error_line(run_cli(env, tmp_path / "run", *_folder_flags(root),
                            "--config.data.init_cls=6",
                            "--config.data.num_tasks=1",
                            "--config.train.batch_size=18"))
  assert line.startswith("error: 3 unreadable or truncated images: ")
  listed = line.split("images: ", 1)[1].split("; replace")[0].split(", ")
  assert sorted(n.split(" (")[0] for n in listed) == sorted(map(str, bad))
  assert listed[0].endswith(" (image file is truncated)")  # the one read
  assert line.endswith("replace or delete these files (the search stops "
                       f"at {folder_lib.BAD_FILES_LIMIT})")


def test_bad_image_search_stops_at_the_limit(tmp_path):
  root = _image_folders(tmp_path / "data")
  files = sorted(str(p) for p in (root / "train").rglob("*.png"))
  for f in files[:3]:
    with open(f, "r+b") as fh:
      fh.truncate(60)
  assert folder_lib.bad_files(files, limit=2) == files[:2]
  assert folder_lib.bad_files(files) == files[:3]


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


def _checkpoint(workdir, fingerprint, cursor):
  """A checkpoint of the tiny run's seed written with ``fingerprint``."""
  ckpt = ckpt_lib.Checkpointer(str(workdir / "seed_1993"))
  ckpt.save({"x": np.zeros(3, np.float32)},
            {"fingerprint": fingerprint, "cursor": cursor})
  ckpt.close()


def _tiny_fingerprint():
  exp = config_lib.from_config(tiny_config.get_config())
  data = experiment_data.prepare(exp.data, exp.train, 1993)
  return session.fingerprint(exp, 1993, data.class_order, data.task_sizes)


@pytest.mark.parametrize("flag,old,new", [
    ("--config.train.lr=0.5", "train.lr=0.05", "train.lr=0.5"),
    ("--config.data.max_train_per_class=8", "data.max_train_per_class=0",
     "data.max_train_per_class=8"),
])
def test_resume_with_a_changed_setting_names_it(env, tmp_path, flag, old, new):
  workdir = tmp_path / "run"                      # interrupted in task 2
  _checkpoint(workdir, _tiny_fingerprint(),
              {"task": 1, "step": 2, "begun": True})
  before = snapshot(workdir)
  line = error_line(run_cli(env, workdir, flag))
  assert line == (f"error: the checkpoint in this workdir was written with "
                  f"{old}, but the config says {new}; use another --workdir, "
                  "or the original config to resume")
  assert snapshot(workdir) == before


def test_finished_run_rerun_with_another_rate_is_refused(env, tmp_path):
  workdir = tmp_path / "run"
  r = run_cli(env, workdir)
  assert r.returncode == 0, tail(r)
  before = snapshot(workdir)
  assert {"config.json", "seed_1993/results.json"} <= set(before)
  line = error_line(run_cli(env, workdir, "--config.train.lr=0.5"))
  assert line == (
      "error: the checkpoint in this workdir was written with train.lr=0.05, "
      "but the config says train.lr=0.5; use another --workdir, or the "
      "original config to resume")
  assert snapshot(workdir) == before


def test_checkpoint_of_the_old_fingerprint_is_refused(env, tmp_path):
  workdir = tmp_path / "run"
  fp = _tiny_fingerprint()
  del fp["version"]                     # what slora-jax wrote before v2
  _checkpoint(workdir, fp, {"task": 1, "step": 0, "begun": False})
  before = snapshot(workdir)
  line = error_line(run_cli(env, workdir))
  assert line == (
      "error: the checkpoint in this workdir was written by another slora-jax "
      "version (settings fingerprint v1, this one is v3), so whether this "
      "config matches it cannot be checked; use another --workdir, or that "
      "version to resume")
  assert snapshot(workdir) == before


@pytest.mark.parametrize("flag,message", [
    ("--config.seeds=()", "seeds is empty, so nothing would run; give at "
     "least one, e.g. --config.seeds='(1993,)'"),
    ("--config.seeds=(1993,1993)", "seeds repeats 1993 (in (1993, 1993)): a "
     "repeated seed is the same run, not another sample; give distinct seeds"),
    ("--config.train.lr=0", "train.lr must be a positive number, got 0.0"),
    ("--config.adapter.rank=0", "adapter.rank must be at least 1, got 0"),
    ("--config.adapter.rank=17", "adapter.rank is 17, more than the adapted "
     "map blocks_0/attn/qkv/kernel[q] (16 -> 16) can use; give a rank of at "
     "most 16"),
    ("--config.adapter.targets=blocks_0/mlp/fc9/kernel", "adapter targets: "
     "kernel('blocks_0/mlp/fc9/kernel') matched no parameter; nearest paths: "
     "['blocks_0/mlp/fc2/kernel', 'blocks_0/mlp/fc1/kernel', "
     "'blocks_0/attn/qkv/kernel'] "
     "(--config.adapter.targets=blocks_0/mlp/fc9/kernel)"),
    ("--config.checkpoint.every_steps=0",
     "checkpoint.every_steps must be at least 1, got 0"),
    ("--config.checkpoint.keep=0", "checkpoint.keep must be at least 1 (0 "
     "keeps no checkpoint to resume from), got 0"),
    ("--config.model.dtype=float8", "model.dtype must be one of ['bfloat16', "
     "'float32'], got 'float8'"),
    ("--config.model.name=vit_zz", "model.name must be 'custom' or one of "
     "['vit_b16', 'vit_s16', 'vit_ti16'], got 'vit_zz'"),
    ("--config.model.patch_size=5", "the model settings make no ViT: "
     "image_size 16 is not a multiple of patch_size 5; change "
     "--config.model.image_size, patch_size, width, num_heads or qkv"),
])
def test_impossible_value_is_one_line(env, old_run, flag, message):
  workdir, before = old_run
  assert error_line(run_cli(env, workdir, flag)) == f"error: {message}"
  assert snapshot(workdir) == before


@pytest.mark.parametrize("key,value,message", [
    ("train.init_lr", -0.1, "train.init_lr must be a positive number"),
    ("train.lr", float("nan"), "train.lr must be a positive number, got nan"),
    ("train.lr", float("inf"), "train.lr must be a positive number, got inf"),
    ("train.lr_decay", -1.0, "train.lr_decay must be a number >= 0"),
    ("train.momentum", 1.0, r"train.momentum must be in \[0, 1\), got 1.0"),
    ("train.batch_size", 0, "train.batch_size must be at least 1, got 0"),
    ("train.epochs", 0, "train.epochs must be at least 1, got 0"),
    ("train.eval_batch_size", -1, "train.eval_batch_size must be >= 0"),
    ("adapter.rank_schedule", ((0, 2), (1, 0)),
     "a rank in adapter.rank_schedule must be at least 1, got 0"),
    ("adapter.rank_schedule", ((0, 2), (1, 20)),
     "a rank in adapter.rank_schedule is 20, more than"),
    ("adapter.rank_schedule", ((1, 2),),
     r"adapter.rank_schedule must give the rank of task 0"),
    ("model.dtype", "bogus", r"model.dtype must be one of \['bfloat16', "
     r"'float32'\], got 'bogus'"),
])
def test_from_config_refuses_what_no_run_can_use(key, value, message):
  """The other checks of `from_config`, in process (the CLI path is above)."""
  c = tiny_config.get_config()
  c.method = "sdlora_rr"                   # reads the rank schedule
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config(c)


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


def _weights_flags(path):
  return ("--config.model.init=pretrained", f"--config.model.checkpoint={path}")


def test_truncated_safetensors_names_the_file(env, old_run, tmp_path):
  workdir, before = old_run
  cfg = config_lib.from_config(tiny_config.get_config()).model.vit_config()
  weights = tmp_path / "model.safetensors"
  convert.save_timm_safetensors(
      jax.device_get(vit_lib.init_params(cfg, jax.random.key(0))), weights, cfg)
  weights.write_bytes(weights.read_bytes()[:3000])
  line = error_line(run_cli(env, workdir, *_weights_flags(weights)))
  assert line.startswith(f"error: {weights}: not a readable .safetensors "
                         "file (")
  assert line.endswith("); it may be truncated or corrupt: download it again")
  assert snapshot(workdir) == before


def test_garbage_npz_is_not_taken_for_a_pickle(env, old_run, tmp_path):
  workdir, before = old_run
  weights = tmp_path / "ViT-B_16.npz"
  weights.write_bytes(b"<html>404 Not Found</html>\n" * 20)
  line = error_line(run_cli(env, workdir, *_weights_flags(weights)))
  assert line == (f"error: {weights}: not a readable .npz file (no zip "
                  "header: not an .npz archive); it may be truncated or "
                  "corrupt: download it again")
  assert snapshot(workdir) == before


class _MakesADirectory:
  """Unpickling this runs os.mkdir: what a weights file must never do."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return os.mkdir, (self.path,)


def test_bin_weights_that_would_run_code_are_refused(env, old_run, tmp_path):
  torch = pytest.importorskip("torch")
  workdir, before = old_run
  weights, marker = tmp_path / "pytorch_model.bin", tmp_path / "ran"
  torch.save({"cls_token": torch.zeros(1, 1, 16),
              "x": _MakesADirectory(marker)}, weights)
  line = error_line(run_cli(env, workdir, *_weights_flags(weights)))
  assert line == (f"error: refusing to load {weights}: torch's weights-only "
                  "unpickler rejected it (Trying to load unsupported GLOBAL "
                  "posix.mkdir whose module posix is blocked.); a weights "
                  "file holds only tensors, and this one may run code when "
                  "unpickled")
  assert not marker.exists()
  assert snapshot(workdir) == before


def test_unknown_hub_repository(env, old_run, tmp_path):
  workdir, before = old_run
  with FakeHub({}) as fake:
    line = error_line(run_cli(
        hub_env(fake, tmp_path / "hf", env), workdir,
        "--config.model.init=pretrained", "--config.model.weights=timm/nope"))
  assert line == ("error: the Hugging Face Hub has no repository 'timm/nope' "
                  "(or it is private or gated: set HF_TOKEN); set "
                  "model.weights to an existing 'owner/name', or pass a local "
                  "file in model.checkpoint")
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
  writer = writers.TensorBoardWriter(str(tmp_path / "tb"))
  writer.write_scalars(0, {"loss": 1.0})
  writer.flush()
  # pylint: disable=protected-access
  events = writer._writer._get_file_writer().event_writer
  records = getattr(events._ev_writer, "_records", events._ev_writer)
  records._py_recordio_writer = _FullDisk()                    # the disk fills
  for step in range(1, 6):   # fewer than its queue holds: no hang if it dies
    writer.write_scalars(step, {"loss": 1.0})
  writer.flush()
  writer.close()
  assert not broken and capfd.readouterr().err == ""
