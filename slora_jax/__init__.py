"""slora-jax: SD-LoRA (Wu et al., ICLR 2025) on Flax parameter trees."""

from slora_jax.activation import apply_with_adapters
from slora_jax.adapters import (AdapterSpec, AdapterState, apply_adapters,
                                apply_deltas, begin_task, delta, end_task,
                                init_adapters, merge, num_stored, stored_ranks)
from slora_jax.head import apply_head, class_mask, init_head, masked_logits
from slora_jax.optim import optimizer, trainable_params, with_trainable_params
from slora_jax.policy import Policy, get_policy, paper, rank_schedule, reference
from slora_jax.sharding import adapter_shardings, shard_adapters
from slora_jax.serialization import load_adapters, read_adapters, save_adapters
from slora_jax.targets import (Rule, Target, find_targets, fused_slices, kernel,
                               vit_qv_rules)

__version__ = "0.1.0"
