"""Multi-level merge ops: LayerNorm + weighted sum, the one-GEMM merge, the fused MLP.

Reference-speed torch implementations; the Triton kernels (comm_fast.kernels) replace them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from comm_fast import _backend


def _layers(h):
    return list(h.unbind(0)) if isinstance(h, torch.Tensor) else list(h)


def layernorm_weighted_sum(h, ln_weight, ln_bias, alpha, eps: float = 1e-5, backend: str | None = None):
    """Σ_l alpha_l · LayerNorm(h_l; ln_weight_l, ln_bias_l)."""
    _backend.requested(backend)
    _backend.record("layernorm_weighted_sum", "torch", "per-layer composition")
    out = None
    for l, x in enumerate(_layers(h)):
        y = alpha[l] * F.layer_norm(x, (x.shape[-1],), ln_weight[l], ln_bias[l], eps)
        out = y if out is None else out + y
    return out


def multilevel_merge(h, ln_weight, ln_bias, weight, bias, alpha, eps: float = 1e-5, backend: str | None = None):
    """Σ_l alpha_l · (LayerNorm(h_l; ln_weight_l, ln_bias_l) · weight_lᵀ + bias_l)."""
    _backend.requested(backend)
    _backend.record("multilevel_merge", "torch", "per-layer composition")
    out = None
    for l, x in enumerate(_layers(h)):
        y = alpha[l] * F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight[l], ln_bias[l], eps), weight[l], bias[l])
        out = y if out is None else out + y
    return out


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def fused_mlp(x, w1, b1, w2, b2, activation: str = "gelu", backend: str | None = None):
    """Linear → activation → Linear."""
    _backend.requested(backend)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}")
    _backend.record("fused_mlp", "torch", "two F.linear calls")
    return F.linear(ACTIVATIONS[activation](F.linear(x, w1, b1)), w2, b2)


def describe() -> dict:
    """For comm_fast.info(): per op, the backend auto picks for CPU and CUDA tensors, and why."""
    choice = {"cpu": {"backend": "torch", "reason": "per-layer composition"},
              "cuda": {"backend": "torch", "reason": "per-layer composition"}}
    return {op: choice for op in ("layernorm_weighted_sum", "multilevel_merge", "fused_mlp")}
