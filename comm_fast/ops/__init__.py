"""Public ops. Each takes ``backend=None`` (auto); COMM_FAST_BACKEND overrides auto."""
from comm_fast.ops.merge import fused_mlp, layernorm_weighted_sum, multilevel_merge
from comm_fast.ops.patch import interpolate_pos_embed, joint_preprocess, resample_tokens

__all__ = [
    "layernorm_weighted_sum",
    "multilevel_merge",
    "fused_mlp",
    "interpolate_pos_embed",
    "resample_tokens",
    "joint_preprocess",
]
