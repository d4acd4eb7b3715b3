"""Joint patch interpolation ops: position embeddings, token-grid resampling, joint preprocessing.

Each op validates its arguments here (clear ValueError/TypeError naming the argument), picks a
backend and calls a ``torch.library`` custom op (namespace ``comm_fast``), so torch.compile
(fullgraph=True) traces it as one node. The custom ops have CPU and CUDA kernels; inside,
``backend`` selects the csrc extension comm_fast._C (C++ on CPU tensors, CUDA on GPU tensors) or
the torch implementation below, which is both the readable reference and the fallback when the
extension is missing. The kernels record what ran (comm_fast.info()), in compiled runs too.
``backend=``: None/"auto", "torch", "cpp" or "cuda" (COMM_FAST_BACKEND overrides auto).

Custom ops: comm_fast::interpolate_pos_embed, comm_fast::resample_tokens (functional) and
comm_fast::resample_tokens_out (writes its ``out`` argument), comm_fast::joint_preprocess, and
comm_fast::resample_tokens_backward: both resampling ops are linear, their backward is the
adjoint of the same interpolation (ATen's upsample/adaptive-pool backward kernels, i.e.
F.interpolate's gradient).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from comm_fast import _backend, _ext
from comm_fast.constants import CLIP_MEAN, CLIP_STD, DINO_MEAN, DINO_STD, pad_colour  # noqa: F401 (re-exported)
from comm_fast.ops._custom import note as _note, ran as _ran, register as _register

POS_EMBED_MODES = ("hf", "dinov2_offset", "antialias")
ASPECTS = ("crop", "pad")
RESAMPLE_MODES = ("bilinear", "bicubic", "area")


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


def _ext_state() -> tuple[bool, bool, str]:
    """(extension loaded, built with CUDA, why not loaded). Fixed once loaded; read while tracing
    without tracing into _ext.load's cache."""
    ext, why = _ext.load()
    return ext is not None, _ext.has_cuda(), why


if hasattr(torch.compiler, "assume_constant_result"):
    _ext_state = torch.compiler.assume_constant_result(_ext_state)


def _auto(device_type: str) -> tuple[str, str]:
    """What auto picks for tensors on device_type, and why."""
    loaded, with_cuda, why = _ext_state()
    if device_type == "cpu":
        return ("cpp", "C++ extension (at::parallel_for)") if loaded else ("torch", f"fallback: {why}")
    if device_type == "cuda":
        if with_cuda:
            return "cuda", "CUDA extension"
        reason = why if not loaded else "comm_fast._C was built without CUDA (torch without CUDA or no nvcc)"
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
        loaded, with_cuda, why = _ext_state()
        if not loaded or (req == "cuda" and not with_cuda):
            if backend is not None:
                raise RuntimeError(f"backend={req!r} requested but unavailable: "
                                   f"{why if not loaded else 'comm_fast._C was built without CUDA'}")
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
# Torch paths (the reference, and the fallback without the extension)
# ---------------------------------------------------------------------------------------------


def _grid_mode(mode: str) -> tuple[str, bool]:
    """A pos-embed mode as (F.interpolate mode, antialias)."""
    return ("bicubic", mode == "antialias") if mode in POS_EMBED_MODES else (mode, False)


def _offset_scales(src_hw, dst_hw) -> tuple[float, float]:
    """The original DINOv2 scale factors ((dst + 0.1) / src), which drive its coordinate mapping."""
    return (dst_hw[0] + 0.1) / src_hw[0], (dst_hw[1] + 0.1) / src_hw[1]


def _resample_nchw(x: torch.Tensor, dst_hw, mode: str, scales=None) -> torch.Tensor:
    """F.interpolate / adaptive_avg_pool2d on NCHW (mode: a resample mode or a pos-embed mode)."""
    if mode == "area":
        return F.adaptive_avg_pool2d(x, dst_hw)
    m, antialias = _grid_mode(mode)
    if scales is not None:
        return F.interpolate(x, scale_factor=scales, mode=m, align_corners=False)
    return F.interpolate(x, size=dst_hw, mode=m, align_corners=False, antialias=antialias)


def _resample_torch(tokens, src_hw, dst_hw, mode, scales=None) -> torch.Tensor:
    b, _, c = tokens.shape
    x = tokens.reshape(b, *src_hw, c).permute(0, 3, 1, 2)
    y = _resample_nchw(x, dst_hw, mode, scales)
    return y.permute(0, 2, 3, 1).reshape(b, dst_hw[0] * dst_hw[1], c)


def _pos_embed_torch(pos, src_hw, dst_hw, mode, n_prefix) -> torch.Tensor:
    p = pos.unsqueeze(0) if pos.dim() == 2 else pos
    scales = _offset_scales(src_hw, dst_hw) if mode == "dinov2_offset" else None
    grid = _resample_torch(p[:, n_prefix:].float(), src_hw, dst_hw, mode, scales).to(pos.dtype)
    out = torch.cat([p[:, :n_prefix], grid], dim=1)
    return out[0] if pos.dim() == 2 else out


def _resample_adjoint(grad, src_hw, dst_hw, mode, scales=None) -> torch.Tensor:
    """The gradient of _resample_torch w.r.t. its [B, H*W, C] input: ATen's own backward kernels."""
    b, _, c = grad.shape
    g = grad.reshape(b, *dst_hw, c).permute(0, 3, 1, 2)
    in_size = [b, c, *src_hw]
    if mode == "area":
        like = g.new_empty(in_size).contiguous(memory_format=torch.channels_last)  # only its shape is read
        x = torch.ops.aten._adaptive_avg_pool2d_backward(g, like)
    else:
        m, antialias = _grid_mode(mode)
        sh, sw = scales if scales is not None else (None, None)
        fn = {("bilinear", False): torch.ops.aten.upsample_bilinear2d_backward,
              ("bicubic", False): torch.ops.aten.upsample_bicubic2d_backward,
              ("bicubic", True): torch.ops.aten._upsample_bicubic2d_aa_backward}[(m, antialias)]
        x = fn(g, list(dst_hw), in_size, False, sh, sw)
    return x.permute(0, 2, 3, 1).reshape(b, src_hw[0] * src_hw[1], c).contiguous()


# ---------------------------------------------------------------------------------------------
# Custom ops: one implementation per op, registered as its CPU and CUDA kernel; `backend`
# ("cpp", "cuda" or "torch", chosen by the public op) picks the extension or the torch path.
# The interpolation mode argument is `method` (`mode` clashes with torch.library's dispatch).
# ---------------------------------------------------------------------------------------------


def _ext_module():
    ext, why = _ext.load()
    if ext is None:  # only reachable if the module vanished after the backend was chosen
        raise RuntimeError(f"comm_fast._C is unavailable: {why}")
    return ext


def _resample_bwd_impl(grad: torch.Tensor, sh: int, sw: int, dh: int, dw: int, method: str, scale_h: float,
                       scale_w: float) -> torch.Tensor:
    """[B, dh*dw, C] gradient -> [B, sh*sw, C]; method: a resample or pos-embed mode; scales > 0: the
    scale factors that drove the forward mapping (dinov2_offset)."""
    scales = (scale_h, scale_w) if scale_h > 0 else None
    return _resample_adjoint(grad, (sh, sw), (dh, dw), method, scales)


def _resample_bwd_fake(grad, sh, sw, dh, dw, method, scale_h, scale_w):
    return grad.new_empty((grad.shape[0], sh * sw, grad.shape[2]))


# The backward of both resampling ops, a custom op too: ATen's upsample backward kernels have no
# meta implementation for symbolic sizes, so they cannot be traced directly.
_resample_bwd_op = _register("resample_tokens_backward", _resample_bwd_impl, _resample_bwd_fake)


def _pos_impl(pos: torch.Tensor, sh: int, sw: int, dh: int, dw: int, method: str, num_prefix_tokens: int,
              backend: str) -> torch.Tensor:
    _ran("interpolate_pos_embed", backend)
    if backend == "torch":
        return _pos_embed_torch(pos, (sh, sw), (dh, dw), method, num_prefix_tokens)
    return _ext_module().interpolate_pos_embed(pos, sh, sw, dh, dw, method, num_prefix_tokens)


def _pos_fake(pos, sh, sw, dh, dw, method, num_prefix_tokens, backend):
    return pos.new_empty((*pos.shape[:-2], num_prefix_tokens + dh * dw, pos.shape[-1]))


def _pos_setup(ctx, inputs, output):
    pos, sh, sw, dh, dw, method, n_prefix, backend = inputs
    ctx.args = (sh, sw, dh, dw, method, n_prefix)


def _pos_autograd(ctx, grad):
    sh, sw, dh, dw, method, n_prefix = ctx.args
    g = grad.unsqueeze(0) if grad.dim() == 2 else grad
    scale_h, scale_w = _offset_scales((sh, sw), (dh, dw)) if method == "dinov2_offset" else (0.0, 0.0)
    grid = _resample_bwd_op(g[:, n_prefix:].float(), sh, sw, dh, dw, method, scale_h, scale_w).to(grad.dtype)
    dpos = torch.cat([g[:, :n_prefix], grid], dim=1)
    return (dpos[0] if grad.dim() == 2 else dpos), None, None, None, None, None, None, None


_pos_op = _register("interpolate_pos_embed", _pos_impl, _pos_fake)
_pos_op.register_autograd(_pos_autograd, setup_context=_pos_setup)


def _resample_impl(tokens: torch.Tensor, sh: int, sw: int, dh: int, dw: int, method: str,
                   backend: str) -> torch.Tensor:
    _ran("resample_tokens", backend)
    if backend == "torch":
        return _resample_torch(tokens, (sh, sw), (dh, dw), method).contiguous()
    return _ext_module().resample_tokens(tokens, sh, sw, dh, dw, method)


def _resample_fake(tokens, sh, sw, dh, dw, method, backend):
    return tokens.new_empty((tokens.shape[0], dh * dw, tokens.shape[2]))


def _resample_setup(ctx, inputs, output):
    tokens, sh, sw, dh, dw, method, backend = inputs
    ctx.args = (sh, sw, dh, dw, method)


def _resample_autograd(ctx, grad):
    sh, sw, dh, dw, method = ctx.args
    return _resample_bwd_op(grad, sh, sw, dh, dw, method, 0.0, 0.0), None, None, None, None, None, None


_resample_op = _register("resample_tokens", _resample_impl, _resample_fake)
_resample_op.register_autograd(_resample_autograd, setup_context=_resample_setup)


def _resample_out_impl(tokens: torch.Tensor, sh: int, sw: int, dh: int, dw: int, method: str, out: torch.Tensor,
                       backend: str) -> None:
    _ran("resample_tokens", backend)
    if backend == "torch":
        out.copy_(_resample_torch(tokens, (sh, sw), (dh, dw), method))
    else:
        _ext_module().resample_tokens(tokens, sh, sw, dh, dw, method, out)


def _resample_out_fake(tokens, sh, sw, dh, dw, method, out, backend):
    return None


# Mutating ops take no autograd formula: with grad required, resample_tokens copies the
# functional op's result into `out` instead (a differentiable copy_).
_resample_out_op = _register("resample_tokens_out", _resample_out_impl, _resample_out_fake, mutates_args=("out",))


def _joint_impl(images: list[torch.Tensor], batched: bool, clip_size: int, dino_size: int, dtype: torch.dtype,
                aspect: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _ran("joint_preprocess", backend)
    if backend == "torch":
        return _torch_joint_preprocess(images, batched, clip_size, dino_size, dtype, aspect)
    fills = (pad_colour(CLIP_MEAN), pad_colour(DINO_MEAN)) if aspect == "pad" else ((), ())
    return _ext_module().joint_preprocess(images, clip_size, dino_size, dtype, CLIP_MEAN, CLIP_STD, DINO_MEAN,
                                          DINO_STD, *fills)


def _joint_fake(images, batched, clip_size, dino_size, dtype, aspect, backend):
    b = len(images)
    return (images[0].new_empty((b, 3, clip_size, clip_size), dtype=dtype),
            images[0].new_empty((b, 3, dino_size, dino_size), dtype=dtype))


# uint8 images: nothing to differentiate.
_joint_op = _register("joint_preprocess", _joint_impl, _joint_fake)


def _eager_only(device: torch.device) -> bool:
    """Tensors on devices the custom ops have no kernel for run the torch path directly."""
    return device.type not in _NATIVE


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------


def interpolate_pos_embed(pos: torch.Tensor, src_hw, dst_hw, mode: str = "hf",
                          num_prefix_tokens: int = 1, backend: str | None = None) -> torch.Tensor:
    """Bicubic interpolation of a ``[(1,) P + H*W, D]`` position embedding from grid src_hw to dst_hw.

    The P prefix tokens (CLS, registers) pass through. Computed in fp32, returned in pos.dtype.
    ``mode``: "hf" (size-based, A=-0.75), "dinov2_offset" (original DINOv2: the scale factor
    (dst+0.1)/src drives the coordinate mapping) or "antialias" (size-based, antialias=True).
    An unchanged grid returns the embedding as is, as every source does. Differentiable.
    """
    if not isinstance(pos, torch.Tensor) or not pos.is_floating_point():
        raise TypeError(f"pos: expected a floating-point tensor, got {type(pos).__name__}"
                        f"{'' if not isinstance(pos, torch.Tensor) else ' of dtype ' + str(pos.dtype)}")
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"mode: expected one of {POS_EMBED_MODES}, got {mode!r}")
    sh, sw = _hw("src_hw", src_hw)
    dh, dw = _hw("dst_hw", dst_hw)
    p = pos.unsqueeze(0) if pos.dim() == 2 else pos
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
    if _eager_only(pos.device):
        _backend.record("interpolate_pos_embed", name, reason)
        return _pos_embed_torch(pos, (sh, sw), (dh, dw), mode, n_prefix)
    _note("interpolate_pos_embed", name, reason)
    return _pos_op(pos, sh, sw, dh, dw, mode, n_prefix, name)


def resample_tokens(tokens: torch.Tensor, src_hw, dst_hw, mode: str = "bilinear",
                    out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Resample a ``[B, H*W, C]`` token grid to ``[B, h*w, C]`` like F.interpolate (align_corners=False)
    on the NCHW view ("area": F.adaptive_avg_pool2d). ``out`` may be any ``[B, h*w, C]`` view with a
    contiguous channel dimension, e.g. ``buf[..., C:2*C]``; only it is written. Differentiable
    (the gradient is F.interpolate's)."""
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
    if _eager_only(tokens.device):
        _backend.record("resample_tokens", name, reason)
        y = _resample_torch(tokens, (sh, sw), (dh, dw), mode)
        return y.contiguous() if out is None else out.copy_(y)
    _note("resample_tokens", name, reason)
    if name != "torch" and c > 1 and tokens.stride(2) != 1:
        tokens = tokens.contiguous()
    needs_grad = torch.is_grad_enabled() and (tokens.requires_grad or (out is not None and out.requires_grad))
    if out is None or needs_grad:
        y = _resample_op(tokens, sh, sw, dh, dw, mode, name)
        return y if out is None else out.copy_(y)
    _resample_out_op(tokens, sh, sw, dh, dw, mode, out, name)
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
    return ((y / 255.0 - m) / s).to(dtype, memory_format=torch.contiguous_format)


def _pad_to_square(x: torch.Tensor, colour) -> torch.Tensor:
    """[N, 3, H, W] uint8 centred on a square of the longer side filled with colour (expand2square)."""
    h, w = x.shape[-2:]
    if h == w:
        return x
    m = max(h, w)
    out = torch.tensor(colour, dtype=x.dtype, device=x.device).view(1, 3, 1, 1).repeat(x.shape[0], 1, m, m)
    out[..., (m - h) // 2:(m - h) // 2 + h, (m - w) // 2:(m - w) // 2 + w] = x
    return out


def _torch_joint_preprocess(views, batched, clip_size, dino_size, dtype, aspect="crop"):
    if batched:
        groups = [torch.stack(views).permute(0, 3, 1, 2)]
    else:
        groups = [v.permute(2, 0, 1).unsqueeze(0) for v in views]
    if aspect == "pad":  # each encoder pads with its own mean colour: no shared resize
        clip = torch.cat([_torch_resize_crop(_pad_to_square(g, pad_colour(CLIP_MEAN)), clip_size) for g in groups])
        dino = torch.cat([_torch_resize_crop(_pad_to_square(g, pad_colour(DINO_MEAN)), dino_size) for g in groups])
    else:
        clip = torch.cat([_torch_resize_crop(g, clip_size) for g in groups])
        dino = clip if dino_size == clip_size else torch.cat([_torch_resize_crop(g, dino_size) for g in groups])
    return _torch_normalise(clip, CLIP_MEAN, CLIP_STD, dtype), _torch_normalise(dino, DINO_MEAN, DINO_STD, dtype)


def joint_preprocess(images, clip_size: int = 336, dino_size: int = 336, dtype=torch.float32,
                     backend: str | None = None, aspect: str = "crop"):
    """uint8 images -> (clip_pixels, dino_pixels), each ``[B, 3, S, S]`` in ``dtype`` on the images' device.

    Per image, as CLIPImageProcessor and the DINOv2 (Bit) processor do with their PIL backends:
    resize of the shortest side to S with Pillow's antialiased BICUBIC (rounded to uint8), center
    crop S x S, rescale 1/255, each encoder's mean/std. One read of each image; when the sizes are
    equal the resize is done once. ``images``: a list of HxWx3 uint8 numpy arrays or tensors of any
    sizes (3xHxW tensors too), or a batch ``[B, H, W, 3]`` / ``[B, 3, H, W]``.
    ``aspect="pad"``: first pad each image to a square with each encoder's mean colour
    (LLaVA-1.5 / Shikra's expand2square, so that normalised boxes refer to the whole image); the
    resize is then per encoder. ``"crop"`` (the processors' default): resize and center crop only.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect: expected one of {ASPECTS}, got {aspect!r}")
    views, batched = _image_list(images)
    for name, s in (("clip_size", clip_size), ("dino_size", dino_size)):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0:
            raise ValueError(f"{name}: expected a positive int, got {s!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch dtype, got {dtype!r}")
    clip_size, dino_size = int(clip_size), int(dino_size)
    device = views[0].device
    name, reason = _choose("joint_preprocess", backend, device)
    if name == "torch":
        reason += "; torch composition (antialiased F.interpolate + crop + normalise)"
    if _eager_only(device):
        _backend.record("joint_preprocess", name, reason)
        return _torch_joint_preprocess(views, batched, clip_size, dino_size, dtype, aspect)
    _note("joint_preprocess", name, reason)
    return _joint_op(views, batched, clip_size, dino_size, dtype, aspect, name)


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
