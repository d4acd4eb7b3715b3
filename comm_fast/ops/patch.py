"""Joint patch interpolation ops: position embeddings, token-grid resampling, joint preprocessing.

Torch implementations; the csrc extension (comm_fast._C) replaces them where built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from comm_fast import _backend

POS_EMBED_MODES = ("hf", "dinov2_offset", "antialias")
RESAMPLE_MODES = ("bilinear", "bicubic", "area")


def _hw(name: str, value) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (height, width) pair of ints, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected positive sizes, got {(h, w)}")
    return h, w


def interpolate_pos_embed(pos: torch.Tensor, src_hw, dst_hw, mode: str = "hf",
                          num_prefix_tokens: int = 1, backend: str | None = None) -> torch.Tensor:
    """Bicubic interpolation of a ``[(1,) P + H*W, D]`` position embedding from grid src_hw to dst_hw.

    The P prefix tokens (CLS, registers) pass through. Computed in fp32, returned in pos.dtype.
    ``mode``: "hf" (size-based, A=-0.75), "dinov2_offset" (original DINOv2: the scale factor
    (dst+0.1)/src drives the coordinate mapping) or "antialias" (size-based, antialias=True).
    An unchanged grid returns the embedding as is, as every source does.
    """
    _backend.requested(backend)
    if not isinstance(pos, torch.Tensor) or not pos.is_floating_point():
        raise TypeError(f"pos: expected a floating-point tensor, got {type(pos).__name__}"
                        f"{'' if not isinstance(pos, torch.Tensor) else ' of dtype ' + str(pos.dtype)}")
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"mode: expected one of {POS_EMBED_MODES}, got {mode!r}")
    sh, sw = _hw("src_hw", src_hw)
    dh, dw = _hw("dst_hw", dst_hw)
    squeeze = pos.dim() == 2
    p = pos.unsqueeze(0) if squeeze else pos
    if p.dim() != 3 or p.shape[0] != 1:
        raise ValueError(f"pos: expected shape [P + H*W, D] or [1, P + H*W, D], got {tuple(pos.shape)}")
    n_prefix = int(num_prefix_tokens)
    if n_prefix < 0 or p.shape[1] != n_prefix + sh * sw:
        raise ValueError(f"pos: expected {n_prefix} prefix tokens + {sh}x{sw} grid = {n_prefix + sh * sw} "
                         f"positions, got {p.shape[1]}")
    _backend.record("interpolate_pos_embed", "torch", "F.interpolate on the NCHW view")
    if (sh, sw) == (dh, dw):
        return pos
    d = p.shape[-1]
    grid = p[:, n_prefix:].reshape(1, sh, sw, d).permute(0, 3, 1, 2).float()
    if mode == "dinov2_offset":
        grid = F.interpolate(grid, scale_factor=((dh + 0.1) / sh, (dw + 0.1) / sw), mode="bicubic",
                             align_corners=False)
        if grid.shape[-2:] != (dh, dw):
            raise ValueError(f"dst_hw: the dinov2_offset scale factor gives {tuple(grid.shape[-2:])}, not {(dh, dw)}")
    else:
        grid = F.interpolate(grid, size=(dh, dw), mode="bicubic", align_corners=False,
                             antialias=(mode == "antialias"))
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, dh * dw, d)
    out = torch.cat([p[:, :n_prefix], grid], dim=1)
    return out[0] if squeeze else out


def resample_tokens(tokens: torch.Tensor, src_hw, dst_hw, mode: str = "bilinear",
                    out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Resample a ``[B, H*W, C]`` token grid to ``[B, h*w, C]`` like F.interpolate (align_corners=False)."""
    _backend.requested(backend)
    if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point() or tokens.dim() != 3:
        raise TypeError(f"tokens: expected a floating-point tensor [B, H*W, C], got "
                        f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
                        f"{' ' + str(tuple(tokens.shape)) if isinstance(tokens, torch.Tensor) else ''}")
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode: expected one of {RESAMPLE_MODES}, got {mode!r}")
    sh, sw = _hw("src_hw", src_hw)
    dh, dw = _hw("dst_hw", dst_hw)
    b, n, c = tokens.shape
    if n != sh * sw:
        raise ValueError(f"tokens: {n} tokens do not form the stated {sh}x{sw} grid")
    if out is not None and (out.shape != (b, dh * dw, c) or out.dtype != tokens.dtype or out.device != tokens.device):
        raise ValueError(f"out: expected {tokens.dtype} on {tokens.device} of shape {(b, dh * dw, c)}, got "
                         f"{out.dtype} on {out.device} of shape {tuple(out.shape)}")
    _backend.record("resample_tokens", "torch", "F.interpolate with permute/contiguous copies")
    x = tokens.reshape(b, sh, sw, c).permute(0, 3, 1, 2)
    if mode == "area":
        y = F.adaptive_avg_pool2d(x, (dh, dw))
    else:
        y = F.interpolate(x, size=(dh, dw), mode=mode, align_corners=False)
    y = y.permute(0, 2, 3, 1).reshape(b, dh * dw, c)
    if out is None:
        return y.contiguous()
    out.copy_(y)
    return out


def joint_preprocess(images, clip_size: int = 336, dino_size: int = 336, dtype=torch.float32,
                     backend: str | None = None):
    raise NotImplementedError("joint_preprocess lands with the csrc extension")


def describe() -> dict:
    """For comm_fast.info(): per op, the backend auto picks for CPU and CUDA tensors, and why."""
    choice = {"cpu": {"backend": "torch", "reason": "torch implementation"},
              "cuda": {"backend": "torch", "reason": "torch implementation"}}
    return {op: choice for op in ("interpolate_pos_embed", "resample_tokens", "joint_preprocess")}
