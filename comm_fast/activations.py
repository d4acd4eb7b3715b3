"""The activation functions of the visual branch, defined once (docs/architecture.md §1).

The model (the encoders' MLPs, DINOv2's merge MLP), the ops' torch path, the reference and the tests
use these; the Triton epilogues (comm_fast.kernels.fused_mlp) write the same formulas with
``QUICK_GELU_SCALE`` from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QUICK_GELU_SCALE = 1.702  # OpenAI CLIP's x·sigmoid(1.702·x)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


ACTIVATIONS = {
    "gelu": F.gelu,                                        # exact (erf), LLaVA's projector and DINOv2
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": quick_gelu,                              # CLIP
}


def check_activation(name) -> None:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {name!r}")


def activation(x: Tensor, name: str) -> Tensor:
    check_activation(name)
    return ACTIVATIONS[name](x)


def activation_backward(name: str, grad: Tensor, pre: Tensor) -> Tensor:
    """d activation(pre) / d pre, times grad."""
    check_activation(name)
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad, pre, approximate="none" if name == "gelu" else "tanh")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    s = torch.sigmoid(QUICK_GELU_SCALE * pre)  # quick_gelu
    return grad * (s + QUICK_GELU_SCALE * pre * s * (1 - s))
