"""DINOv2 encoder (ViT with LayerScale, optional registers and SwiGLU), loading HF and torch-hub weights."""
from __future__ import annotations

import torch

from comm_fast.models import loading
from comm_fast.models.vit import ViTConfig, ViTEncoder

_RULES = [
    # Hugging Face Dinov2Model / Dinov2WithRegistersModel
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    # saved files name q/k/v "attention.attention.query", transformers 5 in memory "attention.q_proj"
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".attn.q_proj."),
    (r"\.attention\.(?:attention\.key|k_proj)\.", ".attn.k_proj."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".attn.v_proj."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1"),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),
    (r"\.mlp\.(weights_out|down_proj)\.", ".mlp.w3."),
    # original facebookresearch/dinov2 (torch hub) names
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # block chunks
    (r"\.ls([12])\.gamma$", r".ls\1"),
]
# The final LayerNorm and the masked-modelling token are not used by COMM.
_IGNORE = (r"(layernorm|norm)\.(weight|bias)", r"(embeddings\.)?mask_token")


def _fuse(sd):
    loading.fuse_linears(sd, ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.qkv")
    loading.fuse_linears(sd, ("mlp.gate_proj", "mlp.up_proj"), "mlp.w12")


class DINOv2Encoder(ViTEncoder):
    """DINOv2 up to the requested block; tokens are CLS, registers, then patches; no final norm."""

    @staticmethod
    def config_from_hf(config: dict, pos_interp: str | None = None) -> ViTConfig:
        model_type = config.get("model_type")
        modes = {"dinov2": "hf", "dinov2_with_registers": "antialias"}
        if model_type not in modes:
            raise ValueError(f"path: expected a DINOv2 checkpoint (model_type 'dinov2' or "
                             f"'dinov2_with_registers'), got model_type {model_type!r}")
        d = config.get("hidden_size", 768)
        hidden = int(d * config.get("mlp_ratio", 4))
        swiglu = bool(config.get("use_swiglu_ffn", False))
        if swiglu:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        elif config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"config.json: hidden_act {config.get('hidden_act')!r} is not supported (gelu)")
        patch = config.get("patch_size", 14)
        return ViTConfig(family="dinov2", hidden_size=d, num_layers=config.get("num_hidden_layers", 12),
                         num_heads=config.get("num_attention_heads", 12), mlp_hidden=hidden, patch_size=patch,
                         image_size=config.get("image_size", 224), layer_norm_eps=config.get("layer_norm_eps", 1e-6),
                         activation="swiglu" if swiglu else "gelu", layerscale=True,
                         num_register_tokens=config.get("num_register_tokens", 0) if model_type != "dinov2" else 0,
                         pos_interp=pos_interp or modes[model_type], num_channels=config.get("num_channels", 3))

    @staticmethod
    def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face or torch-hub DINOv2 names to this module's names."""
        sd = loading.strip_prefix(sd, ("dinov2.",))
        return loading.remap(sd, _RULES, _IGNORE, _fuse)

    @staticmethod
    def _infer_config(sd: dict[str, torch.Tensor], pos_interp: str | None) -> ViTConfig:
        """Original DINOv2 weights carry no config: read it off the shapes (heads of width 64)."""
        d, c, p, grid, layers = DINOv2Encoder._read_shapes(sd, "DINOv2")
        swiglu = "blocks.0.mlp.w12.weight" in sd
        hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2 if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
        registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
        # torch-hub: registers models interpolate size-based with antialias, the others with the 0.1 offset
        mode = pos_interp or ("antialias" if registers else "dinov2_offset")
        return ViTConfig(family="dinov2", hidden_size=d, num_layers=layers, num_heads=max(1, d // 64),
                         mlp_hidden=hidden, patch_size=p, image_size=grid * p, layer_norm_eps=1e-6,
                         activation="swiglu" if swiglu else "gelu", layerscale="blocks.0.ls1" in sd,
                         num_register_tokens=registers, pos_interp=mode, num_channels=c)
