"""Σ_l α_l (LN_l(h_l) W_lᵀ + b_l) as one GEMM with K = L·D, in two forward variants, and its backward.

folded: LayerNorm folded into the weights. With W′_l = α_l W_l diag(γ_l) (in h's dtype, cached),
    c_l = W′_l·1 (summed from the same rounded W′, so that the mean term cancels exactly) and
    b′ = Σ_l α_l (W_l β_l + b_l):
        out = Σ_l rstd_l ⊙ (x_l W′_lᵀ) − (rstd_l·mean_l) ⊗ c_l + b′.
    A stats pass writes mean/rstd [L, M]; the GEMM streams the raw hidden states into shared memory
    (nothing is computed on A in the main loop), accumulates each layer's K-slab on its own and
    promotes it into the output accumulator with its per-row scale at the layer's last K step.
    The layer offset is l·stride_l (uniform layouts: the stacked [L, ...] buffer and its views), so no
    layer table is read in the main loop. 16-bit and fp64 inputs only: in fp32 the sum Σ_d x_d W′_d of
    raw inputs of large mean (|mean|/std ~ 100, as ViT outlier channels give) cancels by ~100x after
    accumulation, leaving ~4x torch's own fp32 error (TF32 would be far worse); 16-bit inputs stay far
    below their own rounding.
materialised: one bandwidth-bound pass writes Â = [α_l LN_l(h_l)]_l [M, L·D] in h's dtype, plus a
    ones column, and one cuBLAS GEMM (torch.mm) against the stacked weight [N, L·D] whose extra column
    is Σ_l α_l b_l (so the bias, and an accumulation into C, ride in the GEMM). Any layout, any dtype;
    costs M·L·D elements of scratch. fp32 GEMMs follow torch's TF32 switch, as torch.matmul does: Â is
    normalised, so TF32 loses no more there than in torch's own Linear.
(The first design, A normalised as it is loaded, kept its A tile single-buffered with a full wait per
K step and read the layer table in the main loop; it is gone: no measurement ever showed it ahead and
materialised covers every layout it covered.)

Backward (saves the inputs and the stats), with s = Σ_m dY and u_l = dY W_l:
    dW_l = dYᵀ Â_l                    (Â_l re-materialised one layer at a time, cuBLAS)
    dh_l = LN-backward of α_l γ_l ⊙ u_l, P_l = Σ_m u_l ⊙ x̂_l   (ln_backward_kernel, u by cuBLAS)
    dγ_l = α_l P_l,  dβ_l = α_l Q_l (Q_l = sᵀ W_l),  db_l = α_l s,  dα_l = <γ_l, P_l> + <β_l, Q_l> + <b_l, s>
Every index x stride product that can pass 2**31 is computed in int64.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from comm_fast.kernels import _utils
from comm_fast.kernels._utils import cast_to, layer_rows
from comm_fast.kernels.layernorm_weighted_sum import _check_device, ln_backward_kernel, row_config
from comm_fast.ops.merge_variants import VARIANTS

# 16-bit folded GEMM. Shared memory per stage: (BM + BN) * BK * 2 bytes; every config fits 227 KB.
_FOLDED_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
]  # 128x256x64 (8 warps) spills 176 bytes: two 128x256 fp32 accumulators exceed 255 registers
_CPU_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4)
# fp64 only under the interpreter (gradcheck): on a GPU it would be an FMA loop, not a tensor-core GEMM
_FOLDED_DTYPES = (torch.bfloat16, torch.float16) + ((torch.float64,) if _utils.INTERPRET else ())
# fused_mlp's GEMM configs and dot arguments (it shares _grouped and _CPU_CONFIG too)
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


def _dot_args(dtype):
    return dict(ACC=_utils.acc_dtype(dtype), DOT_ACC=_utils.dot_fp32(dtype), PRECISION=_utils.dot_precision(dtype))


@triton.jit
def _normalise_kernel(h_ptr, tab_ptr, M2, lnw_ptr, lnb_ptr, alpha_ptr, mean_ptr, rstd_ptr, a_ptr, stride_am,
                      M, D, L0, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
                      ACC: tl.constexpr, LOAD_STATS: tl.constexpr, WRITE_A: tl.constexpr):
    """Layer l = L0 + program_id(1), rows of program_id(0): mean/rstd [L, M] (stored, or loaded if
    LOAD_STATS) and, if WRITE_A, Â[m, (l - L0)·D + d] = α_l LN_l(h_l)[m, d] (row stride stride_am)."""
    j = tl.program_id(1)
    l = L0 + j
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = layer_rows(tab_ptr, l, rows // M2, rows % M2, ALIGN)
    x = tl.load(h_ptr + offs[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    srow = l.to(tl.int64) * M + rows
    if LOAD_STATS:
        mean = tl.load(mean_ptr + srow, mask=rmask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + srow, mask=rmask, other=0.0).to(ACC)
    else:
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
        tl.store(mean_ptr + srow, mean, mask=rmask)
        tl.store(rstd_ptr + srow, rstd, mask=rmask)
    if WRITE_A:
        a_l = tl.load(alpha_ptr + l).to(ACC)
        gamma = tl.load(lnw_ptr + l * D + cols, mask=cmask, other=0.0).to(ACC) * a_l
        beta = tl.load(lnb_ptr + l * D + cols, mask=cmask, other=0.0).to(ACC) * a_l
        y = (x - mean[:, None]) * (rstd[:, None] * gamma[None, :]) + beta[None, :]
        tl.store(a_ptr + rows[:, None] * stride_am + (j * D + cols)[None, :], cast_to(y, a_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of program pid, GROUP_M row tiles at a time (B tiles stay in L2)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _folded_kernel(x_ptr, stride_l, M2, stride_r1, stride_r2, mean_ptr, rstd_ptr, w_ptr, c_ptr, b_ptr,
                   out_ptr, stride_om, M, N, D, L,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   ACCUMULATE: tl.constexpr, ACC: tl.constexpr, DOT_ACC: tl.constexpr):
    """out[m, n] (+)= Σ_l rstd_l[m] (x_l W′_lᵀ)[m, n] − rstd_l[m] mean_l[m] c_l[n] + b′[n].

    Row m of layer l: x_ptr + l·stride_l + (m // M2)·stride_r1 + (m % M2)·stride_r2; W′ [L, N, D] contiguous.
    """
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    x_rows = x_ptr + (rm // M2) * stride_r1 + (rm % M2) * stride_r2
    kt = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    slab = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for it in range(L * kt):  # one flat loop over K = L·D keeps the software pipeline full across layers
        l = it // kt
        k = (it - l * kt) * BLOCK_K + rk
        kmask = k < D
        x = tl.load(x_rows[:, None] + l.to(tl.int64) * stride_l + k[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + (l * N + rn).to(tl.int64)[None, :] * D + k[:, None],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_ACC:  # fp64, or the interpreter (it multiplies raw 16-bit bit patterns)
            slab = tl.dot(x.to(ACC), w.to(ACC), slab)
        else:
            slab = tl.dot(x, w, slab)
        if it - l * kt == kt - 1:  # the layer's last K-slab: promote it with its per-row scale
            srow = l.to(tl.int64) * M + rm
            rstd = tl.load(rstd_ptr + srow, mask=mmask, other=0.0)
            shift = rstd * tl.load(mean_ptr + srow, mask=mmask, other=0.0)
            c = tl.load(c_ptr + l * N + rn, mask=nmask, other=0.0)
            acc += rstd[:, None] * slab - shift[:, None] * c[None, :]
            slab = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    acc += tl.load(b_ptr + rn, mask=nmask, other=0.0)[None, :]
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if ACCUMULATE:  # C += result in the epilogue: no separate add pass
        acc += tl.load(o_ptrs, mask=omask, other=0.0).to(ACC)
    tl.store(o_ptrs, cast_to(acc, out_ptr.dtype.element_ty), mask=omask)


_folded = _utils.autotune(_FOLDED_CONFIGS, _CPU_CONFIG, key=["M", "N", "D", "L", "ACCUMULATE"])(_folded_kernel)


# --------------------------------------------------------------------------------- derived weights
_DERIVED: dict = {}


def _derived(kind: str, tensors: tuple, dtype: torch.dtype, build):
    """build() cached per (kind, dtype) and each parameter's identity (a view counts as its base
    tensor at its offset, shape and strides: the tower's per-layer slices hit), storage (``p.data = t``,
    as ``Module.to`` does, keeps the identity and the version) and ._version (shared by a view and its
    base): recomputed when a parameter is replaced, re-pointed or modified in place (an optimizer step).
    Writes through ``p.data`` bump no version and are not seen: update under ``torch.no_grad()``.
    Inference tensors, which track no version, are never cached."""
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:
        return build()
    bases = tuple(t if t._base is None else t._base for t in tensors)
    key = (kind, dtype) + tuple((id(b), t.untyped_storage().data_ptr(), t.device, t.storage_offset(),
                                 tuple(t.shape), t.stride(), t.dtype) for b, t in zip(bases, tensors))
    hit = _DERIVED.get(key)
    if hit is not None and hit[1] == versions and all(r() is b for r, b in zip(hit[0], bases)):
        return hit[2]
    value = build()
    if len(_DERIVED) >= 64:  # bounded: autocast casts and other temporaries bring new identities
        _DERIVED.pop(next(iter(_DERIVED)))
    _DERIVED[key] = (tuple(weakref.ref(b) for b in bases), versions, value)
    return value


def folded_weights(ln_weight, ln_bias, weight, bias, alpha, dtype):
    """(W′ [L, N, D] in ``dtype``, c [L, N], b′ [N]) with W′_l = α_l W_l diag(γ_l), c_l = W′_l·1 of the
    rounded W′, b′ = Σ_l α_l (W_l β_l + b_l) (bias None: no b_l); c and b′ in the accumulation dtype."""
    def build():
        acc = _utils.torch_acc_dtype(dtype)
        a, w = alpha.to(acc), weight.to(acc)
        wf = (w * (a[:, None] * ln_weight.to(acc))[:, None, :]).to(dtype).contiguous()
        c = wf.to(acc).sum(-1)
        wb = torch.einsum("lnd,ld->ln", w, ln_bias.to(acc))
        return wf, c, a @ (wb if bias is None else wb + bias.to(acc))
    return _derived("folded", _present(ln_weight, ln_bias, weight, bias, alpha), dtype, build)


def stacked_weight(weight, bias, alpha, dtype):
    """[N, Kp] in ``dtype``: column l·D + d is W_l[:, d], column L·D is Σ_l α_l b_l (0 for bias None),
    the rest (up to a multiple of 8 for 16-byte rows) zero."""
    def build():
        L, N, D = weight.shape
        acc = _utils.torch_acc_dtype(dtype)
        ws = torch.zeros(N, _padded_k(L, D), dtype=dtype, device=weight.device)
        ws[:, :L * D].view(N, L, D).copy_(weight.transpose(0, 1))
        if bias is not None:
            ws[:, L * D] = (alpha.to(acc) @ bias.to(acc)).to(dtype)
        return ws
    return _derived("stacked", _present(weight, bias, alpha), dtype, build)


def _present(*tensors):
    return tuple(t for t in tensors if t is not None)


def _padded_k(L: int, D: int) -> int:
    return (L * D + 1 + 7) // 8 * 8


# --------------------------------------------------------------------------------------- launchers
def uniform_layout(layers):
    """(base, stride_l, M2, stride_r1, stride_r2) when row m of layer l is at base + l·stride_l +
    (m // M2)·stride_r1 + (m % M2)·stride_r2 (the stacked buffer and its views), else None."""
    base, rows, m2, _, _ = _utils.layer_layout(layers)
    step = rows[1][0] if len(rows) > 1 else 0
    if any(r != (l * step, rows[0][1], rows[0][2]) for l, r in enumerate(rows)):
        return None
    return base, step, m2, rows[0][1], rows[0][2]


def folded_eligible(layers) -> tuple[bool, str]:
    dtype = layers[0].dtype
    if dtype not in _FOLDED_DTYPES:
        return False, (f"folded takes 16-bit inputs, not {dtype}" + (" (large-mean cancellation: see the module doc)"
                                                                     if dtype == torch.float32 else ""))
    if uniform_layout(layers) is None:
        return False, "folded needs layers at a uniform stride (one buffer [L, ...]); these are not"
    return True, "eligible"


def _stats(layers, M, D, L, eps, dtype, dev):
    acc = _utils.torch_acc_dtype(dtype)
    return _utils.empty((L, M), acc, dev), _utils.empty((L, M), acc, dev)


def _normalise(layers, ln_weight, ln_bias, alpha, mean, rstd, eps, a=None, l0=0, nl=None, load_stats=False):
    """Launch _normalise_kernel on layers l0 .. l0 + nl (all by default); a: Â [M, ≥ nl·D] or None."""
    base, table, m2, keep, align = _utils.layer_table(layers)
    D = layers[0].shape[-1]
    M = mean.shape[1]
    nl = len(layers) - l0 if nl is None else nl
    block_m, block_d, _, warps = row_config(D, M)
    _normalise_kernel[(triton.cdiv(M, block_m), nl)](
        base, table, m2, ln_weight, ln_bias, alpha, mean, rstd, mean if a is None else a,
        0 if a is None else a.stride(0), M, D, l0, eps, BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=align,
        ACC=_utils.acc_dtype(base.dtype), LOAD_STATS=load_stats, WRITE_A=a is not None, num_warps=warps)


def merge_forward(layers, ln_weight, ln_bias, weight, bias, alpha, eps: float = 1e-5, variant: str = "folded",
                  out: torch.Tensor | None = None, accumulate: bool = False):
    """Launch one forward variant. layers: L tensors [..., D]; weight [L, N, D]; bias [L, N] or None.
    out (+)= the merge (accumulate: out += it). Returns (out [..., N], mean [L, M], rstd [L, M])."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    _check_device(layers[0])
    shape = layers[0].shape
    D, L, N = shape[-1], len(layers), weight.shape[1]
    dtype, dev = layers[0].dtype, layers[0].device
    M = layers[0].numel() // D if D else 0
    if out is None:
        out = _utils.empty((*shape[:-1], N), dtype, dev)
    mean, rstd = _stats(layers, M, D, L, eps, dtype, dev)
    if M == 0 or N == 0:
        return out, mean, rstd
    o2 = out.view(M, N)  # one row stride (the op checks that out's leading dims allow it)
    if D == 0:
        bsum = (alpha.to(mean.dtype) @ bias.to(mean.dtype) if bias is not None else mean.new_zeros(N)).to(dtype)
        o2.add_(bsum) if accumulate else o2.copy_(bsum.expand(M, N))
        return out, mean.zero_(), rstd.zero_()
    lnw, lnb, a = ln_weight.contiguous(), ln_bias.contiguous(), alpha.contiguous()
    if variant == "materialised":
        a_hat = _utils.empty((M, _padded_k(L, D)), dtype, dev)
        a_hat[:, L * D:] = 0
        a_hat[:, L * D] = 1  # times the bias column of the stacked weight
        _normalise(layers, lnw, lnb, a, mean, rstd, eps, a=a_hat)
        ws = stacked_weight(weight, bias, alpha, dtype)
        if accumulate:
            o2.addmm_(a_hat, ws.t())  # C += Â Wᵀ (beta = 1): the GEMM accumulates
        else:
            torch.mm(a_hat, ws.t(), out=o2)
        return out, mean, rstd
    ok, why = folded_eligible(layers)
    if not ok:
        raise ValueError(f"variant: {why}")
    _normalise(layers, lnw, lnb, a, mean, rstd, eps)  # stats only
    base, stride_l, m2, s1, s2 = uniform_layout(layers)
    wf, c, b = folded_weights(ln_weight, ln_bias, weight, bias, alpha, dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _folded[grid](base, stride_l, m2, s1, s2, mean, rstd, wf, c, b, o2, o2.stride(0), M, N, D, L,
                  ACCUMULATE=accumulate, ACC=_utils.acc_dtype(dtype), DOT_ACC=_utils.dot_fp32(dtype))
    return out, mean, rstd


def merge_backward(grad, layers, mean, rstd, ln_weight, ln_bias, weight, bias, alpha, need_h: bool = True):
    """Grads (dh [L, ..., D] or None, d ln_weight, d ln_bias, d weight, d bias, d alpha)."""
    _check_device(layers[0])
    shape = layers[0].shape
    D, L, N = shape[-1], len(layers), weight.shape[1]
    dtype, dev = layers[0].dtype, layers[0].device
    acc = _utils.torch_acc_dtype(dtype)
    M = layers[0].numel() // D if D else 0
    dy = grad.reshape(M, N).to(dtype).contiguous()
    s = dy.sum(0, dtype=acc)
    a = alpha.to(acc)
    w = weight.to(dtype)
    q = torch.einsum("n,lnd->ld", s, weight.to(acc))
    dh = _utils.empty((L, *shape), dtype, dev) if need_h else None
    d_weight = _utils.empty((L, N, D), dtype, dev)
    if M == 0 or N == 0 or D == 0:
        p = torch.zeros(L, D, dtype=acc, device=dev)
        d_weight.zero_()
        if dh is not None:
            dh.zero_()
    else:
        lnw, lnb, alpha_c = ln_weight.contiguous(), ln_bias.contiguous(), alpha.contiguous()
        a_l = _utils.empty((M, D), dtype, dev)  # one layer of Â at a time: M·D scratch, not M·L·D
        for l in range(L):
            _normalise(layers, lnw, lnb, alpha_c, mean, rstd, 0.0, a=a_l, l0=l, nl=1, load_stats=True)
            torch.mm(dy.t(), a_l, out=d_weight[l])
        base, table, m2, keep, align = _utils.layer_table(layers)
        scale = (a[:, None] * ln_weight.to(acc)).contiguous()
        chunk = L if need_h else 1  # without dh, u_l = dY W_l lives one layer at a time
        block_m, block_d, iters, warps = row_config(D, M, backward=True, partials=True, layers=chunk,
                                                    esize=dtype.itemsize)
        grid = triton.cdiv(M, block_m * iters)
        u = dh.view(L, M, D) if need_h else _utils.empty((1, M, D), dtype, dev)
        p = torch.empty(L, D, dtype=acc, device=dev)
        for l0 in range(0, L, chunk):
            for j in range(chunk):
                torch.mm(dy, w[l0 + j], out=u[j])
            s1 = _utils.empty((grid, chunk, D), acc, dev)
            ln_backward_kernel[(grid, chunk)](
                base, table[l0:], m2, u, M * D, scale[l0:], mean[l0:], rstd[l0:], u, s1, M, D, chunk, 0.0,
                BLOCK_M=block_m, BLOCK_D=block_d, ITERS=iters, ALIGN=align, ACC=_utils.acc_dtype(dtype),
                HAS_SCALE=True, HAS_STATS=True, STORE_DH=need_h, PARTIALS=True, num_warps=warps)
            p[l0:l0 + chunk] = s1.sum(0)
    d_ln_weight = (a[:, None] * p).to(ln_weight.dtype)
    d_ln_bias = (a[:, None] * q).to(ln_bias.dtype)
    d_bias = (a[:, None] * s[None, :]).to(bias.dtype)
    d_alpha = ((ln_weight.to(acc) * p).sum(1) + (ln_bias.to(acc) * q).sum(1) + bias.to(acc) @ s).to(alpha.dtype)
    return dh, d_ln_weight, d_ln_bias, d_weight.to(weight.dtype), d_bias, d_alpha


# --- kernel report ---
_TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DTYPES = {v: k for k, v in _TL_NAMES.items()}


def _config_text(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return (f"BM={k['BLOCK_M']} BN={k['BLOCK_N']} BK={k['BLOCK_K']} GM={k['GROUP_M']} "
            f"warps={cfg.num_warps} stages={cfg.num_stages}")


def _signature(fn, types: dict, constexprs: dict) -> dict:
    return {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}


def report_entries(shapes: dict) -> list[dict]:
    """Every kernel x config x dtype the CUDA path of this module can launch, at these shapes.

    Layout: the tower's one buffer [L, M, D] (contiguous rows; its CLS-dropping view [L, B, T+1, D][:, :, 1:]
    specialises the same way at T = 576). Every integer argument is 16-divisible at the preset sizes.
    materialised's GEMM is cuBLAS (torch.mm): only its normalise pass is a Triton kernel here.
    """
    keep = shapes.get("tune_configs")
    folded_configs = _FOLDED_CONFIGS[:keep] if keep else _FOLDED_CONFIGS
    entries = []
    for shape in shapes.get("merge", []):
        M, N, D, L = shape["M"], shape["N"], shape["D"], shape["L"]
        for dname in shapes.get("dtypes", ["bf16", "fp16", "fp32"]):
            dtype, esize = _DTYPES[dname], _DTYPES[dname].itemsize
            # the normalise pass: stats only (folded) and writing Â (materialised); row_config's GPU choice
            saved, _utils.ON_GPU = _utils.ON_GPU, True  # the CUDA config, asked for without a GPU
            try:
                block_m, block_d, _, warps = row_config(D, M)
            finally:
                _utils.ON_GPU = saved
            # forward: stats only (folded), stats and Â (materialised); backward: one layer's Â from the stats
            for variant, load, write_a in (("folded", False, False), ("materialised", False, True),
                                           ("backward", True, True)):
                if variant == "folded" and dtype not in _FOLDED_DTYPES:
                    continue
                constexprs = dict(BLOCK_M=block_m, BLOCK_D=block_d, ALIGN=16 // esize, ACC=tl.float32,
                                  LOAD_STATS=load, WRITE_A=write_a)
                types = dict(h_ptr=f"*{dname}", tab_ptr="*i64", M2="i32", lnw_ptr=f"*{dname}", lnb_ptr=f"*{dname}",
                             alpha_ptr=f"*{dname}", mean_ptr="*fp32", rstd_ptr="*fp32",
                             a_ptr=f"*{dname}" if write_a else "*fp32", stride_am="i32", M="i32", D="i32",
                             L0="i32", eps="fp32")
                layers = 1 if load else L  # the backward launches it once per layer
                read = layers * M * D * esize + (2 * M * 4 if load else 0)
                written = (layers * M * D * esize if write_a else 0) + (0 if load else 2 * L * M * 4)
                entries.append(dict(
                    name=f"merge_normalise/{variant}/{dname}/{shape['name']}/{block_m}x{block_d}w{warps}",
                    kernel="merge_normalise", variant="" if load else variant, dtype=dname, shape=shape["name"],
                    config=f"BM={block_m} BD={block_d} warps={warps}", fn=_normalise_kernel,
                    signature=_signature(_normalise_kernel, types, constexprs), constexprs=constexprs,
                    # M2 = M and Â's row stride (L·D + pad forward, D backward) are 16-divisible; L0 = 0 is too
                    # (the backward's L0 = l is not, in general: listed as not divisible)
                    divisible=["h_ptr", "tab_ptr", "M2", "lnw_ptr", "lnb_ptr", "alpha_ptr", "mean_ptr", "rstd_ptr",
                               "a_ptr", "M", "D"] + (["stride_am"] if write_a else []) + ([] if load else ["L0"]),
                    num_warps=warps, num_stages=1, launchable=True, gemm=False,
                    model=dict(kind="memory", bytes=read + written, ctas=triton.cdiv(M, block_m) * layers,
                               bytes_in_flight_per_cta=block_m * D * esize)))
            if dtype not in _FOLDED_DTYPES:
                continue
            for cfg, accumulate in [(c, a) for c in folded_configs for a in (False, True)]:
                constexprs = dict(cfg.kwargs, ACCUMULATE=accumulate, ACC=tl.float32, DOT_ACC=False)
                types = dict(x_ptr=f"*{dname}", stride_l="i32", M2="i32", stride_r1="i32", stride_r2="i32",
                             mean_ptr="*fp32", rstd_ptr="*fp32", w_ptr=f"*{dname}", c_ptr="*fp32", b_ptr="*fp32",
                             out_ptr=f"*{dname}", stride_om="i32", M="i32", N="i32", D="i32", L="i32")
                bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
                K = L * D
                entries.append(dict(
                    name=f"merge_fwd/folded/{dname}/{shape['name']}/{bm}x{bn}x{bk}w{cfg.num_warps}s{cfg.num_stages}"
                         + ("/accumulate" if accumulate else ""),
                    kernel="merge_fwd", variant="folded", dtype=dname, shape=shape["name"],
                    config=_config_text(cfg) + (" ACCUMULATE" if accumulate else ""),
                    fn=_folded_kernel, signature=_signature(_folded_kernel, types, constexprs), constexprs=constexprs,
                    # stacked [L, M, D]: stride_l = M·D, M2 = M, stride_r1 = 0, stride_r2 = D; L = 24 / 6 is not
                    divisible=["x_ptr", "stride_l", "M2", "stride_r1", "stride_r2", "mean_ptr", "rstd_ptr", "w_ptr",
                               "c_ptr", "b_ptr", "out_ptr", "stride_om", "M", "N", "D"] + (["L"] if L % 16 == 0 else []),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, launchable=True, gemm=True,
                    model=dict(kind="gemm", M=M, N=N, K=K, BM=bm, BN=bn, BK=bk, flops=2 * M * N * K,
                               # the promotion (the loop's conditional block) runs at each layer's last K step
                               conditional_every=triton.cdiv(D, bk),
                               # A once per column of tiles (L2 keeps GROUP_M row tiles' B), W′ once per row group
                               bytes=(M * K * triton.cdiv(N, bn) // max(1, cfg.kwargs["GROUP_M"]) + N * K
                                      * triton.cdiv(M, bm * cfg.kwargs["GROUP_M"]) + (1 + accumulate) * M * N) * esize)))
    return entries
