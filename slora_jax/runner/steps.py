"""The jitted train and evaluation steps.

The model enters only as ``apply_fn(params, images) -> features``, and
adapters only through `apply_adapters`/`merge`: the steps know nothing of a
model's architecture, and nothing of adapter internals beyond the trainable
tree. Class ranges are traced scalars, so one compiled step serves every task.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from slora_jax import activation
from slora_jax import adapters as adapters_lib
from slora_jax import head as head_lib
from slora_jax import optim

__all__ = ["make_optimizer", "make_train_step"]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def make_optimizer(momentum: float = 0.9, train_magnitudes: bool = True,
                   weight_decay: float = 0.0,
                   train_adapters: bool = True) -> optax.GradientTransformation:
  """SGD whose learning rate is a hyper-parameter set at every step.

  The rate lives in the optimiser state, so schedules and per-task rates never
  recompile the step. Plain-LoRA baselines freeze the magnitudes; a linear
  probe freezes every adapter leaf (only the head trains).
  """
  sgd = optax.inject_hyperparams(
      optim.optimizer, static_args=("momentum", "weight_decay"))(
      learning_rate=0.0, momentum=momentum, weight_decay=weight_decay)
  if train_magnitudes and train_adapters:
    return sgd
  def labels(tree):
    out = jax.tree.map(lambda _: "train", tree)
    frozen = list(tree["adapters"]) if not train_adapters else ["magnitudes"]
    for key in frozen:
      out["adapters"][key] = jax.tree.map(lambda _: "freeze",
                                          tree["adapters"][key])
    return out
  return optax.partition({"train": sgd, "freeze": optax.set_to_zero()}, labels)


def _set_lr(opt_state, lr):
  if hasattr(opt_state, "hyperparams"):
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state
  # optax.partition state: set the rate of the 'train' inner optimiser.
  inner = opt_state.inner_states["train"]
  inner.inner_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  return opt_state


def _masked_mean(x, mask):
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def make_train_step(apply_fn: ApplyFn, num_classes: int,
                    tx: optax.GradientTransformation,
                    adapter_form: str = "activation"):
  """Builds ``step(adapters, head, opt_state, backbone, batch, lo, hi, lr)``.

  ``adapter_form`` picks how the adapters enter the model: ``'activation'``
  (`slora_jax.apply_with_adapters`; needs a Flax Linen model, and is the
  faster: no adapted-kernel gradients, stored directions cost in proportion
  to how many are stored) or ``'weight'`` (`apply_adapters`; any model).
  Both compute the same function and gradients.

  The loss is cross-entropy over the classes ``[lo, hi)`` only (the
  reference's ``logits[:, known:]`` slicing, docs/semantics.md §4), averaged over
  the rows whose ``mask`` is set (padding of the last partial batch). Returns
  the new (adapters, head, opt_state) and device-side metrics.
  """

  forms = {"activation": activation.apply_with_adapters,
           "weight": lambda fn, p, ad, x: fn(adapters_lib.apply_adapters(p, ad), x)}
  if adapter_form not in forms:
    raise ValueError(f"adapter_form must be one of {sorted(forms)}, got "
                     f"{adapter_form!r}")
  adapted = forms[adapter_form]

  def step(adapters, head, opt_state, backbone, batch, lo, hi, lr):
    keep = head_lib.class_mask(lo, hi, num_classes)

    def loss_fn(tree):
      ad, hd = optim.with_trainable_params(adapters, tree)
      feats = adapted(apply_fn, backbone, ad, batch["image"])
      logits = head_lib.apply_head(hd, feats)
      logits = head_lib.masked_logits(logits, keep)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      loss = _masked_mean(ce, batch["mask"])
      acc = _masked_mean(jnp.argmax(logits, -1) == batch["label"], batch["mask"])
      return loss, acc

    tree = optim.trainable_params(adapters, head)
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree)
    opt_state = _set_lr(opt_state, lr)
    updates, opt_state = tx.update(grads, opt_state, tree)
    tree = optax.apply_updates(tree, updates)
    new_adapters, new_head = optim.with_trainable_params(adapters, tree)
    metrics = {"loss": loss, "accuracy": acc,
               "grad_norm": optax.tree.norm(grads),
               "alpha_current": new_adapters.trainable["magnitudes"]["current"]}
    return new_adapters, new_head, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1, 2))
