"""The plain-LoRA train step SD-LoRA's step is compared against."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from slora_jax import head as head_lib
from slora_jax import optim
from slora_jax.runner import steps


def make_plain_lora_step(model, cfg, num_classes: int, momentum: float = 0.9):
  """A plain LoRA train step written without slora_jax's adapter code.

  q and v of every block get ``x·W0 + (x Aᵀ) Bᵀ`` (A ``(r, d)``, B ``(d, r)``)
  on the activations, through Flax method interception; no magnitudes, no
  earlier directions. Loss (cross-entropy over the classes ``[lo, hi)``,
  masked mean over the batch), head and optimiser (`slora_jax.optim.optimizer`:
  SGD, momentum 0.9, built at the step's traced rate) are those of the
  SD-LoRA step, and so is the signature: ``step(state, batch, task,
  backbone) -> (state, metrics)`` with a `steps.TrainState` whose arrays are
  ``{'lora', 'head'}`` and ``task`` from `steps.task_args`. Returns
  ``(init(rng, rank, head) -> state, jitted step)``.
  """
  d = cfg.width

  def tx(lr):
    return optim.optimizer(lr, momentum=momentum)

  def init(rng, rank, head):
    keys = jax.random.split(rng, 2 * cfg.depth)
    lora, bound = {}, 1.0 / math.sqrt(d)
    for i in range(cfg.depth):
      lora[f"blocks_{i}"] = {
          part: {"A": jax.random.uniform(keys[2 * i + j], (rank, d),
                                         jnp.float32, -bound, bound),
                 "B": jnp.zeros((d, rank), jnp.float32)}
          for j, part in enumerate(("q", "v"))}
    tree = {"lora": lora, "head": head}
    return steps.TrainState(tree, tx(jnp.zeros((), jnp.float32)).init(tree))

  def lora_interceptor(lora):
    # The adapted map as a LoRA user would write it on the activations:
    # y[:, q] += (x Aᵀ) Bᵀ, same for v; the kernels get no gradient.
    def intercept(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      path = context.module.path
      if context.method_name != "__call__" or path[1:] != ("attn", "qkv"):
        return y
      f, x = lora[path[0]], args[0]
      dq = (x @ f["q"]["A"].T) @ f["q"]["B"].T
      dv = (x @ f["v"]["A"].T) @ f["v"]["B"].T
      return jnp.concatenate([y[..., :d] + dq, y[..., d:2 * d],
                              y[..., 2 * d:] + dv], axis=-1)
    return intercept

  def plain_lora_step(state, batch, task, backbone):
    keep = head_lib.class_mask(task["lo"], task["hi"], num_classes)
    mask = batch["mask"].astype(jnp.float32)

    def loss_fn(tree):
      with nn.intercept_methods(lora_interceptor(tree["lora"])):
        feats = model.apply({"params": backbone}, batch["image"])
      logits = head_lib.masked_logits(head_lib.apply_head(tree["head"], feats),
                                      keep)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch["label"])
      return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    tree = state.arrays
    loss, grads = jax.value_and_grad(loss_fn)(tree)
    updates, opt_state = tx(task["lr"]).update(grads, state.opt_state, tree)
    return (steps.TrainState(optax.apply_updates(tree, updates), opt_state),
            {"loss": loss})

  return init, jax.jit(plain_lora_step, donate_argnums=(0,))
