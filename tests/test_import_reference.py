"""Importing the PyTorch reference's .pt outputs (experiments.import_reference).

The files are written here with torch exactly as the reference does (pickled
lists of bias-free nn.Linear modules, head tensors), and the imported state is
checked against an independent computation of the reference's function
(docs/semantics.md §3.8) that uses the torch modules' own forward.
"""

import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slora_jax as sl
from experiments import import_reference as cli
from slora_jax.runner import evaluators
from slora_jax.runner import reference_import as ri
from slora_jax.models import convert
from slora_jax.models import vit as vit_lib

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = vit_lib.ViTConfig(image_size=16, patch_size=8, width=32, depth=2,
                        num_heads=4, mlp_dim=64)
MODEL_FLAGS = ["--width=32", "--depth=2", "--num_heads=4", "--mlp_dim=64",
               "--image_size=16", "--patch_size=8"]
D, E = CFG.width, 2 * CFG.depth
RANKS = (4, 2, 3)           # differing ranks (as SD-LoRA-RR) test zero padding
CLASSES = (5, 9, 12)        # classes seen after each task
MAGS = (1.8, 1.33, 1.47)    # α_prev[0], α_prev[1], α_cur


def write_run(path, ranks=RANKS, classes=CLASSES, seed=0):
  """Writes a reference-format run; returns the torch modules and head."""
  torch.manual_seed(seed)
  path.mkdir(parents=True, exist_ok=True)
  a_mods, b_mods = [], []
  for t, (r, c) in enumerate(zip(ranks, classes)):
    # q then v per block, as the reference appends them.
    a = [torch.nn.Linear(D, r, bias=False) for _ in range(E)]
    b = [torch.nn.Linear(r, D, bias=False) for _ in range(E)]
    torch.save(a, path / f"lora_w_a_{t}.pt")
    torch.save(b, path / f"lora_w_b_{t}.pt")
    fc = torch.nn.Linear(D, c)
    torch.save(fc.weight, path / f"CLs_weight{t}.pt")
    torch.save(fc.bias, path / f"CLs_bias{t}.pt")
    a_mods.append(a)
    b_mods.append(b)
  return a_mods, b_mods, fc


def expected_kernels(params, a_mods, b_mods, mags):
  """W0 + Σ_i α_i B_iA_i/(‖B_i‖‖A_i‖) + α_cur B_TA_T on the q and v columns.

  ΔW is read off the modules' forward on the identity, x ↦ B(A(x)), so it is
  in our input-major layout without any hand-written transpose.
  """
  T = len(a_mods)
  out = {}
  eye = torch.eye(D)
  for l in range(CFG.depth):
    w = np.array(params[f"blocks_{l}"]["attn"]["qkv"]["kernel"], np.float64)
    for j, lo in ((0, 0), (1, 2 * D)):                   # q, v column blocks
      e = 2 * l + j
      for t in range(T):
        a, b = a_mods[t][e], b_mods[t][e]
        with torch.no_grad():
          d = b(a(eye)).double().numpy()
          norm = float(torch.linalg.norm(b.weight) * torch.linalg.norm(a.weight))
        w[:, lo:lo + D] += (mags[t] / norm if t < T - 1 else mags[t]) * d
    out[l] = w
  return out


def with_kernels(params, kernels):
  params = jax.tree.map(lambda x: x, params)
  for l, w in kernels.items():
    params[f"blocks_{l}"]["attn"]["qkv"]["kernel"] = jnp.asarray(w, jnp.float32)
  return params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("ref") / "run"
  a_mods, b_mods, fc = write_run(run_dir)
  # Random numpy weights of the right shapes: no initialiser to compile.
  rng = np.random.default_rng(3)
  params = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(scale=0.2, size=x.shape), jnp.float32),
      vit_lib.abstract_params(CFG))
  images = np.random.default_rng(0).uniform(
      size=(6, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
  return {"run_dir": run_dir, "a": a_mods, "b": b_mods, "fc": fc,
          "params": params, "images": images}


@jax.jit
def _forward(params, images):
  return vit_lib.VisionTransformer(CFG).apply({"params": params}, images)


def _check_matches_reference(s, adapters, head, mags):
  params = s["params"]
  want_k = expected_kernels(params, s["a"], s["b"], mags)
  merged = sl.merge(params, adapters)
  for l, w in want_k.items():
    np.testing.assert_allclose(merged[f"blocks_{l}"]["attn"]["qkv"]["kernel"],
                               w, rtol=1e-6, atol=1e-6)
  w_head = s["fc"].weight.detach().double().numpy()
  b_head = s["fc"].bias.detach().double().numpy()
  want = (np.asarray(_forward(with_kernels(params, want_k), s["images"]),
                     np.float64) @ w_head.T + b_head)
  got = sl.apply_head(head, _forward(merged, s["images"]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  return merged, want


def test_library_import_matches_reference_forward(setup):
  s = setup
  run = ri.read_reference_run(s["run_dir"])
  assert run.num_tasks == 3 and run.head_weight.shape == (CLASSES[-1], D)
  adapters, head = ri.build_state(CFG, run, MAGS)
  assert int(sl.num_stored(adapters)) == 2 and adapters.rank == RANKS[-1]
  assert list(sl.stored_ranks(adapters)) == list(RANKS[:-1])
  assert adapters.spec.capacity == 3 and adapters.spec.policy.name == "reference"
  _check_matches_reference(s, adapters, head, MAGS)


def test_earlier_task_and_default_magnitudes(setup, caplog):
  s = setup
  run = ri.read_reference_run(s["run_dir"], task=1)
  assert run.num_tasks == 2 and run.head_bias.shape == (CLASSES[1],)
  adapters, _ = ri.build_state(CFG, run)          # the reference's init 0.8
  assert "does not save its learned magnitudes" in caplog.text
  want = expected_kernels(s["params"], s["a"][:2], s["b"][:2], (0.8, 0.8))
  merged = sl.merge(s["params"], adapters)
  np.testing.assert_allclose(merged["blocks_1"]["attn"]["qkv"]["kernel"],
                             want[1], rtol=1e-6, atol=1e-6)


def test_split_qkv_layout_gives_the_same_function(setup):
  s = setup
  run = ri.read_reference_run(s["run_dir"])
  split_cfg = vit_lib.ViTConfig(**{**vars(CFG), "qkv": "split"})
  adapters, head = ri.build_state(split_cfg, run, MAGS)
  split = sl.merge(convert.to_split_qkv(s["params"], CFG.num_heads), adapters)
  got = sl.apply_head(head, jax.jit(vit_lib.VisionTransformer(split_cfg).apply)(
      {"params": split}, s["images"]))
  fused, _ = ri.build_state(CFG, run, MAGS)
  want = sl.apply_head(head, _forward(sl.merge(s["params"], fused), s["images"]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cli_writes_a_checkpoint_that_merge_and_eval_step_use(setup, tmp_path):
  s = setup
  out = tmp_path / "imported"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.import_reference",
       str(s["run_dir"]), f"--out={out}",
       "--magnitudes=" + ",".join(map(str, MAGS)), *MODEL_FLAGS],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert "imported tasks 0..2" in proc.stdout and "warning" not in proc.stderr
  adapters, head, meta = ri.load_imported(out)
  assert meta["magnitudes"] == list(MAGS) and meta["num_tasks"] == 3
  assert meta["model"]["width"] == D and meta["policy"]["name"] == "reference"
  merged, want = _check_matches_reference(s, adapters, head, MAGS)

  # Our eval step on the merged parameters: labels = the reference's argmax
  # for the first half of the batch, something else for the second half.
  n_cls = CLASSES[-1]
  task_sizes = [CLASSES[0]] + [b - a for a, b in zip(CLASSES, CLASSES[1:])]
  pred = want.argmax(-1)
  label = np.where(np.arange(len(pred)) < 3, pred, (pred + 1) % n_cls)
  eval_step = evaluators.make_eval_step(
      lambda a, x: sl.apply_head(a["head"], _forward(a["params"], x)),
      n_cls, task_sizes)
  sums = eval_step({"params": merged, "head": head},
                   {"image": s["images"], "label": label,
                    "mask": np.ones(len(label), np.float32)}, n_cls)
  counts = sums["class_il"]
  assert float(counts["top1"].sum()) == 3 and float(counts["count"].sum()) == 6


def test_cli_default_magnitudes_warn_and_overwrite(setup, tmp_path, capsys):
  s = setup
  args = [str(s["run_dir"]), f"--out={tmp_path / 'o'}", *MODEL_FLAGS]
  assert cli.run(args) == 0
  err = capsys.readouterr().err
  assert "warning: the reference does not save its learned magnitudes" in err
  assert cli.run(args) == 2
  err = capsys.readouterr().err.strip()
  assert "already holds an import" in err and "\n" not in err
  assert cli.run(args + ["--overwrite"]) == 0
  _, _, meta = ri.load_imported(tmp_path / "o")
  assert meta["magnitudes"] is None and "default 0.8" in meta["magnitudes_source"]


# --- errors -------------------------------------------------------------------

def _error(run_dir, config=CFG, mags=None, task=None):
  with pytest.raises(ri.ReferenceImportError) as e:
    ri.build_state(config, ri.read_reference_run(run_dir, task), mags)
  msg = str(e.value)
  assert "\n" not in msg
  return msg


@pytest.fixture
def small_run(tmp_path):
  """A fresh two-task run that a test may damage."""
  d = tmp_path / "run"
  write_run(d, ranks=(2, 2), classes=(3, 6))
  return d


def test_missing_directory_and_no_files(tmp_path):
  assert "does not exist" in _error(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  assert "no lora_w_a_<task>.pt" in _error(tmp_path / "empty")


def test_gap_and_missing_b_or_head(small_run):
  os.rename(small_run / "lora_w_a_1.pt", small_run / "lora_w_a_2.pt")
  assert "lora_w_a_1.pt is missing" in _error(small_run)
  os.rename(small_run / "lora_w_a_2.pt", small_run / "lora_w_a_1.pt")
  os.remove(small_run / "lora_w_b_1.pt")
  assert _error(small_run).endswith("lora_w_b_1.pt is missing")
  os.remove(small_run / "CLs_bias0.pt")
  assert _error(small_run, task=0).endswith("CLs_bias0.pt is missing")
  assert "task 5 is not in" in _error(small_run, task=5)


def test_shape_and_count_mismatches(small_run):
  b = [torch.nn.Linear(2, D, bias=False) for _ in range(E)]
  b[3] = torch.nn.Linear(3, D, bias=False)
  torch.save(b, small_run / "lora_w_b_1.pt")
  msg = _error(small_run)
  assert ("lora_w_b_1.pt entry 3 (v of block 1) has shape (32, 3), expected "
          "(32, 2)") in msg
  torch.save(b[:3], small_run / "lora_w_b_1.pt")
  assert "lora_w_b_1.pt has 3 entries, expected 4" in _error(small_run)
  wide = vit_lib.ViTConfig(**{**vars(CFG), "width": 64})
  assert ("lora_w_a_0.pt entry 0 (q of block 0) has shape (2, 32), expected "
          "(2, 64)") in _error(small_run, config=wide, task=0)
  torch.save(b[:3] + [b[0]], small_run / "lora_w_b_1.pt")
  assert "expected 2 finite magnitudes" in _error(small_run, mags=[1.0])
  torch.save(torch.zeros(6, D + 1), small_run / "CLs_weight1.pt")
  assert "CLs_weight1.pt has shape (6, 33), expected (classes, 32)" in _error(
      small_run)


def test_unexpected_contents(small_run):
  torch.save([torch.nn.Linear(D, 2, bias=True)] * E, small_run / "lora_w_a_0.pt")
  assert "entry 0 has a bias" in _error(small_run)
  torch.save({"w": torch.zeros(2)}, small_run / "lora_w_a_0.pt")
  assert "holds a dict, expected a list" in _error(small_run)
  (small_run / "lora_w_a_0.pt").write_bytes(b"not a pickle")
  assert "is not a torch.save archive" in _error(small_run)
  with zipfile.ZipFile(small_run / "lora_w_a_0.pt", "w") as z:
    z.writestr("readme.txt", "a zip, but not from torch.save")
  assert "is not a readable torch.save archive" in _error(small_run)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"echo pwned > {self.marker}",))


class _LinearSubclass(torch.nn.Linear):
  pass


def test_malicious_pickles_are_refused_without_running(small_run, tmp_path):
  marker = tmp_path / "pwned"
  system = f"{os.system.__module__}.system"       # posix.system on Linux
  target = small_run / "lora_w_a_0.pt"
  torch.save([torch.nn.Linear(D, 2, bias=False), _Evil(marker)], target)
  msg = _error(small_run)
  assert f"refusing to load {target}: it references {system}" in msg
  for protocol in (2, 4):                        # plain pickles, not archives
    with open(target, "wb") as f:
      pickle.dump([_Evil(marker)], f, protocol=protocol)
    assert f"refusing to load {target}: it references {system}" in _error(
        small_run)
  torch.save([_LinearSubclass(D, 2, bias=False)], target)
  assert f"{__name__}._LinearSubclass" in _error(small_run)
  assert not marker.exists()


def test_missing_torch_says_how_to_install(small_run, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` fails
  assert "pip install torch" in _error(small_run)
