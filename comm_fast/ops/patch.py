"""Joint patch interpolation ops: position embeddings, token-grid resampling, joint preprocessing.

Each op validates its arguments here (clear ValueError/TypeError naming the argument), then runs
on the csrc extension comm_fast._C (C++ on CPU tensors, CUDA on GPU tensors) or on the torch
implementation below, which is both the readable reference and the fallback when the extension
is missing. ``backend=``: None/"auto", "torch", "cpp" or "cuda" (COMM_FAST_BACKEND overrides auto).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from comm_fast import _backend, _ext

POS_EMBED_MODES = ("hf", "dinov2_offset", "antialias")
RESAMPLE_MODES = ("bilinear", "bicubic", "area")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)

_OPS = ("interpolate_pos_embed", "resample_tokens", "joint_preprocess")
_NATIVE = {"cpu": "cpp", "cuda": "cuda"}  # the extension backend for each device type


def _hw(name: str, value) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (height, width) pair of ints, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected positive sizes, got {(h, w)}")
    return h, w


def _auto(device_type: str) -> tuple[str, str]:
    """What auto picks for tensors on device_type, and why."""
    ext, why = _ext.load()
    if device_type == "cpu":
        return ("cpp", "C++ extension (at::parallel_for)") if ext is not None else ("torch", f"fallback: {why}")
    if device_type == "cuda":
        if _ext.has_cuda():
            return "cuda", "CUDA extension"
        reason = why if ext is None else "comm_fast._C was built without CUDA (torch without CUDA or no nvcc)"
        return "torch", f"fallback: {reason}"
    return "torch", f"no extension kernels for {device_type} tensors"


def _choose(op: str, backend: str | None, device: torch.device) -> tuple[str, str]:
    """The backend that runs op on device: an explicit backend= is honoured or refused (ValueError);
    COMM_FAST_BACKEND is honoured where it fits the op and device, else auto decides."""
    req = _backend.requested(backend)
    native = _NATIVE.get(device.type)
    if req == "torch":
        return "torch", "torch requested"
    if req in ("cpp", "cuda") and req == native:
        ext, why = _ext.load()
        if ext is None or (req == "cuda" and not _ext.has_cuda()):
            if backend is not None:
                raise RuntimeError(f"backend={req!r} requested but unavailable: "
                                   f"{why if ext is None else 'comm_fast._C was built without CUDA'}")
        else:
            return req, "requested"
    elif req != "auto" and backend is not None:
        raise ValueError(f"backend: {op} has no {req!r} backend for {device.type} tensors "
                         f"(choose auto, torch{', ' + native if native else ''})")
    name, reason = _auto(device.type)
    if name == "torch" and device.type in _NATIVE:
        _backend.warn_once(f"{op}:{device.type}", f"comm_fast.ops.{op}: the compiled kernels are not available "
                                                  f"for {device.type} tensors, using the torch path ({reason})")
    if req != "auto":
        reason = f"COMM_FAST_BACKEND={req} does not fit {device.type} tensors; {reason}"
    return name, reason


# ---------------------------------------------------------------------------------------------
# interpolate_pos_embed
# ---------------------------------------------------------------------------------------------

def interpolate_pos_embed(pos: torch.Tensor, src_hw, dst_hw, mode: str = "hf",
                          num_prefix_tokens: int = 1, backend: str | None = None) -> torch.Tensor:
    """Bicubic interpolation of a ``[(1,) P + H*W, D]`` position embedding from grid src_hw to dst_hw.

    The P prefix tokens (CLS, registers) pass through. Computed in fp32, returned in pos.dtype.
    ``mode``: "hf" (size-based, A=-0.75), "dinov2_offset" (original DINOv2: the scale factor
    (dst+0.1)/src drives the coordinate mapping) or "antialias" (size-based, antialias=True).
    An unchanged grid returns the embedding as is, as every source does.
    """
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
    if n_prefix < 0:
        raise ValueError(f"num_prefix_tokens: expected >= 0, got {n_prefix}")
    if p.shape[1] != n_prefix + sh * sw:
        raise ValueError(f"pos: expected {n_prefix} prefix tokens + {sh}x{sw} grid = {n_prefix + sh * sw} "
                         f"positions, got {p.shape[1]}")
    if mode == "dinov2_offset" and (math.floor(sh * ((dh + 0.1) / sh)) != dh or math.floor(sw * ((dw + 0.1) / sw)) != dw):
        raise ValueError(f"dst_hw: the dinov2_offset scale factor does not give {(dh, dw)}")
    name, reason = _choose("interpolate_pos_embed", backend, pos.device)
    if (sh, sw) == (dh, dw):
        _backend.record("interpolate_pos_embed", name, "unchanged grid: returned as is")
        return pos
    _backend.record("interpolate_pos_embed", name, reason)
    if name != "torch":
        ext, _ = _ext.load()
        return ext.interpolate_pos_embed(pos, sh, sw, dh, dw, mode, n_prefix)
    d = p.shape[-1]
    grid = p[:, n_prefix:].reshape(1, sh, sw, d).permute(0, 3, 1, 2).float()
    if mode == "dinov2_offset":
        grid = F.interpolate(grid, scale_factor=((dh + 0.1) / sh, (dw + 0.1) / sw), mode="bicubic",
                             align_corners=False)
    else:
        grid = F.interpolate(grid, size=(dh, dw), mode="bicubic", align_corners=False,
                             antialias=(mode == "antialias"))
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, dh * dw, d)
    out = torch.cat([p[:, :n_prefix], grid], dim=1)
    return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------------
# resample_tokens
# ---------------------------------------------------------------------------------------------

def resample_tokens(tokens: torch.Tensor, src_hw, dst_hw, mode: str = "bilinear",
                    out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Resample a ``[B, H*W, C]`` token grid to ``[B, h*w, C]`` like F.interpolate (align_corners=False)
    on the NCHW view ("area": F.adaptive_avg_pool2d). ``out`` may be any ``[B, h*w, C]`` view with a
    contiguous channel dimension, e.g. ``buf[..., C:2*C]``; only it is written."""
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
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a tensor, got {type(out).__name__}")
        if out.shape != (b, dh * dw, c) or out.dtype != tokens.dtype or out.device != tokens.device:
            raise ValueError(f"out: expected {tokens.dtype} on {tokens.device} of shape {(b, dh * dw, c)}, got "
                             f"{out.dtype} on {out.device} of shape {tuple(out.shape)}")
        if c > 1 and out.stride(2) != 1:
            raise ValueError(f"out: the channel dimension must be contiguous (stride 1), got strides {out.stride()}")
    name, reason = _choose("resample_tokens", backend, tokens.device)
    _backend.record("resample_tokens", name, reason)
    if name != "torch":
        ext, _ = _ext.load()
        if c > 1 and tokens.stride(2) != 1:
            tokens = tokens.contiguous()
        return ext.resample_tokens(tokens, sh, sw, dh, dw, mode, out)
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


# ---------------------------------------------------------------------------------------------
# joint_preprocess
# ---------------------------------------------------------------------------------------------

def _as_hwc(image, name: str) -> torch.Tensor:
    """One uint8 image as an [H, W, 3] view (no copy): HxWx3 arrays/tensors, or 3xHxW tensors."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{name}: expected uint8 pixels, got numpy {image.dtype}")
        image = torch.from_numpy(image if image.flags.writeable else image.copy())
    elif not isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or a tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 pixels, got {image.dtype}")
    if image.dim() != 3:
        raise ValueError(f"{name}: expected an HxWx3 (or 3xHxW) image, got shape {tuple(image.shape)}")
    if image.shape[-1] != 3:
        if image.shape[0] != 3:
            raise ValueError(f"{name}: expected 3 channels (HxWx3 or 3xHxW), got shape {tuple(image.shape)}")
        image = image.permute(1, 2, 0)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: empty image of shape {tuple(image.shape)}")
    return image


def _image_list(images) -> tuple[list[torch.Tensor], bool]:
    """(list of [H, W, 3] views, whether the input was one batch tensor)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError("images: empty batch")
        t = images if isinstance(images, torch.Tensor) else None
        if t is None:
            if images.dtype != np.uint8:
                raise TypeError(f"images: expected uint8 pixels, got numpy {images.dtype}")
            t = torch.from_numpy(images if images.flags.writeable else images.copy())
        if t.dtype != torch.uint8:
            raise TypeError(f"images: expected uint8 pixels, got {t.dtype}")
        if t.shape[-1] != 3:
            if t.shape[1] != 3:
                raise ValueError(f"images: expected [B, H, W, 3] or [B, 3, H, W], got shape {tuple(t.shape)}")
            t = t.permute(0, 2, 3, 1)
        if t.shape[1] == 0 or t.shape[2] == 0:
            raise ValueError(f"images: empty images of shape {tuple(t.shape)}")
        return list(t.unbind(0)), True
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [_as_hwc(images, "images")], False
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected a list of images or a batch tensor, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty list")
    views = [_as_hwc(im, f"images[{i}]") for i, im in enumerate(images)]
    devices = {v.device for v in views}
    if len(devices) > 1:
        raise ValueError(f"images: all images must be on one device, got {sorted(map(str, devices))}")
    return views, False


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(size, default_to_square=False): (new_h, new_w)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _torch_resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> [N, 3, S, S] float in [0, 255]: antialiased bicubic (PIL's filter),
    rounded to uint8 as PIL does, then the processors' center crop."""
    h, w = x.shape[-2:]
    nh, nw = shortest_edge_size(h, w, size)
    if x.device.type == "cpu":
        # torch's uint8 path is Pillow's arithmetic; one axis per call, in Pillow's pass order
        # (vertical first when the height shrinks by more than twice the width), each rounded to uint8.
        steps = [(nh, w), (nh, nw)] if (h - nh) > 0 and (h - nh) > 2 * (w - nw) else [(h, nw), (nh, nw)]
        y = x
        for hw in steps:
            if tuple(y.shape[-2:]) != hw:
                y = F.interpolate(y, size=hw, mode="bicubic", antialias=True)
        y = y.float()
    else:
        y = F.interpolate(x.float(), size=(nh, nw), mode="bicubic", antialias=True).round_().clamp_(0, 255)
    top, left = (nh - size) // 2, (nw - size) // 2
    return y[..., top:top + size, left:left + size]


def _torch_normalise(y: torch.Tensor, mean, std, dtype) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32, device=y.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=y.device).view(1, 3, 1, 1)
    return ((y / 255.0 - m) / s).to(dtype)


def _torch_joint_preprocess(views, batched, clip_size, dino_size, dtype):
    if batched:
        groups = [torch.stack(views).permute(0, 3, 1, 2)]
    else:
        groups = [v.permute(2, 0, 1).unsqueeze(0) for v in views]
    clip = torch.cat([_torch_resize_crop(g, clip_size) for g in groups])
    dino = clip if dino_size == clip_size else torch.cat([_torch_resize_crop(g, dino_size) for g in groups])
    return _torch_normalise(clip, CLIP_MEAN, CLIP_STD, dtype), _torch_normalise(dino, DINO_MEAN, DINO_STD, dtype)


def joint_preprocess(images, clip_size: int = 336, dino_size: int = 336, dtype=torch.float32,
                     backend: str | None = None):
    """uint8 images -> (clip_pixels, dino_pixels), each ``[B, 3, S, S]`` in ``dtype`` on the images' device.

    Per image, as CLIPImageProcessor and the DINOv2 (Bit) processor do with their PIL backends:
    resize of the shortest side to S with Pillow's antialiased BICUBIC (rounded to uint8), center
    crop S x S, rescale 1/255, each encoder's mean/std. One read of each image; when the sizes are
    equal the resize is done once. ``images``: a list of HxWx3 uint8 numpy arrays or tensors of any
    sizes (3xHxW tensors too), or a batch ``[B, H, W, 3]`` / ``[B, 3, H, W]``.
    """
    views, batched = _image_list(images)
    for name, s in (("clip_size", clip_size), ("dino_size", dino_size)):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0:
            raise ValueError(f"{name}: expected a positive int, got {s!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch dtype, got {dtype!r}")
    clip_size, dino_size = int(clip_size), int(dino_size)
    name, reason = _choose("joint_preprocess", backend, views[0].device)
    _backend.record("joint_preprocess", name, reason if name != "torch" else
                    f"{reason}; torch composition (antialiased F.interpolate + crop + normalise)")
    if name != "torch":
        ext, _ = _ext.load()
        return ext.joint_preprocess(views, clip_size, dino_size, dtype, CLIP_MEAN, CLIP_STD, DINO_MEAN, DINO_STD)
    return _torch_joint_preprocess(views, batched, clip_size, dino_size, dtype)


def describe() -> dict:
    """For comm_fast.info(): per op, the backend auto picks for CPU and CUDA tensors, and why."""
    req = _backend.requested(None)
    table = {}
    for op in _OPS:
        entry = {}
        for dev in ("cpu", "cuda"):
            name, reason = _auto(dev)
            if req == "torch":
                name, reason = "torch", "COMM_FAST_BACKEND=torch"
            entry[dev] = {"backend": name, "reason": reason}
        table[op] = entry
    return table
