"""The ViT backbone and its checkpoint converters."""

from slora_jax.models.convert import (
    CheckpointMismatchError,
    UnreadableCheckpointError,
    load_big_vision_npz,
    load_pretrained,
    load_timm_safetensors,
    from_timm_state_dict,
    save_big_vision_npz,
    save_timm_safetensors,
    to_fused_qkv,
    to_split_qkv,
)
from slora_jax.models.vit import (
    ViTConfig,
    VisionTransformer,
    abstract_params,
    count_params,
    init_params,
    vit_b16,
    vit_s16,
    vit_ti16,
)

__all__ = [
    "CheckpointMismatchError", "UnreadableCheckpointError", "ViTConfig",
    "VisionTransformer", "abstract_params", "count_params", "init_params",
    "load_big_vision_npz", "load_pretrained", "load_timm_safetensors",
    "from_timm_state_dict", "save_big_vision_npz",
    "save_timm_safetensors", "to_fused_qkv", "to_split_qkv", "vit_b16",
    "vit_s16", "vit_ti16",
]
