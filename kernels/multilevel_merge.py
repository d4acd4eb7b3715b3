"""Σ_l α_l (LN_l(h_l) W_lᵀ + b_l) as one GEMM with K = L·D, and its backward.

Forward: a cheap stats pass writes per-row, per-layer mean/rstd [L, M]; the GEMM then walks
K = L·D in one flat loop and normalises its A tile as it is loaded,
    A[m, (l, d)] = α_l · ((h_l[m, d] - mean_l[m]) · rstd_l[m] · γ_l[d] + β_l[d]),
so no normalised copy of the hidden states is ever written. Bias: Σ_l α_l b_l in the epilogue.

Backward (saves only the inputs and the stats), with s = Σ_m dY and G̃_l = dYᵀ x̂_l:
    dW_l = α_l (G̃_l ⊙ γ_l + s ⊗ β_l)          (one GEMM over M, B operand normalised on load)
    P_l = Σ_n W_l ⊙ G̃_l,  Q_l = sᵀ W_l        (in that GEMM's epilogue)
    dγ_l = α_l P_l,  dβ_l = α_l Q_l,  db_l = α_l s,  dα_l = <γ_l, P_l> + <β_l, Q_l> + <b_l, s>
    dh_l = LN-backward of g_l = α_l (dY W_l) ⊙ γ_l   (one GEMM writing g into dh, then in place)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from comm_fast.kernels import _utils
from comm_fast.kernels._utils import cast_to, layer_rows
from comm_fast.kernels.layernorm_weighted_sum import _check_device, ln_backward_kernel, row_config

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_CPU_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4)


@triton.jit
def _stats_kernel(h_ptr, tab_ptr, M2, mean_ptr, rstd_ptr, M, D, eps,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """mean/rstd [L, M] of layer program_id(1), rows of program_id(0)."""
    l = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = layer_rows(tab_ptr, l, rows // M2, rows % M2, ALIGN)
    x = tl.load(h_ptr + offs[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, 1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
    tl.store(mean_ptr + l * M + rows, mean, mask=rmask)
    tl.store(rstd_ptr + l * M + rows, rstd, mask=rmask)


@triton.jit
def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of program pid, GROUP_M row tiles at a time (B tiles stay in L2)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _merge_fwd_kernel(h_ptr, tab_ptr, M2, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, alpha_ptr, w_ptr, bsum_ptr,
                      out_ptr, M, N, D, L, stride_wl, stride_wn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      ALIGN: tl.constexpr, ACC: tl.constexpr, DOT_ACC: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    r1 = rm // M2
    r2 = rm % M2
    kt = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for it in range(L * kt):  # one flat loop over K = L·D keeps the software pipeline full
        l = it // kt
        rk = (it - l * kt) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = rk < D
        offs = layer_rows(tab_ptr, l, r1, r2, ALIGN)
        x = tl.load(h_ptr + offs[:, None] + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0).to(ACC)
        mean = tl.load(mean_ptr + l * M + rm, mask=mmask, other=0.0)
        rstd = tl.load(rstd_ptr + l * M + rm, mask=mmask, other=0.0)
        a_l = tl.load(alpha_ptr + l).to(ACC)
        # masked k: gamma = beta = 0, so the padded A columns are exactly 0
        gamma = tl.load(lnw_ptr + l * D + rk, mask=kmask, other=0.0).to(ACC) * a_l
        beta = tl.load(lnb_ptr + l * D + rk, mask=kmask, other=0.0).to(ACC) * a_l
        a = (x - mean[:, None]) * (rstd[:, None] * gamma[None, :]) + beta[None, :]
        w = tl.load(w_ptr + l * stride_wl + rn[None, :] * stride_wn + rk[:, None],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_ACC:
            acc = tl.dot(a, w.to(ACC), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a.to(h_ptr.dtype.element_ty), w.to(h_ptr.dtype.element_ty), acc)
    acc += tl.load(bsum_ptr + rn, mask=nmask, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], cast_to(acc, out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _merge_dw_kernel(dy_ptr, h_ptr, tab_ptr, M2, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, alpha_ptr, w_ptr, s_ptr,
                     dw_ptr, p_ptr, q_ptr, M, N, D, L, stride_wl, stride_wn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     ALIGN: tl.constexpr, ACC: tl.constexpr, DOT_ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Tile [BLOCK_N, BLOCK_K] of G̃ = dYᵀ x̂ (K = L·D columns, reduction over M) and its epilogue.

    BLOCK_M here is the reduction tile; partials p/q are [num_n_tiles, L, D].
    """
    kt = tl.cdiv(D, BLOCK_K)
    pid_n, pid_k = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), L * kt, GROUP_M)
    l = pid_k // kt
    rk = (pid_k - l * kt) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = rk < D
    nmask = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    for m0 in range(0, M, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = rm < M
        offs = layer_rows(tab_ptr, l, rm // M2, rm % M2, ALIGN)
        x = tl.load(h_ptr + offs[:, None] + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0).to(ACC)
        mean = tl.load(mean_ptr + l * M + rm, mask=mmask, other=0.0)
        rstd = tl.load(rstd_ptr + l * M + rm, mask=mmask, other=0.0)  # 0 on padded rows: x̂ = 0 there
        xhat = (x - mean[:, None]) * rstd[:, None]
        dyt = tl.load(dy_ptr + rm[None, :] * N + rn[:, None], mask=nmask[:, None] & mmask[None, :], other=0.0)
        if DOT_ACC:
            acc = tl.dot(dyt.to(ACC), xhat, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dyt, xhat.to(dy_ptr.dtype.element_ty), acc)
    a_l = tl.load(alpha_ptr + l).to(ACC)
    gamma = tl.load(lnw_ptr + l * D + rk, mask=kmask, other=0.0).to(ACC)
    beta = tl.load(lnb_ptr + l * D + rk, mask=kmask, other=0.0).to(ACC)
    s = tl.load(s_ptr + rn, mask=nmask, other=0.0).to(ACC)
    mask = nmask[:, None] & kmask[None, :]
    w = tl.load(w_ptr + l * stride_wl + rn[:, None] * stride_wn + rk[None, :], mask=mask, other=0.0).to(ACC)
    dw = a_l * (acc * gamma[None, :] + s[:, None] * beta[None, :])
    tl.store(dw_ptr + (l * N + rn[:, None]) * D + rk[None, :], cast_to(dw, dw_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + (pid_n * L + l) * D + rk, tl.sum(w * acc, 0), mask=kmask)
    tl.store(q_ptr + (pid_n * L + l) * D + rk, tl.sum(w * s[:, None], 0), mask=kmask)


@triton.jit
def _merge_dg_kernel(dy_ptr, w_ptr, lnw_ptr, alpha_ptr, g_ptr, M, N, D, L, stride_wl, stride_wn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     ACC: tl.constexpr, DOT_ACC: tl.constexpr, PRECISION: tl.constexpr):
    """g [L, M, D] = α_l (dY W_l) ⊙ γ_l: tile [BLOCK_M, BLOCK_K] of layer l, reduction over N (BLOCK_N)."""
    kt = tl.cdiv(D, BLOCK_K)
    pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), L * kt, GROUP_M)
    l = pid_k // kt
    rk = (pid_k - l * kt) * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    kmask = rk < D
    mmask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        dy = tl.load(dy_ptr + rm[:, None] * N + rn[None, :], mask=mmask[:, None] & nmask[None, :], other=0.0)
        w = tl.load(w_ptr + l * stride_wl + rn[:, None] * stride_wn + rk[None, :],
                    mask=nmask[:, None] & kmask[None, :], other=0.0)
        if DOT_ACC:
            acc = tl.dot(dy.to(ACC), w.to(ACC), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc)
    scale = tl.load(lnw_ptr + l * D + rk, mask=kmask, other=0.0).to(ACC) * tl.load(alpha_ptr + l).to(ACC)
    g = acc * scale[None, :]
    tl.store(g_ptr + (l * M + rm[:, None]) * D + rk[None, :], cast_to(g, g_ptr.dtype.element_ty),
             mask=mmask[:, None] & kmask[None, :])


_merge_fwd = _utils.autotune(_GEMM_CONFIGS, _CPU_CONFIG, key=["M", "N", "D", "L"])(_merge_fwd_kernel)
# dW: BLOCK_N is fixed (not tuned) because it sizes the P/Q partial buffers
_DW_BLOCK_N = 128 if _utils.ON_GPU else 32
_DW_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_merge_dw = _utils.autotune(_DW_CONFIGS, triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4),
                            key=["M", "N", "D", "L"])(_merge_dw_kernel)
_merge_dg = _utils.autotune(_GEMM_CONFIGS, _CPU_CONFIG, key=["M", "N", "D", "L"])(_merge_dg_kernel)


def _dot_args(dtype):
    return dict(ACC=_utils.acc_dtype(dtype), DOT_ACC=_utils.dot_fp32(dtype), PRECISION=_utils.dot_precision(dtype))


def _layer_stats(base, table, m2, align, M, D, L, eps):
    dtype = _utils.torch_acc_dtype(base.dtype)
    mean = _utils.empty((L, M), dtype, base.device)
    rstd = _utils.empty((L, M), dtype, base.device)
    block_m, block_d, _, warps = row_config(D, M)
    _stats_kernel[(triton.cdiv(M, block_m), L)](base, table, m2, mean, rstd, M, D, eps, BLOCK_M=block_m,
                                                BLOCK_D=block_d, ALIGN=align, ACC=_utils.acc_dtype(base.dtype),
                                                num_warps=warps)
    return mean, rstd


def merge_forward(layers, ln_weight, ln_bias, weight, bias, alpha, eps: float = 1e-5,
                  out: torch.Tensor | None = None):
    """Launch the forward. layers: L tensors [..., D]; weight [L, N, D]. Returns (out [..., N], mean, rstd)."""
    _check_device(layers[0])
    shape = layers[0].shape
    D, L, N = shape[-1], len(layers), weight.shape[1]
    dtype, dev = layers[0].dtype, layers[0].device
    M = layers[0].numel() // D if D else 0
    if out is None:
        out = _utils.empty((*shape[:-1], N), dtype, dev)
    acc = _utils.torch_acc_dtype(dtype)
    bsum = alpha.to(acc) @ bias.to(acc)  # Σ_l α_l b_l, [N]
    if M == 0 or N == 0:
        return out, torch.zeros(L, M, dtype=acc, device=dev), torch.zeros(L, M, dtype=acc, device=dev)
    if D == 0:
        out.copy_(bsum.expand_as(out))
        return out, torch.zeros(L, M, dtype=acc, device=dev), torch.zeros(L, M, dtype=acc, device=dev)
    base, table, m2, keep, align = _utils.layer_table(layers)
    mean, rstd = _layer_stats(base, table, m2, align, M, D, L, eps)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()  # strided [L, N, D] (even expanded) is fine
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _merge_fwd[grid](base, table, m2, mean, rstd, ln_weight.contiguous(), ln_bias.contiguous(), alpha.contiguous(),
                     w, bsum, out, M, N, D, L, w.stride(0), w.stride(1), ALIGN=align, **_dot_args(dtype))
    return out, mean, rstd


def merge_backward(grad, layers, mean, rstd, ln_weight, ln_bias, weight, bias, alpha, need_h: bool = True):
    """Grads (dh [L, ..., D] or None, d ln_weight, d ln_bias, d weight, d bias, d alpha)."""
    _check_device(layers[0])
    shape = layers[0].shape
    D, L, N = shape[-1], len(layers), weight.shape[1]
    dtype, dev = layers[0].dtype, layers[0].device
    acc = _utils.torch_acc_dtype(dtype)
    M = layers[0].numel() // D if D else 0
    dy = grad.reshape(M, N).contiguous()
    s = dy.sum(0, dtype=acc)
    a = alpha.to(acc)
    d_bias = (a[:, None] * s[None, :]).to(bias.dtype)
    dh = _utils.empty((L, *shape), dtype, dev) if need_h else None
    if M == 0 or N == 0 or D == 0:
        p = torch.zeros(L, D, dtype=acc, device=dev)
        q = torch.einsum("n,lnd->ld", s, weight.to(acc))
        d_weight = torch.zeros_like(weight)
        if dh is not None:
            dh.zero_()
    else:
        base, table, m2, keep, align = _utils.layer_table(layers)
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        lnw, lnb, alpha_c = ln_weight.contiguous(), ln_bias.contiguous(), alpha.contiguous()
        d_weight = _utils.empty((L, N, D), weight.dtype, dev)
        n_tiles = triton.cdiv(N, _DW_BLOCK_N)
        p_part = _utils.empty((n_tiles, L, D), acc, dev)
        q_part = _utils.empty((n_tiles, L, D), acc, dev)
        grid = lambda meta: (n_tiles * L * triton.cdiv(D, meta["BLOCK_K"]),)
        _merge_dw[grid](dy, base, table, m2, mean, rstd, lnw, lnb, alpha_c, w, s, d_weight, p_part, q_part,
                        M, N, D, L, w.stride(0), w.stride(1), BLOCK_N=_DW_BLOCK_N, ALIGN=align, **_dot_args(dtype))
        p, q = p_part.sum(0), q_part.sum(0)
        if need_h:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * L * triton.cdiv(D, meta["BLOCK_K"]),)
            _merge_dg[grid](dy, w, lnw, alpha_c, dh, M, N, D, L, w.stride(0), w.stride(1), **_dot_args(dtype))
            block_m, block_d, iters, warps = row_config(D, M, backward=True)
            ln_backward_kernel[(triton.cdiv(M, block_m * iters),)](
                base, table, m2, dh, M * D, dh, mean, rstd, dh, dh, M, D, L, 0.0,
                BLOCK_M=block_m, BLOCK_D=block_d, ITERS=iters, ALIGN=align, ACC=_utils.acc_dtype(dtype),
                HAS_SCALE=False, HAS_STATS=True, STORE_DH=True, PARTIALS=False, num_warps=warps)
    d_ln_weight = (a[:, None] * p).to(ln_weight.dtype)
    d_ln_bias = (a[:, None] * q).to(ln_bias.dtype)
    d_alpha = ((ln_weight.to(acc) * p).sum(1) + (ln_bias.to(acc) * q).sum(1) + bias.to(acc) @ s).to(alpha.dtype)
    return dh, d_ln_weight, d_ln_bias, d_weight, d_bias, d_alpha


# --- kernel report ---


def _report_dot_args(dtype: str, precision):
    """The ACC / DOT_ACC / PRECISION constexprs _dot_args gives a CUDA launch in this dtype."""
    return dict(ACC=tl.float32, DOT_ACC=dtype == "fp32", PRECISION=precision or "ieee")


def report_entries(shapes: dict) -> list[dict]:
    """Every kernel x config x dtype the CUDA path of this module can launch, at these shapes.

    Layout: the tower's one [L, B, T+1, D] buffer viewed without the CLS token, so the layer table
    has two row strides (M2 = T) and every row offset is a multiple of 16 bytes; parameters in the
    hidden states' dtype (autocast casts them so). Forward = stats + GEMM; backward = dW, dg, LN backward.
    """
    from comm_fast import kernel_report as kr

    P = kr.ptr
    tune = shapes.get("tune_configs")
    out = []
    for s in shapes["merge"]:
        M, N, D, L, T = s["M"], s["N"], s["D"], s["L"], s["T"]
        for dt in shapes["dtypes"]:
            es = kr.ESIZE[dt]
            align = 16 // es if D % (16 // es) == 0 else 1
            stats = 2 * L * M * 4
            common = dict(dtype=dt, shape=s["name"])
            with kr.gpu_launch_rules():
                block_m, block_d, _, warps = row_config(D, M)
                bm_b, bd_b, iters, warps_b = row_config(D, M, backward=True)
            cx = dict(BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=align, ACC=tl.float32)
            out.append(kr.entry(
                kernel="merge_stats", variant="", fn=_stats_kernel, config=dict(BLOCK_M=block_m, BLOCK_D=block_d),
                args=dict(h_ptr=P(dt), tab_ptr=P("i64"), M2=T, mean_ptr=P("fp32"), rstd_ptr=P("fp32"), M=M, D=D,
                          eps=1e-5),
                constexprs=cx, num_warps=warps, num_stages=3, gemm=False,
                model=kr.memory_model(L * M * D * es + stats, triton.cdiv(M, block_m) * L, block_m * block_d * es),
                **common))
            cx = dict(BLOCK_M=bm_b, BLOCK_D=bd_b, ITERS=iters, ALIGN=align, ACC=tl.float32, HAS_SCALE=False,
                      HAS_STATS=True, STORE_DH=True, PARTIALS=False)
            out.append(kr.entry(
                kernel="ln_bwd", variant="merge", fn=ln_backward_kernel,
                config=dict(BLOCK_M=bm_b, BLOCK_D=bd_b, ITERS=iters),
                args=dict(h_ptr=P(dt), tab_ptr=P("i64"), M2=T, g_ptr=P(dt), stride_gl=M * D, scale_ptr=P(dt),
                          mean_ptr=P("fp32"), rstd_ptr=P("fp32"), dh_ptr=P(dt), s1_ptr=P(dt), M=M, D=D, L=L, eps=0.0),
                constexprs=cx, num_warps=warps_b, num_stages=3, gemm=False,
                model=kr.memory_model(3 * L * M * D * es + stats, triton.cdiv(M, bm_b * iters), 2 * bm_b * bd_b * es,
                                      L * iters),
                **common))
            for prec in kr.dot_precisions(dt):
                dot = _report_dot_args(dt, prec)
                for cfg in kr.tuned(_GEMM_CONFIGS, tune):
                    k = cfg.kwargs
                    out.append(kr.entry(
                        kernel="merge_fwd", variant="on-load", fn=_merge_fwd_kernel, config=k, precision=prec,
                        args=dict(h_ptr=P(dt), tab_ptr=P("i64"), M2=T, mean_ptr=P("fp32"), rstd_ptr=P("fp32"),
                                  lnw_ptr=P(dt), lnb_ptr=P(dt), alpha_ptr=P(dt), w_ptr=P(dt), bsum_ptr=P("fp32"),
                                  out_ptr=P(dt), M=M, N=N, D=D, L=L, stride_wl=N * D, stride_wn=D),
                        constexprs=dict(k, ALIGN=align, **dot), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        gemm=True, model=kr.gemm_model(M, N, L * D, k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"],
                                                       (M * L * D + L * N * D + M * N) * es + stats),
                        **common))
                    out.append(kr.entry(
                        kernel="merge_dg", variant="", fn=_merge_dg_kernel, config=k, precision=prec,
                        args=dict(dy_ptr=P(dt), w_ptr=P(dt), lnw_ptr=P(dt), alpha_ptr=P(dt), g_ptr=P(dt), M=M, N=N,
                                  D=D, L=L, stride_wl=N * D, stride_wn=D),
                        constexprs=dict(k, **dot), num_warps=cfg.num_warps, num_stages=cfg.num_stages, gemm=True,
                        # g [L, M, D]: output M x (L·D) in BLOCK_M x BLOCK_K tiles, reduction over N in BLOCK_N
                        model=kr.gemm_model(M, L * D, N, k["BLOCK_M"], k["BLOCK_K"], k["BLOCK_N"],
                                            (M * N + L * N * D + L * M * D) * es),
                        **common))
                for cfg in kr.tuned(_DW_CONFIGS, tune):
                    k = dict(cfg.kwargs, BLOCK_N=128)  # _DW_BLOCK_N on a GPU
                    out.append(kr.entry(
                        kernel="merge_dw", variant="", fn=_merge_dw_kernel, config=k, precision=prec,
                        args=dict(dy_ptr=P(dt), h_ptr=P(dt), tab_ptr=P("i64"), M2=T, mean_ptr=P("fp32"),
                                  rstd_ptr=P("fp32"), lnw_ptr=P(dt), lnb_ptr=P(dt), alpha_ptr=P(dt), w_ptr=P(dt),
                                  s_ptr=P("fp32"), dw_ptr=P(dt), p_ptr=P("fp32"), q_ptr=P("fp32"), M=M, N=N, D=D, L=L,
                                  stride_wl=N * D, stride_wn=D),
                        constexprs=dict(k, ALIGN=align, **dot), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        gemm=True,
                        # G̃ = dYᵀ x̂: output N x (L·D) in BLOCK_N x BLOCK_K tiles, reduction over M in BLOCK_M
                        model=kr.gemm_model(N, L * D, M, k["BLOCK_N"], k["BLOCK_K"], k["BLOCK_M"],
                                            (M * N + M * L * D + 2 * L * N * D) * es + stats),
                        **common))
    return out
