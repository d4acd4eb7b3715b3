"""Random-weight Hugging Face vision models written with save_pretrained (no network)."""
from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel)

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14, image_size=56)


def randomise(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random, LayerNorm weights and LayerScale too (so no identity hides a bug)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layer_scale" in name or "layrnorm" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model.eval()


def hf_clip(**overrides) -> CLIPVisionModel:
    cfg = CLIPVisionConfig(**{**SMALL, "intermediate_size": 128, **overrides})
    return randomise(CLIPVisionModel(cfg))


def hf_dinov2(**overrides) -> Dinov2Model:
    return randomise(Dinov2Model(Dinov2Config(**{**SMALL, **overrides})))


def hf_dinov2_reg(**overrides) -> Dinov2WithRegistersModel:
    cfg = Dinov2WithRegistersConfig(**{**SMALL, "num_register_tokens": 4, **overrides})
    return randomise(Dinov2WithRegistersModel(cfg))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
