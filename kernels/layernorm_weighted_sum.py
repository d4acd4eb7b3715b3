"""Σ_l α_l · LayerNorm(h_l; w_l, b_l) in one memory-bound pass, and its backward.

Forward: each program owns BLOCK_M full rows and loops over the L layers, so every hidden state
is read once and the output written once; statistics in fp32 (fp64 for fp64 inputs).
Backward: dh_l depends only on dy and layer l, so it is one more pass; the parameter grads come
from two per-column sums, S1_l = Σ_m dy·x̂_l and S2 = Σ_m dy:
    dw_l = α_l S1_l,  db_l = α_l S2,  dα_l = <w_l, S1_l> + <b_l, S2>.
`ln_backward_kernel` is shared with the multilevel merge (there the upstream grad is per layer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from comm_fast.kernels import _utils
from comm_fast.kernels._utils import cast_to, layer_rows


@triton.jit
def _lnws_fwd_kernel(h_ptr, tab_ptr, M2, w_ptr, b_ptr, alpha_ptr, out_ptr, M, D, L, eps,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r1 = rows // M2
    r2 = rows % M2
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for l in range(L):
        offs = layer_rows(tab_ptr, l, r1, r2, ALIGN)
        x = tl.load(h_ptr + offs[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
        a = tl.load(alpha_ptr + l).to(ACC)
        w = tl.load(w_ptr + l * D + cols, mask=cmask, other=0.0).to(ACC) * a
        b = tl.load(b_ptr + l * D + cols, mask=cmask, other=0.0).to(ACC) * a
        acc += xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], cast_to(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ln_backward_kernel(h_ptr, tab_ptr, M2, g_ptr, stride_gl, scale_ptr, mean_ptr, rstd_ptr, dh_ptr, s1_ptr,
                       M, D, L, eps,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ITERS: tl.constexpr, ALIGN: tl.constexpr,
                       ACC: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_STATS: tl.constexpr,
                       STORE_DH: tl.constexpr, PARTIALS: tl.constexpr):
    """LayerNorm backward of L layers over ITERS·BLOCK_M rows per program.

    Upstream grad of layer l: dy = g[l*stride_gl + m*D + d] (stride_gl = 0: one grad for all layers);
    grad w.r.t. x̂: dy·scale_l (HAS_SCALE) or dy. dh [L, M, D] contiguous may alias g (in place:
    each element is read before it is written, by the same program). PARTIALS: s1[pid, l] = Σ_m dy·x̂.
    The layer loop is outside the row loop so that the S1 partial stays in registers.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    for l in range(L):
        s1 = tl.zeros((BLOCK_D,), ACC)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + l * D + cols, mask=cmask, other=0.0).to(ACC)
        for i in range(ITERS):
            rows = ((pid * ITERS + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = layer_rows(tab_ptr, l, rows // M2, rows % M2, ALIGN)
            x = tl.load(h_ptr + offs[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            if HAS_STATS:
                mean = tl.load(mean_ptr + l * M + rows, mask=rmask, other=0.0).to(ACC)
                rstd = tl.load(rstd_ptr + l * M + rows, mask=rmask, other=0.0).to(ACC)
            else:
                mean = tl.sum(x, 1) / D
                xc = tl.where(mask, x - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(g_ptr + l * stride_gl + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
            if PARTIALS:
                s1 += tl.sum(dy * xhat, 0)
            if STORE_DH:
                g = dy
                if HAS_SCALE:
                    g = dy * scale[None, :]
                c1 = tl.sum(g, 1) / D
                c2 = tl.sum(g * xhat, 1) / D
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                tl.store(dh_ptr + (l * M + rows[:, None]) * D + cols[None, :], cast_to(dx, dh_ptr.dtype.element_ty),
                         mask=mask)
        if PARTIALS:
            tl.store(s1_ptr + (pid * L + l) * D + cols, s1, mask=cmask)


def row_config(D: int, M: int, backward: bool = False):
    """(BLOCK_M, BLOCK_D, ITERS, num_warps) for the row kernels: no autotuning (memory-bound)."""
    block_d = triton.next_power_of_2(D)
    if not _utils.ON_GPU:  # interpreter: few, larger programs
        block_m = max(1, min(16, 2048 // block_d))
        return block_m, block_d, 2, 4
    block_m = max(1, min(32, 4096 // block_d))
    warps = min(16, max(4, block_m * block_d // 1024))
    iters = 1
    if backward:  # ~4 programs per SM keep the S1 partials small; rows per program are a power of two
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        iters = min(32, triton.next_power_of_2(max(1, triton.cdiv(M, block_m * 4 * sms))))
    return block_m, block_d, iters, warps


def _check_device(t: torch.Tensor):
    if t.device.type == "cpu" and not _utils.INTERPRET:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before comm_fast.kernels "
                           "is imported; use backend='torch' for CPU tensors")


def lnws_forward(layers, ln_weight, ln_bias, alpha, eps: float = 1e-5, out: torch.Tensor | None = None):
    """Launch the forward. layers: L tensors [..., D] (last dim contiguous). Returns out [..., D]."""
    _check_device(layers[0])
    shape = layers[0].shape
    D = shape[-1]
    L = len(layers)
    if out is None:
        out = _utils.empty(shape, layers[0].dtype, layers[0].device)
    M = out.numel() // D if D else 0
    if M == 0 or D == 0:
        return out.zero_() if D == 0 else out
    base, table, m2, keep, align = _utils.layer_table(layers)
    block_m, block_d, _, warps = row_config(D, M)
    _lnws_fwd_kernel[(triton.cdiv(M, block_m),)](
        base, table, m2, ln_weight.contiguous(), ln_bias.contiguous(), alpha.contiguous(), out, M, D, L, eps,
        BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=align, ACC=_utils.acc_dtype(base.dtype), num_warps=warps)
    return out


def lnws_backward(grad, layers, ln_weight, ln_bias, alpha, eps: float = 1e-5, need_h: bool = True):
    """Grads (dh [L, ..., D] or None, d ln_weight, d ln_bias, d alpha) of lnws_forward."""
    _check_device(layers[0])
    shape = layers[0].shape
    D = shape[-1]
    L = len(layers)
    dtype, dev = layers[0].dtype, layers[0].device
    acc = _utils.torch_acc_dtype(dtype)
    M = layers[0].numel() // D if D else 0
    dy = grad.reshape(M, D).contiguous()
    dh = _utils.empty((L, *shape), dtype, dev) if need_h else None
    if M == 0 or D == 0:
        s1 = torch.zeros(L, D, dtype=acc, device=dev)
        if dh is not None:
            dh.zero_()
    else:
        base, table, m2, keep, align = _utils.layer_table(layers)
        block_m, block_d, iters, warps = row_config(D, M, backward=True)
        grid = triton.cdiv(M, block_m * iters)
        s1_part = _utils.empty((grid, L, D), acc, dev)
        scale = (alpha.to(acc)[:, None] * ln_weight.to(acc)).contiguous()
        ln_backward_kernel[(grid,)](
            base, table, m2, dy, 0, scale, scale, scale, dh if need_h else s1_part, s1_part, M, D, L, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, ITERS=iters, ALIGN=align, ACC=_utils.acc_dtype(dtype),
            HAS_SCALE=True, HAS_STATS=False, STORE_DH=need_h, PARTIALS=True, num_warps=warps)
        s1 = s1_part.sum(0)
    s2 = dy.sum(0, dtype=acc)
    a = alpha.to(acc)
    d_weight = (a[:, None] * s1).to(ln_weight.dtype)
    d_bias = (a[:, None] * s2[None, :]).to(ln_bias.dtype)
    d_alpha = ((ln_weight.to(acc) * s1).sum(1) + ln_bias.to(acc) @ s2).to(alpha.dtype)
    return dh, d_weight, d_bias, d_alpha


class LayerNormWeightedSum(torch.autograd.Function):
    """Autograd wrapper over the kernels: apply(ln_weight, ln_bias, alpha, eps, *layers)."""

    @staticmethod
    def forward(ctx, ln_weight, ln_bias, alpha, eps, *layers):
        ctx.save_for_backward(ln_weight, ln_bias, alpha, *layers)
        ctx.eps = eps
        return lnws_forward(list(layers), ln_weight, ln_bias, alpha, eps)

    @staticmethod
    def backward(ctx, grad):
        ln_weight, ln_bias, alpha, *layers = ctx.saved_tensors
        need_h = any(ctx.needs_input_grad[4:])
        dh, dw, db, da = lnws_backward(grad, layers, ln_weight, ln_bias, alpha, ctx.eps, need_h)
        return (dw, db, da, None, *(dh.unbind(0) if need_h else [None] * len(layers)))


# --- kernel report ---


def report_entries(shapes: dict) -> list[dict]:
    """Every kernel x config x dtype the CUDA path of this module can launch, at these shapes.

    Layout: the tower's one [L, B, T+1, D] buffer viewed without the CLS token (two row strides,
    M2 = T, 16-byte aligned rows); parameters in the hidden states' dtype. The backward runs with
    and without dh (need_h)."""
    from comm_fast import kernel_report as kr

    P = kr.ptr
    out = []
    for s in shapes["lnws"]:
        M, D, L, T = s["M"], s["D"], s["L"], s["T"]
        for dt in shapes["dtypes"]:
            es = kr.ESIZE[dt]
            align = 16 // es if D % (16 // es) == 0 else 1
            common = dict(dtype=dt, shape=s["name"])
            with kr.gpu_launch_rules():
                block_m, block_d, _, warps = row_config(D, M)
                bm_b, bd_b, iters, warps_b = row_config(D, M, backward=True)
            out.append(kr.entry(
                kernel="lnws_fwd", variant="", fn=_lnws_fwd_kernel, config=dict(BLOCK_M=block_m, BLOCK_D=block_d),
                args=dict(h_ptr=P(dt), tab_ptr=P("i64"), M2=T, w_ptr=P(dt), b_ptr=P(dt), alpha_ptr=P(dt),
                          out_ptr=P(dt), M=M, D=D, L=L, eps=1e-5),
                constexprs=dict(BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=align, ACC=tl.float32),
                num_warps=warps, num_stages=3, gemm=False,
                # one [BLOCK_M, BLOCK_D] tile of one layer in flight at a time
                model=kr.memory_model((L + 1) * M * D * es, triton.cdiv(M, block_m), block_m * block_d * es, L),
                **common))
            for need_h in (True, False):
                grid = triton.cdiv(M, bm_b * iters)
                out.append(kr.entry(
                    kernel="ln_bwd", variant="lnws" if need_h else "lnws-no-dh", fn=ln_backward_kernel,
                    config=dict(BLOCK_M=bm_b, BLOCK_D=bd_b, ITERS=iters),
                    args=dict(h_ptr=P(dt), tab_ptr=P("i64"), M2=T, g_ptr=P(dt), stride_gl=0, scale_ptr=P("fp32"),
                              mean_ptr=P("fp32"), rstd_ptr=P("fp32"), dh_ptr=P(dt if need_h else "fp32"),
                              s1_ptr=P("fp32"), M=M, D=D, L=L, eps=1e-5),
                    constexprs=dict(BLOCK_M=bm_b, BLOCK_D=bd_b, ITERS=iters, ALIGN=align, ACC=tl.float32,
                                    HAS_SCALE=True, HAS_STATS=False, STORE_DH=need_h, PARTIALS=True),
                    num_warps=warps_b, num_stages=3, gemm=False,
                    # per layer: h and dy read (dy again for every layer), dh written
                    model=kr.memory_model(((3 if need_h else 2) * L * M * D) * es + grid * L * D * 4, grid,
                                          2 * bm_b * bd_b * es, L * iters),
                    **common))
    return out
