"""The COMM visual branch (arXiv 2310.08825, docs/architecture.md §1) in plain PyTorch: the ground truth.

Readable next to the paper and never the fast path. Everything fused in comm_fast is tested
against these functions, and ``COMMReference`` is the composition a user would write from
transformers' models: ``output_hidden_states=True`` plus per-layer LayerNorm + Linear modules.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from comm_fast.activations import activation  # noqa: F401  (one definition, re-exported)
from comm_fast.config import COMMVisionConfig
from comm_fast.constants import CLIP_MEAN, CLIP_STD, DINO_MEAN, DINO_STD, pad_colour  # noqa: F401 (re-exported)


def layernorm_weighted_sum(hs: Sequence[torch.Tensor], ln_weight, ln_bias, alpha, eps: float = 1e-5):
    """Σ_l α_l · LayerNorm_l(h_l)."""
    return sum(alpha[l] * F.layer_norm(h, h.shape[-1:], ln_weight[l], ln_bias[l], eps) for l, h in enumerate(hs))


def multilevel_merge(hs: Sequence[torch.Tensor], ln_weight, ln_bias, weight, bias, alpha, eps: float = 1e-5):
    """Σ_l α_l · LLN_l(h_l), with LLN_l(x) = Linear_l(LayerNorm_l(x)) (the paper's equation)."""
    return sum(alpha[l] * F.linear(F.layer_norm(h, h.shape[-1:], ln_weight[l], ln_bias[l], eps), weight[l], bias[l])
               for l, h in enumerate(hs))


def mlp(x, w1, b1, w2, b2, activation_name: str = "gelu"):
    """Linear → activation → Linear."""
    return F.linear(activation(F.linear(x, w1, b1), activation_name), w2, b2)


def resample_tokens(tokens: torch.Tensor, src_hw, dst_hw, mode: str = "bilinear") -> torch.Tensor:
    """A [B, H*W, C] token grid resampled like F.interpolate on the NCHW image (align_corners=False)."""
    b, _, c = tokens.shape
    x = tokens.reshape(b, *src_hw, c).permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, dst_hw) if mode == "area" else F.interpolate(x, size=tuple(dst_hw), mode=mode,
                                                                              align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(b, -1, c)


def interpolate_pos_embed(pos: torch.Tensor, src_hw, dst_hw, mode: str = "hf", num_prefix_tokens: int = 1):
    """Each source's own F.interpolate call on a [1, P + H*W, D] position embedding (docs/architecture.md §1)."""
    if tuple(src_hw) == tuple(dst_hw):
        return pos
    d = pos.shape[-1]
    grid = pos[:, num_prefix_tokens:].reshape(1, *src_hw, d).permute(0, 3, 1, 2).float()
    if mode == "dinov2_offset":  # original DINOv2: the scale factor drives the coordinate mapping
        scale = ((dst_hw[0] + 0.1) / src_hw[0], (dst_hw[1] + 0.1) / src_hw[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid, size=tuple(dst_hw), mode="bicubic", align_corners=False,
                             antialias=(mode == "antialias"))
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, -1, d)
    return torch.cat([pos[:, :num_prefix_tokens], grid], dim=1)




def preprocess_image(image: torch.Tensor, size: int, mean, std, pad: bool = False) -> torch.Tensor:
    """One uint8 HxWx3 image → [3, size, size]: optionally padded to a square with the mean colour
    (LLaVA-1.5's expand2square), shortest side to ``size`` (antialiased bicubic), center crop,
    rescale to [0, 1], normalise. The torch composition a user would write."""
    if pad and image.shape[0] != image.shape[1]:
        h, w = image.shape[:2]
        m = max(h, w)
        square = torch.tensor(pad_colour(mean), dtype=image.dtype, device=image.device).repeat(m, m, 1)
        square[(m - h) // 2:(m - h) // 2 + h, (m - w) // 2:(m - w) // 2 + w] = image
        image = square
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if h <= w else (new_long, size)
    x = image.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255)  # image processors resize in uint8
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    x = x[0, :, top:top + size, left:left + size] / 255.0
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (mean, std))  # on the image's device
    return (x - mean) / std


class LLN(nn.Module):
    """LayerNorm, then a Linear."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x):
        return self.linear(self.norm(x))


class COMMReference(nn.Module):
    """The paper's visual branch on top of any encoders that return Hugging Face hidden states.

    ``clip_model`` / ``dino_model``: e.g. transformers' CLIPVisionModel and Dinov2Model.
    """

    def __init__(self, config: COMMVisionConfig, clip_model: nn.Module, dino_model: nn.Module):
        super().__init__()
        self.config = config
        self.clip_model, self.dino_model = clip_model, dino_model
        dc = clip_model.config.hidden_size
        dd = dino_model.config.hidden_size
        n_clip, n_dino = len(config.clip_layers), len(config.dino_layers)
        eps = config.ln_eps
        if config.per_layer_linear:
            self.clip_lln = nn.ModuleList(LLN(dc, dc, eps) for _ in range(n_clip))
            self.dino_lln = nn.ModuleList(LLN(dd, dd, eps) for _ in range(n_dino))
        else:
            self.clip_norms = nn.ModuleList(nn.LayerNorm(dc, eps=eps) for _ in range(n_clip))
            self.dino_norms = nn.ModuleList(nn.LayerNorm(dd, eps=eps) for _ in range(n_dino))
            self.clip_linear, self.dino_linear = nn.Linear(dc, dc), nn.Linear(dd, dd)
        self.alpha = nn.Parameter(torch.full((n_clip,), 1.0 / n_clip))
        self.beta = nn.Parameter(torch.full((n_dino,), 1.0 / n_dino))
        hidden = config.mlp_ratio * dc
        self.dino_mlp = nn.Sequential(nn.Linear(dd, hidden), nn.Identity(), nn.Linear(hidden, dc))
        self.projector = nn.Linear((2 if config.combine == "concat" else 1) * dc, config.out_dim)

    def _weights(self, w):
        return torch.softmax(w, dim=0) if self.config.layer_weights == "softmax" else w

    def _merge(self, hidden_states, lln, norms, linear, weights):
        if self.config.per_layer_linear:
            return sum(weights[i] * lln[i](h) for i, h in enumerate(hidden_states))
        return linear(sum(weights[i] * norms[i](h) for i, h in enumerate(hidden_states)))

    def forward(self, clip_pixels: torch.Tensor, dino_pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        clip_out = self.clip_model(pixel_values=clip_pixels, output_hidden_states=True,
                                   interpolate_pos_encoding=True)
        dino_out = self.dino_model(pixel_values=dino_pixels, output_hidden_states=True)
        n_reg = getattr(self.dino_model.config, "num_register_tokens", 0)
        # patch tokens only: CLIP drops CLS, DINOv2 drops CLS and registers
        clip_hs = [clip_out.hidden_states[i][:, 1:] for i in cfg.clip_layers]
        dino_hs = [dino_out.hidden_states[i][:, 1 + n_reg:] for i in cfg.dino_layers]
        v1 = self._merge(clip_hs, getattr(self, "clip_lln", None), getattr(self, "clip_norms", None),
                         getattr(self, "clip_linear", None), self._weights(self.alpha))
        v2 = self._merge(dino_hs, getattr(self, "dino_lln", None), getattr(self, "dino_norms", None),
                         getattr(self, "dino_linear", None), self._weights(self.beta))
        clip_grid = self._grid(clip_pixels, self.clip_model)
        dino_grid = self._grid(dino_pixels, self.dino_model)
        if clip_grid != dino_grid:
            v2 = resample_tokens(v2, dino_grid, clip_grid, cfg.grid_resample)
        fc1, _, fc2 = self.dino_mlp
        m = fc2(activation(fc1(v2), cfg.mlp_activation))
        fused = torch.cat([v1, m], dim=-1) if cfg.combine == "concat" else v1 + m
        return self.projector(fused)

    @classmethod
    def from_tower(cls, tower) -> "COMMReference":
        """The same weights as a COMMVisionTower, on transformers' CLIPVisionModel and Dinov2Model
        (Dinov2WithRegistersModel when the DINOv2 has registers): the naive composition to compare with."""
        clip_model = hf_encoder(tower.clip)
        dino_model = hf_encoder(tower.dino)
        ref = cls(tower.config, clip_model, dino_model)
        return ref.to(tower.projector.weight.dtype).load_merge_weights(tower)

    @staticmethod
    def _grid(pixels, model):
        p = model.config.patch_size
        return pixels.shape[-2] // p, pixels.shape[-1] // p

    @torch.no_grad()
    def load_merge_weights(self, tower) -> "COMMReference":
        """Copy the merge modules, MLP and projector of a COMMVisionTower (stacked per layer) into this one."""
        for enc, w in (("clip", self.alpha), ("dino", self.beta)):
            merge = getattr(tower, f"{enc}_merge")
            w.copy_(merge.alpha)
            if self.config.per_layer_linear:
                for i, lln in enumerate(getattr(self, f"{enc}_lln")):
                    lln.norm.weight.copy_(merge.ln_weight[i]); lln.norm.bias.copy_(merge.ln_bias[i])
                    lln.linear.weight.copy_(merge.weight[i]); lln.linear.bias.copy_(merge.bias[i])
            else:
                for i, norm in enumerate(getattr(self, f"{enc}_norms")):
                    norm.weight.copy_(merge.ln_weight[i]); norm.bias.copy_(merge.ln_bias[i])
                linear = getattr(self, f"{enc}_linear")
                linear.weight.copy_(merge.weight); linear.bias.copy_(merge.bias)
        fc1, _, fc2 = self.dino_mlp
        fc1.load_state_dict(tower.dino_mlp.fc1.state_dict()); fc2.load_state_dict(tower.dino_mlp.fc2.state_dict())
        self.projector.load_state_dict(tower.projector.state_dict())
        return self


def hf_encoder(encoder) -> nn.Module:
    """A transformers vision model holding the weights of a comm_fast CLIPVisionEncoder / DINOv2Encoder."""
    import transformers

    cfg = encoder.config
    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                  num_channels=cfg.num_channels)
    sd = {k: v.detach() for k, v in encoder.state_dict().items()}
    out = {}
    if cfg.family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            **common, intermediate_size=cfg.mlp_hidden, hidden_act=cfg.activation))
        out["embeddings.class_embedding"] = sd.pop("cls_token").reshape(-1)
        out["embeddings.position_embedding.weight"] = sd.pop("pos_embed")[0]
        out["embeddings.patch_embedding.weight"] = sd.pop("patch_embed.weight")
        layer, q, k, v, o = "encoder.layers.{}.", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"
        names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        top = {"pre_norm": "pre_layrnorm"}
    else:
        if cfg.activation == "swiglu":
            raise ValueError("encoder: no transformers twin for a SwiGLU DINOv2 in this helper")
        registers = cfg.num_register_tokens
        kind = "Dinov2WithRegisters" if registers else "Dinov2"
        extra = {"num_register_tokens": registers} if registers else {}
        if cfg.mlp_hidden % cfg.hidden_size:
            raise ValueError(f"encoder: MLP width {cfg.mlp_hidden} is not a multiple of {cfg.hidden_size}")
        model = getattr(transformers, f"{kind}Model")(getattr(transformers, f"{kind}Config")(
            **common, mlp_ratio=cfg.mlp_hidden // cfg.hidden_size, **extra))
        for name, hf in (("cls_token", "cls_token"), ("pos_embed", "position_embeddings"),
                         ("register_tokens", "register_tokens")):
            if name in sd:
                out[f"embeddings.{hf}"] = sd.pop(name)
        out["embeddings.patch_embeddings.projection.weight"] = sd.pop("patch_embed.weight")
        out["embeddings.patch_embeddings.projection.bias"] = sd.pop("patch_embed.bias")
        hf_names = set(model.state_dict())
        q, k, v, o = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
                      if "encoder.layer.0.attention.q_proj.weight" in hf_names else
                      ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                       "attention.output.dense"))
        layer = "encoder.layer.{}."
        names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                 "ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1"}
        top = {}
    for i in range(cfg.num_layers):
        pre = layer.format(i)
        for kind in ("weight", "bias"):
            parts = sd.pop(f"blocks.{i}.attn.qkv.{kind}").chunk(3)
            for name, part in zip((q, k, v), parts):
                out[f"{pre}{name}.{kind}"] = part
            out[f"{pre}{o}.{kind}"] = sd.pop(f"blocks.{i}.attn.proj.{kind}")
        for ours, theirs in names.items():
            for key in [k_ for k_ in list(sd) if k_.startswith(f"blocks.{i}.{ours}")]:
                out[pre + theirs + key[len(f"blocks.{i}.{ours}"):]] = sd.pop(key)
    for ours, theirs in top.items():
        for key in [k_ for k_ in list(sd) if k_.startswith(ours + ".")]:
            out[theirs + key[len(ours):]] = sd.pop(key)
    if sd:
        raise ValueError(f"encoder: weights without a transformers twin: {sorted(sd)}")
    missing, unexpected = model.load_state_dict(out, strict=False)
    # the final norms (post_layernorm / layernorm) are not part of COMM's hidden states
    leftover = [m for m in missing if not m.startswith(("post_layernorm", "layernorm", "embeddings.mask_token"))
                and "position_ids" not in m]
    if leftover or unexpected:
        raise ValueError(f"encoder: transformers twin mismatch: missing {leftover}, unexpected {unexpected}")
    return model.to(next(encoder.parameters()).dtype).eval()
