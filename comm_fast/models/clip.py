"""CLIP vision encoder (ViT with pre-layernorm and quick_gelu), loading Hugging Face checkpoints."""
from __future__ import annotations

import torch

from comm_fast.models import loading
from comm_fast.models.vit import ViTConfig, ViTEncoder

_RULES = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.patch_embedding\.", "patch_embed."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^pre_layrnorm\.", "pre_norm."),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]
# Keys of a CLIP checkpoint that COMM does not use: the final norm, the text half, the projections.
_IGNORE = (r"post_layernorm\..*", r"embeddings\.position_ids", r"text_model\..*", r"visual_projection\..*",
           r"text_projection\..*", r"logit_scale")
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


class CLIPVisionEncoder(ViTEncoder):
    """CLIP's vision transformer up to the requested block; hidden_states[0] is after pre_layrnorm."""

    @staticmethod
    def config_from_hf(config: dict, pos_interp: str | None = None) -> ViTConfig:
        model_type = config.get("model_type")
        if model_type == "clip":
            config = config.get("vision_config") or {}
        elif model_type != "clip_vision_model":
            raise ValueError(f"path: expected a CLIP checkpoint (model_type 'clip' or 'clip_vision_model'), "
                             f"got model_type {model_type!r}")
        c = {**_HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        if c["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {c['hidden_act']!r} is not supported (quick_gelu or gelu)")
        return ViTConfig(family="clip", hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                         num_heads=c["num_attention_heads"], mlp_hidden=c["intermediate_size"],
                         patch_size=c["patch_size"], image_size=c["image_size"],
                         layer_norm_eps=c["layer_norm_eps"], activation=_ACTIVATIONS[c["hidden_act"]],
                         pre_norm=True, patch_bias=False, pos_interp=pos_interp or "hf",
                         num_channels=c["num_channels"])

    @staticmethod
    def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face CLIP names (with or without 'vision_model.') to this module's names."""
        sd = loading.strip_prefix(sd, ("vision_model.",))
        sd = loading.remap(sd, _RULES, _IGNORE,
                           lambda s: loading.fuse_linears(s, ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.qkv"))
        if "cls_token" in sd:
            sd["cls_token"] = sd["cls_token"].reshape(1, 1, -1)
        if "pos_embed" in sd and sd["pos_embed"].dim() == 2:
            sd["pos_embed"] = sd["pos_embed"].unsqueeze(0)
        return sd

    @staticmethod
    def _infer_config(sd: dict[str, torch.Tensor], pos_interp: str | None) -> ViTConfig:
        """For a bare state dict: every size but the head count is in the shapes (heads of width 64)."""
        d, c, p, grid, layers = CLIPVisionEncoder._read_shapes(sd, "CLIP vision")
        if "blocks.0.mlp.fc1.weight" not in sd:
            raise ValueError("path: not a CLIP vision state dict (no 'blocks.0.mlp.fc1.weight')")
        mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
        return ViTConfig(family="clip", hidden_size=d, num_layers=layers, num_heads=max(1, d // 64), mlp_hidden=mlp,
                         patch_size=p, image_size=grid * p, layer_norm_eps=1e-5, activation="quick_gelu",
                         pre_norm=True, patch_bias=False, pos_interp=pos_interp or "hf", num_channels=c)
