"""The PyTorch port of the reference's arithmetic that the benchmark times."""

import pytest

torch = pytest.importorskip("torch")

from experiments import torch_reference  # pylint: disable=wrong-import-position

DIMS = dict(depth=2, width=16, heads=2, mlp=32, image_size=16, patch=8,
            num_classes=20, rank=3)


def test_trainable_set_and_frozen_earlier_tasks():
  model, trainable = torch_reference.build(tasks=4, **DIMS)
  names = {n for n, p in model.named_parameters() if p.requires_grad}
  assert names == ({"mags", "head.weight", "head.bias"} |
                   {f"blocks.{b}.cur_{f}.{p}" for b in range(2)
                    for f in ("a", "b") for p in range(2)})
  assert len(trainable) == len(names)
  assert model.mags.shape == (5,)                      # 4 earlier + current
  assert all(len(model.blocks[0].prev[p]) == 4 for p in range(2))


def test_earlier_directions_enter_normalised_and_scaled():
  """B_cur = 0, so the q/v change is Σ α_i·B_iA_i x/(‖B_i‖‖A_i‖) exactly."""
  model, _ = torch_reference.build(tasks=2, **DIMS)
  blk = model.blocks[0]
  x = torch.randn(1, 5, DIMS["width"])
  with torch.no_grad():
    got = blk.lora(x, 0, model.mags)
    want = sum(model.mags[i] * x @ a.T @ b.T / (b.norm() * a.norm())
               for i, (a, b) in enumerate(blk.prev[0]))
  torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_time_reference_reports_every_task():
  out = torch_reference.time_reference(tasks=(0, 2), batch=2, repeats=1, **DIMS)
  assert set(out["step"]) == set(out["eval"]) == {0, 2}
  assert min(out["step"].values()) > 0 and out["plain_eval"] > 0
