"""Attention over packed rows (several samples in one row, flash-attn varlen convention: ``position_ids``
restart at 0 at each sample, no ``attention_mask``), registered with transformers' attention interface.

Each sample attends causally within itself only. The per-sample loop here is the reference and the CPU
path; flash-attn's varlen kernels are used when flash-attn imports.
"""
from __future__ import annotations

import functools

import torch


VARLEN_SDPA = "comm_sdpa_varlen"


@functools.lru_cache(maxsize=None)
def attention_implementation() -> str:
    """"flash_attention_2" when flash-attn imports, else SDPA ("comm_sdpa_varlen": transformers' SDPA
    path, plus per-sample attention for packed rows; plain "sdpa" where it cannot be registered)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return VARLEN_SDPA if _register_varlen_sdpa() else "sdpa"
    return "flash_attention_2"


def _register_varlen_sdpa() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
    return True


def varlen_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA that, for packed rows, attends within each sample only, one causal SDPA call per sample.

    The samples of a packed row are contiguous and start where the position ids restart at 0, so each
    sample's queries, keys and values are a split of the flattened rows (a view when there is one row):
    the work is sum(len^2), with no padding anywhere (a [samples, longest] grid would cost
    samples x longest^2, as much as a padded batch, and a block-diagonal mask row_length^2). Anything
    else (padded batches, decoding with a cache) goes to transformers' SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    packed = kwargs.pop("comm_packed", False)  # set by COMMForCausalLM.forward for packed rows only
    lengths = kwargs.pop("comm_lengths", None)  # the samples' lengths along the flattened rows, if known
    pos = kwargs.get("position_ids")
    b, h, t, d = query.shape
    if not packed or pos is None or key.shape[2] != t or pos.shape[-1] != t:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if lengths is None:
        lengths = sample_lengths(pos.expand(b, t))
    key, value = (repeat_kv(x, h // x.shape[1]) for x in (key, value))

    def split(x):  # [B, H, T, D] -> per sample [1, H, len, D]
        return x.transpose(0, 1).reshape(1, h, b * t, x.shape[-1]).split(lengths, dim=2)

    p = dropout if module.training else 0.0
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                      dropout_p=p)
                     for q, k, v in zip(split(query), split(key), split(value))], dim=2)
    return out[0].transpose(0, 1).reshape(b, t, h, d), None


def sample_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the samples of packed rows, in order along the flattened rows (each starts at position 0)."""
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return [e - s for s, e in zip(starts, starts[1:] + [position_ids.numel()])]


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool mask (True = attend): causal, and only within the sample a token belongs to."""
    seg = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
