"""Training a small ViT as a classifier: the demo backbones' pre-training.

One loop serves the label-free tasks of `backbone.synthetic_pretrain`
(rotation prediction, generated patterns) and the supervised pre-training of
the committed demo backbone (`experiments/make_demo_backbone.py`): AdamW with
a warm-up-cosine rate, random horizontal flips and ±``shift`` px shifts,
batches drawn with replacement from one seeded generator.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slora_jax.models import vit as vit_lib

__all__ = ["fit"]


def _augment(x, rng, shift: int):
  r1, r2 = jax.random.split(rng)
  flip = jax.random.bernoulli(r1, 0.5, (x.shape[0], 1, 1, 1))
  x = jnp.where(flip, x[:, :, ::-1], x)
  if shift:
    size = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    off = jax.random.randint(r2, (x.shape[0], 2), 0, 2 * shift + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(
        im, (o[0], o[1], 0), (*size, x.shape[3])))(padded, off)
  return x


def _rotate(x, y):
  """Each image turned by y·90° (a flip before it keeps y identifiable)."""
  return jnp.select([y[:, None, None, None] == k for k in range(4)],
                    [jnp.rot90(x, k, axes=(1, 2)) for k in range(4)])


def fit(cfg: vit_lib.ViTConfig, images: np.ndarray, labels: np.ndarray | None,
        *, num_outputs: int, steps: int, batch_size: int, lr: float, seed: int,
        shift: int = 0, weight_decay: float = 0.05,
        log: Callable[[str], None] = print) -> tuple[dict, dict, float]:
  """Trains ``cfg`` to classify ``images`` (NHWC, float in [0, 1] or uint8).

  With ``labels=None`` the task is rotation prediction (4 outputs). Returns
  the ViT parameters and the head (host arrays), and the training accuracy
  over the last fifth of the steps.
  """
  model = vit_lib.VisionTransformer(cfg)
  key = jax.random.key(seed)
  tree = {"vit": vit_lib.init_params(cfg, key),
          "head": {"kernel": jnp.zeros((cfg.width, num_outputs)),
                   "bias": jnp.zeros((num_outputs,))}}
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, steps // 10), steps), weight_decay=weight_decay)
  opt_state = tx.init(tree)

  @jax.jit
  def step(tree, opt_state, x, y, rng):
    if x.dtype == jnp.uint8:          # a quarter of the host memory and copies
      x = x.astype(jnp.float32) / 255.0
    x = _augment(x, rng, shift)
    if labels is None:
      x = _rotate(x, y)

    def loss_fn(tree):
      logits = (model.apply({"params": tree["vit"]}, x) @ tree["head"]["kernel"]
                + tree["head"]["bias"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(tree)
    upd, opt_state = tx.update(g, opt_state, tree)
    return optax.apply_updates(tree, upd), opt_state, loss, acc

  rng = np.random.default_rng(seed)
  t0, accs = time.perf_counter(), []
  for s in range(steps):
    idx = rng.integers(0, len(images), batch_size)
    y = (rng.integers(0, 4, batch_size).astype(np.int32) if labels is None
         else labels[idx])
    tree, opt_state, loss, acc = step(tree, opt_state, images[idx], y,
                                      jax.random.fold_in(key, s))
    if s >= steps - max(1, steps // 5):
      accs.append(acc)
    if (s + 1) % max(1, steps // 5) == 0:
      log(f"  pre-training step {s + 1}/{steps}: loss {float(loss):.3f} "
          f"({time.perf_counter() - t0:.0f} s)")
  tree = jax.device_get(tree)
  return tree["vit"], tree["head"], 100 * float(np.mean(jax.device_get(accs)))
