"""Multi-level merge ops: LayerNorm + weighted sum, the one-GEMM merge, the fused MLP.

Each public op validates its inputs, picks a backend, records it (comm_fast.info()) and calls a
``torch.library`` custom op (namespace ``comm_fast``), so torch.compile(fullgraph=True) traces it
as one node. The custom ops have kernels for CPU and CUDA tensors; inside, ``backend`` selects
the Triton kernels (comm_fast.kernels; on CPU only under TRITON_INTERPRET=1) or the torch path,
which is shaped for speed (the merge accumulates its K = L·D GEMM into one output, α folded into the
normalisation) rather than a per-layer composition. Backward passes are custom ops as well.

Custom ops: comm_fast::layernorm_weighted_sum[_backward], comm_fast::multilevel_merge[_backward],
comm_fast::fused_mlp[_backward], and the in-place inference variants behind ``out=`` / ``accumulate=``
(streaming a merge as the encoder runs): comm_fast::layernorm_weighted_sum_out, comm_fast::multilevel_merge_out.
"""
from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from comm_fast import _backend
from comm_fast.activations import ACTIVATIONS, activation_backward, check_activation as _check_activation
from comm_fast.ops import merge_variants
from comm_fast.ops._custom import note as _note, ran as _ran, register as _register

OPS = ("layernorm_weighted_sum", "multilevel_merge", "fused_mlp")
_CPU_PATH = {
    "layernorm_weighted_sum": "(α folded into each LayerNorm's affine, accumulated in place)",
    "multilevel_merge": "(fused LayerNorm per layer, the K = L·D GEMM accumulated in one output)",
    "fused_mlp": "(addmm, activation, addmm; backward recomputes the activation)",
}




# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------


def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install is as good as none
        return False, f"triton does not import ({exc.__class__.__name__}: {exc})"
    return True, "triton importable"


def _triton_installed() -> tuple[bool, str]:  # cheap probe for describe(): no import
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, "triton installed"


def _triton_usable(device_type: str, probe) -> tuple[bool, str]:
    ok, why = probe()
    if not ok:
        return False, why
    if device_type == "cpu" and not _backend.triton_interpreting():
        return False, "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
    if device_type == "cuda" and _backend.triton_interpreting():
        return False, "TRITON_INTERPRET=1 is set (the interpreter runs CPU tensors only)"
    if device_type not in ("cpu", "cuda"):
        return False, f"no Triton kernels for {device_type} tensors"
    return True, why


def _resolve(op: str, backend: str | None, device_type: str, probe=_triton_importable,
             warn: bool = True) -> tuple[str, str]:
    """(backend that runs, why). Explicit arguments that cannot be honoured raise; the env var falls back."""
    req = _backend.requested(backend)
    note = ""
    if req in ("cpp", "cuda"):
        if backend is not None:
            raise ValueError(f"backend: {op} has no {req!r} backend; expected 'auto', 'triton' or 'torch'")
        note = f"COMM_FAST_BACKEND={req} has no {op} backend, so "
        req = "auto"
    if req == "triton":
        ok, why = _triton_usable(device_type, probe)
        if ok:
            return "triton", "requested"
        if backend is not None:
            raise RuntimeError(f"backend: 'triton' cannot run {op} on {device_type} tensors here: {why}; "
                               "use backend='torch' (or 'auto')")
        if warn:
            _backend.warn_once(f"{op}:triton:{device_type}",
                               f"COMM_FAST_BACKEND=triton: {why}; {op} falls back to auto")
        note = f"COMM_FAST_BACKEND=triton unusable ({why}), so "
        req = "auto"
    if req == "torch":
        return "torch", note + "requested"
    if device_type == "cuda":
        ok, why = _triton_usable("cuda", probe)
        if ok:
            return "triton", note + "auto: CUDA tensors, Triton kernels"
        return "torch", note + f"auto: CUDA tensors but {why}"
    return "torch", note + "auto: CPU tensors, torch path " + _CPU_PATH[op]


def describe() -> dict:
    """For comm_fast.info(): per op, the backend auto picks for CPU and CUDA tensors, and why."""
    result = {}
    for op in OPS:
        entry = {}
        for dev in ("cpu", "cuda"):
            try:
                name, why = _resolve(op, None, dev, probe=_triton_installed, warn=False)
            except (ValueError, RuntimeError) as exc:
                name, why = "error", str(exc)
            entry[dev] = {"backend": name, "reason": why}
        result[op] = entry
    result["multilevel_merge"]["variants"] = merge_variants.chosen()  # per shape: which forward ran, and why
    return result


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_float(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {t.dtype}")


def _hidden_states(h) -> tuple[list[Tensor], bool, int, tuple, Tensor]:
    """(op argument, stacked, L, layer shape, first layer-like tensor) after checking h."""
    if isinstance(h, Tensor):
        _check_float("h", h)
        if h.dim() < 2:
            raise ValueError(f"h: expected a stacked tensor [L, ..., D] or a list of L tensors [..., D], "
                             f"got a tensor of shape {list(h.shape)}")
        if h.shape[0] == 0:
            raise ValueError("h: expected at least one layer, got a stacked tensor with L = 0")
        arg, stacked, L, shape = [h], True, h.shape[0], tuple(h.shape[1:])
    elif isinstance(h, Sequence) and not isinstance(h, (str, bytes)):
        if len(h) == 0:
            raise ValueError("h: expected at least one layer, got an empty list")
        for i, x in enumerate(h):
            _check_float(f"h[{i}]", x)
            if x.dim() < 1:
                raise ValueError(f"h[{i}]: expected a tensor [..., D], got a 0-dim tensor")
            if x.shape != h[0].shape:
                raise ValueError(f"h[{i}]: expected shape {list(h[0].shape)} (that of h[0]), got {list(x.shape)}")
            if x.dtype != h[0].dtype:
                raise TypeError(f"h[{i}]: expected dtype {h[0].dtype} (that of h[0]), got {x.dtype}")
            if x.device != h[0].device:
                raise ValueError(f"h[{i}]: expected device {h[0].device} (that of h[0]), got {x.device}")
        arg, stacked, L, shape = list(h), False, len(h), tuple(h[0].shape)
    else:
        raise TypeError(f"h: expected a tensor [L, ..., D] or a list of tensors [..., D], got {type(h).__name__}")
    for i, x in enumerate(arg):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            name = "h" if stacked else f"h[{i}]"
            raise ValueError(f"{name}: the last dimension (D = {x.shape[-1]}) must be contiguous (stride 1), "
                             f"got stride {x.stride(-1)}; call .contiguous() first")
    return arg, stacked, L, shape, arg[0]


def _check_param(name: str, t, expected: tuple, desc: str, ref: Tensor) -> None:
    _check_float(name, t)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {desc} = {list(expected)}, got {list(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of the input), got {t.device}")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast computes GEMMs in on this device type, or None where it is off (or, as
    on meta tensors, does not exist)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(device_type: str, inputs: list[Tensor], *params: Tensor) -> tuple[list[Tensor], tuple]:
    """Under torch.autocast, the GEMM ops (multilevel_merge, fused_mlp) run in autocast's dtype, as the
    nn.Linear layers they fuse would: custom ops are not cast by autocast itself. (Casts are recorded
    by autograd, so fp32 parameters still get fp32 grads.) layernorm_weighted_sum, like LayerNorm,
    keeps its input dtype."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return inputs, params
    cast = lambda t: t if t.dtype == torch.float64 else t.to(dtype)  # noqa: E731 - autocast leaves fp64 alone
    return [cast(x) for x in inputs], tuple(cast(p) for p in params)


def _check_out(op: str, out, accumulate, shape: tuple, dtype: torch.dtype, ref: Tensor, inputs,
               rows: bool = False) -> None:
    """out= / accumulate=: a preallocated result written in place, only where no autograd graph is recorded."""
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate: expected a bool, got {type(accumulate).__name__}")
    if out is None:
        if accumulate:
            raise ValueError(f"accumulate: True adds into out=, but {op} got no out tensor")
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: expected shape {list(shape)} (the result's), got {list(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype} (the result's), got {out.dtype}")
    if out.device != ref.device:
        raise ValueError(f"out: expected a tensor on {ref.device} (the device of the input), got {out.device}")
    if shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"out: the last dimension (N = {shape[-1]}) must be contiguous (stride 1), "
                         f"got stride {out.stride(-1)}")
    if rows:
        try:
            out.view(-1, shape[-1])
        except RuntimeError:
            raise ValueError(f"out: the leading dimensions must merge into one row stride (a [M, N] view, as a "
                             f"slice of the last dimension has), got strides {list(out.stride())}") from None
    if not torch.compiler.is_compiling() and any(  # storage pointers are not traceable
            out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in inputs):
        raise ValueError("out: must not share memory with h or the parameters")
    if torch.is_grad_enabled() and (out.requires_grad or any(x.requires_grad for x in inputs)):
        raise RuntimeError(f"out: {op}(out=...) writes in place and records no autograd graph, but an input "
                           "requires grad; call it under torch.no_grad() (or without out=)")


def _check_eps(eps) -> float:
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    return float(eps)


# ---------------------------------------------------------------------------------------------
# Torch paths (CPU, or backend="torch")
# ---------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layers(h: list[Tensor], stacked: bool) -> list[Tensor]:
    return list(h[0].unbind(0)) if stacked else list(h)


def _by_row(h: list[Tensor], stacked: bool, dtype: torch.dtype) -> Tensor:
    """All layers as one [..., L, D] tensor in `dtype` (the torch path's GEMM operand layout)."""
    x = h[0].movedim(0, -2) if stacked else torch.stack(h, dim=-2)
    return x if x.dtype == dtype else x.to(dtype)


def _lnws_torch(h, stacked, ln_weight, ln_bias, alpha, eps, out=None, accumulate=False):
    layers = _layers(h, stacked)
    dt, acc = layers[0].dtype, _acc(layers[0].dtype)
    D = layers[0].shape[-1]
    gamma = (alpha[:, None] * ln_weight).to(dt)  # α folded into the affine: one fused LN per layer
    beta = (alpha[:, None] * ln_bias).to(dt)
    direct = out is not None and out.dtype == acc  # sum straight into the caller's tensor
    total = out if direct else torch.empty(layers[0].shape, dtype=acc, device=layers[0].device)
    for l, x in enumerate(layers):  # memory-bound: one LN pass per layer, accumulated in place
        y = F.layer_norm(x, (D,), gamma[l], beta[l], eps)
        if l == 0 and not (direct and accumulate):
            total.copy_(y)
        else:
            total.add_(y)
    if direct:
        return out
    if out is None:
        return total if dt == acc else total.to(dt)
    return out.add_(total) if accumulate else out.copy_(total)  # a 16-bit out: the sum stays fp32 until here


def _lnws_torch_backward(grad, h, stacked, ln_weight, ln_bias, alpha, eps, need_h):
    layers = _layers(h, stacked)
    dt, acc = layers[0].dtype, _acc(layers[0].dtype)
    shape, D, L = layers[0].shape, layers[0].shape[-1], len(layers)
    dy = grad.reshape(-1, D).to(acc)
    a, gamma = alpha.to(acc), ln_weight.to(acc)
    s1 = torch.empty(L, D, dtype=acc, device=dy.device)
    dh = torch.empty((L, *shape), dtype=dt, device=dy.device) if need_h else None
    for l, x in enumerate(layers):
        x2 = x.reshape(-1, D).to(acc)
        var, mean = torch.var_mean(x2, -1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        xhat = (x2 - mean) * rstd
        s1[l] = (dy * xhat).sum(0)
        if need_h:
            g = dy * (a[l] * gamma[l])
            dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
            dh[l] = dx.view(shape)
    s2 = dy.sum(0)
    return (dh if need_h else grad.new_empty(0), (a[:, None] * s1).to(ln_weight.dtype),
            (a[:, None] * s2).to(ln_bias.dtype), ((gamma * s1).sum(1) + ln_bias.to(acc) @ s2).to(alpha.dtype))


def _merge_torch_into(out2d, layers, ln_weight, ln_bias, weight, bias, alpha, eps, accumulate, stats=None):
    """out2d [M, N] (+)= Σ_l α_l (LN_l(x_l) W_lᵀ + b_l): the GEMM over K = L·D as L rank-D updates of
    out2d itself (addmm_, beta = 1: the GEMM reads and accumulates C, no separate add pass), each fed by
    a fused LayerNorm of one layer with α folded into its affine. The bias sum is out2d's initial value
    (skipped when accumulating with bias None). ``stats``: (mean, rstd) [L, M] buffers to fill.
    Measured on 2 CPU cores (L=24, M=576, D=1024, fp32): one addmm over a normalised [M, L·D] copy and a
    permuted [N, L·D] weight copy ran at 0.63x the eager per-layer composition; this form writes no copy
    larger than one layer's [M, D]."""
    dt, acc = layers[0].dtype, _acc(layers[0].dtype)
    M, D = out2d.shape[0], layers[0].shape[-1]
    gamma = alpha.to(acc)[:, None] * ln_weight.to(acc)
    beta = alpha.to(acc)[:, None] * ln_bias.to(acc)
    w = weight.to(dt)
    keep = 1.0  # beta of the first GEMM: 0 overwrites out2d (NaN in it included), 1 accumulates
    if bias is not None:
        b = (alpha.to(acc) @ bias.to(acc)).to(out2d.dtype)
        if accumulate:
            out2d.add_(b)
        else:
            out2d.copy_(b.expand_as(out2d))
    elif not accumulate:
        keep = 0.0
    for l, x in enumerate(layers):
        a, m, r = torch.native_layer_norm(x.to(acc), (D,), gamma[l], beta[l], eps)
        if stats is not None:
            stats[0][l], stats[1][l] = m.reshape(M), r.reshape(M)
        out2d.addmm_(a.to(dt).reshape(M, D), w[l].t(), beta=keep if l == 0 else 1.0)
    return out2d


def _merge_torch(h, stacked, ln_weight, ln_bias, weight, bias, alpha, eps):
    layers = _layers(h, stacked)
    L, N, _ = weight.shape
    lead = layers[0].shape[:-1]
    M = lead.numel()
    mean = torch.empty(L, M, dtype=_acc(layers[0].dtype), device=layers[0].device)
    rstd = torch.empty_like(mean)
    out = layers[0].new_empty((M, N))
    _merge_torch_into(out, layers, ln_weight, ln_bias, weight, bias, alpha, eps, False, (mean, rstd))
    return out.view(*lead, N), mean, rstd


def _merge_torch_backward(grad, h, stacked, mean, rstd, ln_weight, ln_bias, weight, bias, alpha, need_h):
    dt = h[0].dtype
    acc, L, N, D = _acc(dt), *weight.shape
    x = _by_row(h, stacked, acc)
    lead = x.shape[:-2]
    M = lead.numel()
    dy = grad.reshape(M, N).to(acc)
    a, gamma, beta, w = alpha.to(acc), ln_weight.to(acc), ln_bias.to(acc), weight.to(acc)
    xhat = (x.reshape(M, L, D) - mean.t()[:, :, None]) * rstd.t()[:, :, None]
    s = dy.sum(0)
    g_t = (dy.t() @ xhat.reshape(M, L * D)).view(N, L, D).transpose(0, 1)  # G̃_l = dYᵀ x̂_l, [L, N, D]
    d_weight = ((g_t * gamma[:, None, :] + s[None, :, None] * beta[:, None, :]) * a[:, None, None])
    p = (w * g_t).sum(1)
    q = torch.einsum("n,lnd->ld", s, w)
    dh = grad.new_empty(0)
    if need_h:
        g = (dy @ w.permute(1, 0, 2).reshape(N, L * D)).view(M, L, D) * (a[:, None] * gamma)
        dx = rstd.t()[:, :, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        dh = dx.movedim(1, 0).to(dt).reshape(L, *lead, D)
    return (dh, (a[:, None] * p).to(ln_weight.dtype), (a[:, None] * q).to(ln_bias.dtype),
            d_weight.to(weight.dtype).contiguous(), (a[:, None] * s).to(bias.dtype),
            ((gamma * p).sum(1) + (beta * q).sum(1) + bias.to(acc) @ s).to(alpha.dtype))


def _mlp_torch(x, w1, b1, w2, b2, activation, save_pre):
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    pre = torch.addmm(b1.to(dt), x2, w1.to(dt).t())
    out = torch.addmm(b2.to(dt), ACTIVATIONS[activation](pre), w2.to(dt).t())
    return out.view(*x.shape[:-1], w2.shape[0]), (pre if save_pre else x.new_empty(0))


def _mlp_torch_backward(grad, x, pre, w1, w2, activation, need_x):
    dt, acc = x.dtype, _acc(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    dy = grad.reshape(-1, w2.shape[0]).to(dt)
    dpre = activation_backward(activation, dy @ w2.to(dt), pre)
    act = ACTIVATIONS[activation](pre)  # recomputed from the saved pre-activation
    dx = (dpre @ w1.to(dt)).view(x.shape) if need_x else x.new_empty(0)
    return (dx, (dpre.t() @ x2).to(w1.dtype), dpre.sum(0, dtype=acc), (dy.t() @ act).to(w2.dtype), dy.sum(0, dtype=acc))


# ---------------------------------------------------------------------------------------------
# Custom ops: one implementation per op, registered for CPU and CUDA tensors; `backend` picks
# the Triton kernels or the torch path. The Triton modules are imported on first use only.
# ---------------------------------------------------------------------------------------------


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _lnws_triton(h, stacked, ln_weight, ln_bias, alpha, eps, out=None):
    from comm_fast.kernels.layernorm_weighted_sum import lnws_forward
    with _on_device(h[0]):
        return lnws_forward(_layers(h, stacked), ln_weight, ln_bias, alpha, eps, out=out)


def _lnws_impl(h: list[Tensor], stacked: bool, ln_weight: Tensor, ln_bias: Tensor, alpha: Tensor, eps: float,
               backend: str) -> Tensor:
    _ran("layernorm_weighted_sum", backend)
    if backend == "triton":
        return _lnws_triton(h, stacked, ln_weight, ln_bias, alpha, eps)
    return _lnws_torch(h, stacked, ln_weight, ln_bias, alpha, eps)


def _lnws_fake(h, stacked, ln_weight, ln_bias, alpha, eps, backend):
    return h[0].new_empty(h[0].shape[1:] if stacked else h[0].shape)


def _lnws_bwd_impl(grad: Tensor, h: list[Tensor], stacked: bool, ln_weight: Tensor, ln_bias: Tensor, alpha: Tensor,
                   eps: float, need_h: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        from comm_fast.kernels.layernorm_weighted_sum import lnws_backward
        with _on_device(grad):
            dh, dw, db, da = lnws_backward(grad, _layers(h, stacked), ln_weight, ln_bias, alpha, eps, need_h)
        return (dh if need_h else grad.new_empty(0)), dw, db, da
    return _lnws_torch_backward(grad, h, stacked, ln_weight, ln_bias, alpha, eps, need_h)


def _lnws_bwd_fake(grad, h, stacked, ln_weight, ln_bias, alpha, eps, need_h, backend):
    L = h[0].shape[0] if stacked else len(h)
    shape = h[0].shape[1:] if stacked else h[0].shape
    dh = h[0].new_empty((L, *shape)) if need_h else grad.new_empty(0)
    return dh, torch.empty_like(ln_weight), torch.empty_like(ln_bias), torch.empty_like(alpha)


_lnws_op = _register("layernorm_weighted_sum", _lnws_impl, _lnws_fake)
_lnws_bwd_op = _register("layernorm_weighted_sum_backward", _lnws_bwd_impl, _lnws_bwd_fake)


def _h_grads(dh: Tensor, h, stacked: bool, need_h: bool):
    if not need_h:
        return [None] * len(h)  # the structure must mirror the Tensor[] input
    return [dh.view(h[0].shape)] if stacked else list(dh.unbind(0))


def _lnws_setup(ctx, inputs, output):
    h, stacked, ln_weight, ln_bias, alpha, eps, backend = inputs
    ctx.save_for_backward(ln_weight, ln_bias, alpha, *h)
    ctx.stacked, ctx.eps, ctx.backend = stacked, eps, backend
    ctx.need_h = any(x.requires_grad for x in h)


def _lnws_autograd(ctx, grad):
    ln_weight, ln_bias, alpha, *h = ctx.saved_tensors
    dh, dw, db, da = _lnws_bwd_op(grad, h, ctx.stacked, ln_weight, ln_bias, alpha, ctx.eps, ctx.need_h, ctx.backend)
    return _h_grads(dh, h, ctx.stacked, ctx.need_h), None, dw, db, da, None, None


_lnws_op.register_autograd(_lnws_autograd, setup_context=_lnws_setup)


def _merge_variant(layers, ln_weight, ln_bias, weight, bias, alpha, eps) -> tuple[str, str]:
    """The forward variant for this call (comm_fast.ops.merge_variants): measured once per device,
    versions, dtype, shape and layout on CUDA."""
    import triton

    from comm_fast.kernels import multilevel_merge as kernels

    ok, why = kernels.folded_eligible(layers)
    runners = {v: (lambda v=v: kernels.merge_forward(layers, ln_weight, ln_bias, weight, bias, alpha, eps, v))
               for v in merge_variants.VARIANTS if v != "folded" or ok}
    skipped = {} if ok else {"folded": why}
    x = layers[0]
    M, D, N = x.numel() // max(x.shape[-1], 1), x.shape[-1], weight.shape[1]
    device = torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"
    layout = "uniform" if kernels.uniform_layout(layers) is not None else "table"
    key = (f"{device}|torch {torch.__version__}|triton {triton.__version__}|{str(x.dtype).split('.')[-1]}"
           f"|L={len(layers)} M={M} N={N} D={D}|{layout}")
    return merge_variants.choose(key, runners, skipped, x.device, measure=x.is_cuda)


def _merge_triton(h, stacked, ln_weight, ln_bias, weight, bias, alpha, eps, out=None, accumulate=False):
    from comm_fast.kernels.multilevel_merge import merge_forward

    layers = _layers(h, stacked)
    with _on_device(h[0]):
        variant, why = _merge_variant(layers, ln_weight, ln_bias, weight, bias, alpha, eps)
        _ran("multilevel_merge", "triton", f"variant {variant}: {why}")
        return merge_forward(layers, ln_weight, ln_bias, weight, bias, alpha, eps, variant, out, accumulate)


def _merge_impl(h: list[Tensor], stacked: bool, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                alpha: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _merge_triton(h, stacked, ln_weight, ln_bias, weight, bias, alpha, eps)
    _ran("multilevel_merge", backend)
    return _merge_torch(h, stacked, ln_weight, ln_bias, weight, bias, alpha, eps)


def _merge_fake(h, stacked, ln_weight, ln_bias, weight, bias, alpha, eps, backend):
    shape = h[0].shape[1:] if stacked else h[0].shape
    L, N, D = weight.shape
    M = shape[:-1].numel()
    acc = _acc(h[0].dtype)
    return (h[0].new_empty((*shape[:-1], N)), h[0].new_empty((L, M), dtype=acc), h[0].new_empty((L, M), dtype=acc))


def _merge_bwd_impl(grad: Tensor, h: list[Tensor], stacked: bool, mean: Tensor, rstd: Tensor, ln_weight: Tensor,
                    ln_bias: Tensor, weight: Tensor, bias: Tensor, alpha: Tensor, need_h: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        from comm_fast.kernels.multilevel_merge import merge_backward
        with _on_device(grad):
            dh, *rest = merge_backward(grad, _layers(h, stacked), mean, rstd, ln_weight, ln_bias, weight, bias,
                                       alpha, need_h=need_h)
        return (dh if need_h else grad.new_empty(0), *rest)
    return _merge_torch_backward(grad, h, stacked, mean, rstd, ln_weight, ln_bias, weight, bias, alpha, need_h)


def _merge_bwd_fake(grad, h, stacked, mean, rstd, ln_weight, ln_bias, weight, bias, alpha, need_h, backend):
    L = weight.shape[0]
    shape = h[0].shape[1:] if stacked else h[0].shape
    dh = h[0].new_empty((L, *shape)) if need_h else grad.new_empty(0)
    return (dh, *(torch.empty_like(t) for t in (ln_weight, ln_bias, weight, bias, alpha)))


_merge_op = _register("multilevel_merge", _merge_impl, _merge_fake)
_merge_bwd_op = _register("multilevel_merge_backward", _merge_bwd_impl, _merge_bwd_fake)


def _merge_setup(ctx, inputs, output):
    h, stacked, ln_weight, ln_bias, weight, bias, alpha, eps, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(mean, rstd, ln_weight, ln_bias, weight, bias, alpha, *h)  # inputs + stats only
    ctx.stacked, ctx.backend = stacked, backend
    ctx.need_h = any(x.requires_grad for x in h)


def _merge_autograd(ctx, grad, _grad_mean, _grad_rstd):
    mean, rstd, ln_weight, ln_bias, weight, bias, alpha, *h = ctx.saved_tensors
    dh, dlw, dlb, dw, db, da = _merge_bwd_op(grad, h, ctx.stacked, mean, rstd, ln_weight, ln_bias, weight, bias,
                                             alpha, ctx.need_h, ctx.backend)
    return _h_grads(dh, h, ctx.stacked, ctx.need_h), None, dlw, dlb, dw, db, da, None, None


_merge_op.register_autograd(_merge_autograd, setup_context=_merge_setup)


# out= / accumulate variants: inference only (no autograd), they write the caller's tensor in place.
def _lnws_out_impl(h: list[Tensor], stacked: bool, ln_weight: Tensor, ln_bias: Tensor, alpha: Tensor, eps: float,
                   backend: str, out: Tensor, accumulate: bool) -> None:
    _ran("layernorm_weighted_sum", backend)
    if backend == "triton" and not accumulate and out.is_contiguous():
        _lnws_triton(h, stacked, ln_weight, ln_bias, alpha, eps, out)
    elif backend == "triton":  # the kernel writes contiguous rows and does not add: one more pass here
        result = _lnws_triton(h, stacked, ln_weight, ln_bias, alpha, eps)
        out.add_(result) if accumulate else out.copy_(result)
    else:
        _lnws_torch(h, stacked, ln_weight, ln_bias, alpha, eps, out, accumulate)


def _merge_out_impl(h: list[Tensor], stacked: bool, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor,
                    bias: Tensor | None, alpha: Tensor, eps: float, backend: str, out: Tensor,
                    accumulate: bool) -> None:
    if backend == "triton":  # the GEMM adds into out itself: the folded epilogue's C load, or addmm_ (beta = 1)
        _merge_triton(h, stacked, ln_weight, ln_bias, weight, bias, alpha, eps, out, accumulate)
        return
    _ran("multilevel_merge", backend)
    _merge_torch_into(out.view(-1, out.shape[-1]), _layers(h, stacked), ln_weight, ln_bias, weight, bias, alpha,
                      eps, accumulate)


def _no_result(*args) -> None:
    return None


_lnws_out_op = _register("layernorm_weighted_sum_out", _lnws_out_impl, _no_result, mutates_args=("out",))
_merge_out_op = _register("multilevel_merge_out", _merge_out_impl, _no_result, mutates_args=("out",))


def _mlp_impl(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str, save_pre: bool,
              backend: str) -> tuple[Tensor, Tensor]:
    _ran("fused_mlp", backend)
    if backend == "triton":
        from comm_fast.kernels.fused_mlp import mlp_forward
        with _on_device(x):
            out, pre = mlp_forward(x, w1, b1, w2, b2, activation, save_pre)
        return out, (pre if save_pre else x.new_empty(0))
    return _mlp_torch(x, w1, b1, w2, b2, activation, save_pre)


def _mlp_fake(x, w1, b1, w2, b2, activation, save_pre, backend):
    M = x.shape[:-1].numel()
    return x.new_empty((*x.shape[:-1], w2.shape[0])), (x.new_empty((M, w1.shape[0])) if save_pre else x.new_empty(0))


def _mlp_bwd_impl(grad: Tensor, x: Tensor, pre: Tensor, w1: Tensor, w2: Tensor, activation: str, need_x: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        from comm_fast.kernels.fused_mlp import mlp_backward
        with _on_device(grad):
            dx, *rest = mlp_backward(grad, x, pre, w1, w2, activation, need_x)
        return (dx if need_x else x.new_empty(0), *rest)
    return _mlp_torch_backward(grad, x, pre, w1, w2, activation, need_x)


def _mlp_bwd_fake(grad, x, pre, w1, w2, activation, need_x, backend):
    acc = _acc(x.dtype)
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(w1),
            w1.new_empty(w1.shape[0], dtype=acc), torch.empty_like(w2), w2.new_empty(w2.shape[0], dtype=acc))


_mlp_op = _register("fused_mlp", _mlp_impl, _mlp_fake)
_mlp_bwd_op = _register("fused_mlp_backward", _mlp_bwd_impl, _mlp_bwd_fake)


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, save_pre, backend = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, pre, w1, w2)  # the pre-activation, never the activated hidden tensor
    ctx.activation, ctx.backend, ctx.need_x = activation, backend, x.requires_grad
    ctx.bias_dtypes = (b1.dtype, b2.dtype)


def _mlp_autograd(ctx, grad, _grad_pre):
    x, pre, w1, w2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _mlp_bwd_op(grad, x, pre, w1, w2, ctx.activation, ctx.need_x, ctx.backend)
    return ((dx if ctx.need_x else None), dw1, db1.to(ctx.bias_dtypes[0]), dw2, db2.to(ctx.bias_dtypes[1]),
            None, None, None)


_mlp_op.register_autograd(_mlp_autograd, setup_context=_mlp_setup)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------


def layernorm_weighted_sum(h, ln_weight, ln_bias, alpha, eps: float = 1e-5, backend: str | None = None, *,
                           out: Tensor | None = None, accumulate: bool = False):
    """Σ_l alpha_l · LayerNorm(h_l; ln_weight_l, ln_bias_l).

    h: stacked [L, ..., D] (any strides but the last, e.g. h[:, :, 1:] to drop CLS) or a list of L
    tensors [..., D] (not stacked: the kernels read them in place). ln_weight, ln_bias: [L, D];
    alpha: [L] (raw weights: apply a softmax before the call if wanted). Returns [..., D] in h's dtype.

    out: a preallocated [..., D] result in h's dtype (last dimension contiguous), written and returned;
    accumulate=True adds the sum into it. Both record no autograd graph (an input that requires grad
    under grad mode is an error). (The Triton kernel writes a contiguous out itself; a strided out or an
    accumulation costs one more pass.)
    """
    arg, stacked, L, shape, ref = _hidden_states(h)
    D = shape[-1]
    _check_param("ln_weight", ln_weight, (L, D), "[L, D]", ref)
    _check_param("ln_bias", ln_bias, (L, D), "[L, D]", ref)
    _check_param("alpha", alpha, (L,), "[L]", ref)
    eps = _check_eps(eps)
    _check_out("layernorm_weighted_sum", out, accumulate, shape, ref.dtype, ref, (*arg, ln_weight, ln_bias, alpha))
    name, why = _resolve("layernorm_weighted_sum", backend, ref.device.type)
    if out is not None:
        _note("layernorm_weighted_sum", name, why)
        _lnws_out_op(arg, stacked, ln_weight, ln_bias, alpha, eps, name, out, accumulate)
        return out
    _note("layernorm_weighted_sum", name, why)
    return _lnws_op(arg, stacked, ln_weight, ln_bias, alpha, eps, name)


def multilevel_merge(h, ln_weight, ln_bias, weight, bias, alpha, eps: float = 1e-5, backend: str | None = None, *,
                     out: Tensor | None = None, accumulate: bool = False):
    """Σ_l alpha_l · (LayerNorm(h_l; ln_weight_l, ln_bias_l) · weight_lᵀ + bias_l).

    h as for layernorm_weighted_sum; weight: [L, D_out, D]; bias: [L, D_out], or None for no bias term.
    Returns [..., D_out] (in autocast's dtype under torch.autocast).

    out: a preallocated [..., D_out] result in the result's dtype (last dimension contiguous, the leading
    ones one row stride), written and returned; accumulate=True adds the merge into it, the GEMM
    accumulating into out itself (C += A·Wᵀ). Torch path: no separate add pass over out when bias is
    None (a bias costs one broadcast add: to stream a merge layer by layer, start out at the bias sum and
    pass bias=None). Triton path: the bias rides in the GEMM either way (folded: the epilogue, which also
    loads C; materialised: a ones column of Â). Both record no autograd graph (an input that requires
    grad under grad mode is an error).
    """
    arg, stacked, L, shape, ref = _hidden_states(h)
    D = shape[-1]
    _check_param("ln_weight", ln_weight, (L, D), "[L, D]", ref)
    _check_param("ln_bias", ln_bias, (L, D), "[L, D]", ref)
    _check_float("weight", weight)
    if weight.dim() != 3:
        raise ValueError(f"weight: expected shape [L, D_out, D] = [{L}, D_out, {D}], got {list(weight.shape)}")
    N = weight.shape[1]
    _check_param("weight", weight, (L, N, D), "[L, D_out, D]", ref)
    if bias is not None:
        _check_param("bias", bias, (L, N), "[L, D_out]", ref)
    _check_param("alpha", alpha, (L,), "[L]", ref)
    eps = _check_eps(eps)
    params = (ln_weight, ln_bias, weight, alpha) + (() if bias is None else (bias,))
    result = ref.dtype if ref.dtype == torch.float64 else autocast_dtype(ref.device.type) or ref.dtype
    _check_out("multilevel_merge", out, accumulate, (*shape[:-1], N), result, ref, (*arg, *params), rows=True)
    name, why = _resolve("multilevel_merge", backend, ref.device.type)
    _note("multilevel_merge", name, why)
    arg, (ln_weight, ln_bias, weight, alpha) = _autocast(ref.device.type, arg, ln_weight, ln_bias, weight, alpha)
    if bias is not None:
        bias = _autocast(ref.device.type, [], bias)[1][0]
    if out is not None:
        _merge_out_op(arg, stacked, ln_weight, ln_bias, weight, bias, alpha, eps, name, out, accumulate)
        return out
    if bias is None:
        bias = weight.new_zeros(L, N)
    return _merge_op(arg, stacked, ln_weight, ln_bias, weight, bias, alpha, eps, name)[0]


def fused_mlp(x, w1, b1, w2, b2, activation: str = "gelu", backend: str | None = None):
    """Linear(w1, b1) → activation → Linear(w2, b2); x [..., D1], w1 [H, D1], w2 [D2, H] → [..., D2]."""
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor [..., D], got a 0-dim tensor")
    _check_activation(activation)
    _check_float("w1", w1)
    if w1.dim() != 2:
        raise ValueError(f"w1: expected shape [H, D1] = [H, {x.shape[-1]}], got {list(w1.shape)}")
    H = w1.shape[0]
    _check_param("w1", w1, (H, x.shape[-1]), "[H, D1]", x)
    _check_param("b1", b1, (H,), "[H]", x)
    _check_float("w2", w2)
    if w2.dim() != 2:
        raise ValueError(f"w2: expected shape [D2, H] = [D2, {H}], got {list(w2.shape)}")
    _check_param("w2", w2, (w2.shape[0], H), "[D2, H]", x)
    _check_param("b2", b2, (w2.shape[0],), "[D2]", x)
    name, why = _resolve("fused_mlp", backend, x.device.type)
    _note("fused_mlp", name, why)
    (x,), (w1, b1, w2, b2) = _autocast(x.device.type, [x], w1, b1, w2, b2)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2))
    return _mlp_op(x, w1, b1, w2, b2, activation, save_pre, name)[0]
