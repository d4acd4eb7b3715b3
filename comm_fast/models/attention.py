"""One attention function for both encoders: flash-attn when importable, else SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _probe_flash_attn():
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:  # ImportError, or a build that does not match this torch
        return None, f"flash-attn not importable ({type(exc).__name__})"
    return flash_attn_func, "flash-attn importable"


# Probed once at import, so that torch.compile traces attention() without an import inside it.
_FLASH_ATTN, _FLASH_WHY = _probe_flash_attn()


def attention_backend() -> tuple[str, str]:
    if _FLASH_ATTN is not None:
        return "flash_attn", _FLASH_WHY + "; used for fp16/bf16 CUDA tensors, SDPA otherwise"
    return "sdpa", _FLASH_WHY + "; torch scaled_dot_product_attention (FlashAttention kernels on Hopper)"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal multi-head attention on ``[B, T, H, Dh]`` tensors; returns ``[B, T, H, Dh]``."""
    if _FLASH_ATTN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _FLASH_ATTN(q, k, v, softmax_scale=scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
