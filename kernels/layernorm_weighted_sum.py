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
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
                     EVEN_D: tl.constexpr):
    """Rows of program_id(0). Software prefetch across layers: layer l+1's tile is loaded before layer
    l's is reduced (one tile per program always in flight), and layer l+2's row offsets are read from the
    table one step earlier still, so that load issues at the top of the step. EVEN_D: D == BLOCK_D."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r1 = rows // M2
    r2 = rows % M2
    inv_d = tl.full((), 1.0, ACC) / D
    x_next = tl.load(h_ptr + layer_rows(tab_ptr, 0, r1, r2, ALIGN)[:, None] + cols[None, :], mask=mask, other=0.0)
    offs_next = layer_rows(tab_ptr, tl.minimum(1, L - 1), r1, r2, ALIGN)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    bias = tl.zeros((BLOCK_D,), ACC)  # Σ_l α_l b_l: one value per column, added once at the end
    for l in range(L):
        x = x_next.to(ACC)
        mask_next = mask & (rows < M - (l + 1 >= L) * M)[:, None]  # past the last layer: no traffic
        if EVEN_D:  # masked-off elements are never used: no zero fill
            x_next = tl.load(h_ptr + offs_next[:, None] + cols[None, :], mask=mask_next)
        else:
            x_next = tl.load(h_ptr + offs_next[:, None] + cols[None, :], mask=mask_next, other=0.0)
        offs_next = layer_rows(tab_ptr, tl.minimum(l + 2, L - 1), r1, r2, ALIGN)
        mean = tl.sum(x, 1) * inv_d
        xc = x - mean[:, None]
        if not EVEN_D:
            xc = tl.where(mask, xc, 0.0)
        a = tl.load(alpha_ptr + l).to(ACC)
        scale = tl.rsqrt(tl.sum(xc * xc, 1) * inv_d + eps) * a
        w = tl.load(w_ptr + l * D + cols, mask=cmask, other=0.0).to(ACC)
        bias += tl.load(b_ptr + l * D + cols, mask=cmask, other=0.0).to(ACC) * a
        acc += (xc * scale[:, None]) * w[None, :]
    acc += bias[None, :]
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
    Grid (row groups, P): program (i, j) takes layers j, j + P, ... (P = L: one layer each, P = 1: all).
    The layer loop is outside the row loop so that the S1 partial stays in registers.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    for l in range(tl.program_id(1), L, tl.num_programs(1)):
        l64 = tl.cast(l, tl.int64)  # l·M·D and l·stride_gl pass 2**31 at L·M·D >= 2**31 (CLIP, batch >= 152)
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
                mean = tl.load(mean_ptr + l64 * M + rows, mask=rmask, other=0.0).to(ACC)
                rstd = tl.load(rstd_ptr + l64 * M + rows, mask=rmask, other=0.0).to(ACC)
            else:
                mean = tl.sum(x, 1) / D
                xc = tl.where(mask, x - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(g_ptr + l64 * stride_gl + rows[:, None] * D + cols[None, :], mask=mask,
                         other=0.0).to(ACC)
            if PARTIALS:
                s1 += tl.sum(dy * xhat, 0)
            if STORE_DH:
                g = dy
                if HAS_SCALE:
                    g = dy * scale[None, :]
                c1 = tl.sum(g, 1) / D
                c2 = tl.sum(g * xhat, 1) / D
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                tl.store(dh_ptr + (l64 * M + rows[:, None]) * D + cols[None, :],
                         cast_to(dx, dh_ptr.dtype.element_ty), mask=mask)
        if PARTIALS:
            tl.store(s1_ptr + (pid * L + l) * D + cols, s1, mask=cmask)


DEFAULT_SMS = 132  # H100 / H200 SXM: the SM count assumed where no GPU can be asked (the kernel report)


def sm_count() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return DEFAULT_SMS


def row_config(D: int, M: int, backward: bool = False, partials: bool = False, layers: int = 1,
               gpu: bool | None = None, sms: int | None = None, esize: int = 2):
    """(BLOCK_M, BLOCK_D, ITERS, num_warps) for the row kernels: no autotuning (memory-bound).

    Forward: 64 elements per thread for 16-bit inputs (esize 2), 32 for fp32: the fewest instructions
    per byte that compile without spills (sm_90: 4x1024 bf16 rows on 2 warps).
    Backward: a grid (cdiv(M, BLOCK_M·ITERS), layers); without S1 partials one row block of one layer
    per program (ITERS = 1); with them (partials=True) ITERS row blocks per program, the largest power
    of two that leaves >= 32 programs per SM, to keep the partial sums small.
    gpu: the CUDA config (default: whether the kernels run on a GPU); sms: its SM count (default: the
    device's, DEFAULT_SMS without one).
    """
    block_d = triton.next_power_of_2(D)
    if not (_utils.ON_GPU if gpu is None else gpu):  # interpreter: few, larger programs
        block_m = max(1, min(16, 2048 // block_d))
        return block_m, block_d, 2, 4
    if not backward:
        per_thread = 64 if esize <= 2 else 32
        block_m = max(1, min(32, 2 * 32 * per_thread // block_d))
        return block_m, block_d, 1, max(1, min(16, block_m * block_d // (32 * per_thread)))
    block_m = max(1, min(32, 4096 // block_d))
    warps = min(16, max(8, block_m * block_d // 512))  # 16 elements per thread (4 warps spill in fp32)
    iters = 1
    if partials:
        groups = triton.cdiv(32 * (sms or sm_count()), layers)
        iters = min(64, 1 << (max(1, M // (block_m * groups)).bit_length() - 1))
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
    block_m, block_d, _, warps = row_config(D, M, esize=base.element_size())
    _lnws_fwd_kernel[(triton.cdiv(M, block_m),)](
        base, table, m2, ln_weight.contiguous(), ln_bias.contiguous(), alpha.contiguous(), out, M, D, L, eps,
        BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=align, ACC=_utils.acc_dtype(base.dtype), EVEN_D=D == block_d,
        num_warps=warps)
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
        block_m, block_d, iters, warps = row_config(D, M, backward=True, partials=True, layers=L)
        grid = triton.cdiv(M, block_m * iters)
        s1_part = _utils.empty((grid, L, D), acc, dev)
        scale = (alpha.to(acc)[:, None] * ln_weight.to(acc)).contiguous()
        ln_backward_kernel[(grid, L)](
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

_TL_NAMES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# Little's law for the model: bytes in flight = bandwidth x latency. Copy bandwidth measured on the H200;
# loaded HBM latency assumed 1 us (unloaded ~0.6 us on Hopper; queueing near peak adds to it).
COPY_BYTES_PER_S = 4.3e12
LOADED_LATENCY_S = 1e-6


def report_entries(shapes: dict) -> list[dict]:
    """Every kernel x config x dtype the CUDA path of this module can launch, at these shapes: the forward
    and the LN-sum backward (ln_backward_kernel with partials, with and without dh)."""
    needed = round(COPY_BYTES_PER_S * LOADED_LATENCY_S / DEFAULT_SMS)  # per SM, to reach copy bandwidth
    entries = []
    for shp in shapes["lnws"]:
        M, D, L = shp["M"], shp["D"], shp["L"]
        for dt in shapes["dtypes"]:
            ptr, es = _TL_NAMES[dt], _ESIZE[dt]
            ints = dict(M2=M, M=M, D=D, L=L)  # M2 = M: the layers of one [L, B, T, D] buffer
            divisible = [n for n, v in ints.items() if v % 16 == 0]
            bm, bd, _, warps = row_config(D, M, gpu=True, sms=DEFAULT_SMS, esize=es)
            base = dict(dtype=dt, shape=shp["name"], launchable=True, gemm=False, num_stages=1)
            entries.append(dict(
                base, name=f"lnws_fwd/{dt}/{shp['name']}/{bm}x{bd}w{warps}", kernel="lnws_fwd", variant="",
                config=f"BLOCK_M={bm} BLOCK_D={bd} warps={warps}", fn=_lnws_fwd_kernel,
                signature=dict(h_ptr=ptr, tab_ptr="*i64", M2="i32", w_ptr=ptr, b_ptr=ptr, alpha_ptr=ptr, out_ptr=ptr,
                               M="i32", D="i32", L="i32", eps="fp32", BLOCK_M="constexpr", BLOCK_D="constexpr",
                               ALIGN="constexpr", ACC="constexpr", EVEN_D="constexpr"),
                constexprs=dict(BLOCK_M=bm, BLOCK_D=bd, ALIGN=16 // es, ACC=tl.float32, EVEN_D=D == bd),
                divisible=["h_ptr", "tab_ptr", "w_ptr", "b_ptr", "alpha_ptr", "out_ptr"] + divisible,
                num_warps=warps,
                model=dict(kind="memory", bytes=(L + 1) * M * D * es, ctas=triton.cdiv(M, bm),
                           bytes_in_flight_per_cta=bm * D * es, bytes_in_flight_per_sm_needed=needed)))
            # the LN-sum backward (one grad for all layers, stride_gl = 0) and the merge backward's use
            # (per-layer grads u_l = dY W_l, saved stats; without dh one layer per launch)
            for variant, has_stats, store_dh, layers in (("lnws", False, True, L), ("lnws/params-only", False, False, L),
                                                         ("merge", True, True, L), ("merge/params-only", True, False, 1)):
                bm, bd, iters, warps = row_config(D, M, backward=True, partials=True, layers=layers, gpu=True,
                                                  sms=DEFAULT_SMS)
                groups = triton.cdiv(M, bm * iters)
                lints = dict(ints, L=layers)
                entries.append(dict(
                    base, name=f"ln_backward/{variant}/{dt}/{shp['name']}/{bm}x{bd}i{iters}w{warps}",
                    kernel="ln_backward", variant=variant,
                    config=f"BLOCK_M={bm} BLOCK_D={bd} ITERS={iters} warps={warps} grid={groups}x{layers}",
                    fn=ln_backward_kernel,
                    signature=dict(h_ptr=ptr, tab_ptr="*i64", M2="i32", g_ptr=ptr, stride_gl="i32",
                                   scale_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
                                   dh_ptr=ptr if store_dh else "*fp32", s1_ptr="*fp32", M="i32", D="i32", L="i32",
                                   eps="fp32", **{n: "constexpr" for n in (
                                       "BLOCK_M", "BLOCK_D", "ITERS", "ALIGN", "ACC", "HAS_SCALE", "HAS_STATS",
                                       "STORE_DH", "PARTIALS")}),
                    constexprs=dict(BLOCK_M=bm, BLOCK_D=bd, ITERS=iters, ALIGN=16 // es, ACC=tl.float32,
                                    HAS_SCALE=True, HAS_STATS=has_stats, STORE_DH=store_dh, PARTIALS=True),
                    # stride_gl: 0 (LN-sum) or M·D (merge), 16-divisible either way
                    divisible=["h_ptr", "tab_ptr", "g_ptr", "stride_gl", "scale_ptr", "mean_ptr", "rstd_ptr",
                               "dh_ptr", "s1_ptr"] + [n for n, v in lints.items() if v % 16 == 0],
                    num_warps=warps,
                    model=dict(kind="memory", bytes=(2 + store_dh) * layers * M * D * es + 2 * groups * layers * D * 4,
                               ctas=groups * layers, bytes_in_flight_per_cta=2 * bm * D * es,
                               bytes_in_flight_per_sm_needed=needed)))
    return entries
