"""Linear → activation → Linear with the bias and activation fused into the first GEMM's epilogue.

One Triton GEMM kernel with an epilogue switch covers the two products that have an elementwise tail:
    forward   act = f(x W1ᵀ + b1)  [also writes pre = x W1ᵀ + b1 when training]
    backward  dpre = (dY W2) ⊙ f'(pre), and act = f(pre) recomputed in the same epilogue
The products without one go to cuBLAS (torch.addmm / torch.mm): out = act W2ᵀ + b2 (a bias-only
epilogue gains nothing over cuBLAS), dW2 = dYᵀ act, dW1 = dpreᵀ x, dx = dpre W1; db = column sums.
Keeping dpre's GEMM in Triton saves bytes: cuBLAS + an elementwise pass would write dY W2 and read it
back (2·M·H more elements) to do what this epilogue does on the accumulator.
Only x and pre are saved for backward, never the activated hidden tensor; the recomputed act is a
transient buffer of the backward (computing f inside the dW2 GEMM instead would evaluate it once
per output tile, which costs more than the GEMM on tensor cores).

The fc1 configs are sized for two CTAs per SM on sm_90 (<= 113 KB shared memory, <= 128 registers per
thread at 8 warps): the activation epilogue of one CTA (~40 instructions per element for exact GELU)
runs under the other's main loop instead of leaving the tensor cores idle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from comm_fast.kernels import _utils
from comm_fast.kernels._utils import cast_to
from comm_fast.kernels.layernorm_weighted_sum import _check_device
from comm_fast.kernels.multilevel_merge import _dot_args, _grouped

from comm_fast.activations import ACTIVATIONS as _TORCH_ACTIVATIONS, QUICK_GELU_SCALE  # noqa: E402

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "quick_gelu": 3}  # the _act codes
assert ACTIVATIONS.keys() == _TORCH_ACTIVATIONS.keys(), "an epilogue per activation of comm_fast.activations"
_QUICK_GELU = tl.constexpr(QUICK_GELU_SCALE)
EPI_BIAS_ACT, EPI_DACT = 2, 3


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:  # exact GELU
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:  # tanh GELU; tanh(u) = 2σ(2u) - 1 (no tanh in core triton.language)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * u)
    elif ACT == 2:
        return tl.where(x > 0, x, 0.0)
    else:  # quick_gelu
        return x * tl.sigmoid(x * _QUICK_GELU)


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 1:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        s = tl.sigmoid(x * _QUICK_GELU)
        return s + x * _QUICK_GELU * s * (1.0 - s)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, aux2_ptr, M, N, K,
               stride_am, stride_ak, stride_bk, stride_bn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_BYTES: tl.constexpr, GROUP_M: tl.constexpr,
               EPI: tl.constexpr, ACT: tl.constexpr, STORE_AUX: tl.constexpr,
               ACC: tl.constexpr, DOT_ACC: tl.constexpr, PRECISION: tl.constexpr):
    """C [M, N] (contiguous) = A [M, K] · B [K, N] (any strides), then the epilogue EPI:
    EPI_BIAS_ACT: pre = C + bias, C = f(pre), aux = pre if STORE_AUX.
    EPI_DACT: C *= f'(aux) with aux = pre [M, N]; aux2 = f(aux) if STORE_AUX.
    K_BYTES: the K step in bytes of A's dtype (64 bf16 or 32 fp32 columns for 128), so that one config
    needs the same shared memory in every dtype. The dot runs in A's dtype (B is cast to it), or in ACC
    while interpreting / for fp32. Offsets are 64-bit: index x stride passes 2**31 on large views.
    """
    BLOCK_K: tl.constexpr = K_BYTES * 8 // a_ptr.dtype.element_ty.primitive_bitwidth
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * stride_bk + rn[None, :] * stride_bn
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, K, BLOCK_K):
        kmask = rk < K - k0
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_ACC:
            acc = tl.dot(a.to(ACC), b.to(ACC), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b.to(a_ptr.dtype.element_ty), acc)
        a_ptrs += a_step
        b_ptrs += b_step
    mask = mmask[:, None] & nmask[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if EPI == 2:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(ACC)[None, :]
        if STORE_AUX:
            tl.store(aux_ptr + offs, cast_to(acc, aux_ptr.dtype.element_ty), mask=mask)
        acc = _act(acc, ACT)
    else:
        pre = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc = acc * _act_grad(pre, ACT)
        if STORE_AUX:
            tl.store(aux2_ptr + offs, cast_to(_act(pre, ACT), aux2_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + offs, cast_to(acc, c_ptr.dtype.element_ty), mask=mask)


def _config(bm, bn, warps, stages, k_bytes=128, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "K_BYTES": k_bytes, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Configs from the sm_90 compile (regs / smem per CTA, exact GELU): fc1 64x128 w4: 161 regs, 72 KB at 3
# stages (three CTAs per SM), 96 KB at 4 (two); 128x64 w4: 178 regs, 96 KB (two). The dact epilogue
# (f' and f) needs more registers: 64x64 on 4 warps (<= 165 regs, three CTAs per SM) or 64x128 split
# over 8 warps; 64x128 on 4 warps reaches 255 registers (spills for quick_gelu), 128-row tiles spill.
# 128x128 on 8 warps takes 178 registers: one CTA per SM, its epilogue exposed, so it is left out.
# fp32 without TF32 runs its dot on FMAs: 128x64 on 8 warps (128 regs); 128x128 spills in dact.
_FC1_CONFIGS = [_config(64, 128, 4, 3), _config(128, 64, 4, 4), _config(64, 128, 4, 4)]
_DACT_CONFIGS = [_config(64, 64, 4, 4), _config(64, 128, 8, 3), _config(64, 64, 4, 3)]
_FMA_CONFIGS = [_config(128, 64, 8, 3), _config(64, 64, 4, 3)]
_CPU_CONFIG = _config(32, 32, 4, 1)
_KEY = ["M", "N", "K", "EPI", "ACT"]
_TUNERS = {name: _utils.autotune(configs, _CPU_CONFIG, key=_KEY)(_mm_kernel)
           for name, configs in (("fc1", _FC1_CONFIGS), ("dact", _DACT_CONFIGS), ("fma", _FMA_CONFIGS))}


def _configs(dtype: torch.dtype, epilogue: int, precision: str) -> str:
    """Which tuner (config list) a launch uses: "fma" for fp32 dots without TF32, else by epilogue."""
    if dtype == torch.float32 and precision == "ieee":
        return "fma"
    return "fc1" if epilogue == EPI_BIAS_ACT else "dact"


def matmul(a, b, out, epilogue=EPI_BIAS_ACT, activation="gelu", bias=None, aux=None, aux2=None):
    """out [M, N] = a [M, K] @ b [K, N] (strided views welcome) through the fused epilogue: EPI_BIAS_ACT
    (bias [N]; aux = the pre-activation if given) or EPI_DACT (aux = pre; aux2 = f(pre) if given)."""
    M, K = a.shape
    N = b.shape[1]
    if epilogue not in (EPI_BIAS_ACT, EPI_DACT):
        raise ValueError(f"epilogue: expected EPI_BIAS_ACT ({EPI_BIAS_ACT}) or EPI_DACT ({EPI_DACT}), got {epilogue!r}")
    if (bias if epilogue == EPI_BIAS_ACT else aux) is None:
        raise ValueError("bias: required by EPI_BIAS_ACT" if epilogue == EPI_BIAS_ACT else "aux: required by EPI_DACT")
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty reduction: run the epilogue on zeros through the same kernel
        a = torch.zeros(M, 1, dtype=a.dtype, device=a.device)
        b = torch.zeros(1, N, dtype=b.dtype, device=b.device)
        K = 1
    store_aux = (epilogue == EPI_BIAS_ACT and aux is not None) or (epilogue == EPI_DACT and aux2 is not None)
    dummy = out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    dot = _dot_args(a.dtype)
    _TUNERS[_configs(a.dtype, epilogue, dot["PRECISION"])][grid](
        a, b, out, dummy if bias is None else bias, dummy if aux is None else aux, dummy if aux2 is None else aux2,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        EPI=epilogue, ACT=ACTIVATIONS[activation], STORE_AUX=store_aux, **dot)
    return out


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}")


def mlp_forward(x, w1, b1, w2, b2, activation="gelu", save_pre: bool = True, out: torch.Tensor | None = None):
    """Launch the forward. x [..., D1], w1 [H, D1], w2 [D2, H]. Returns (out [..., D2], pre [M, H] or None)."""
    _check_device(x)
    _check_activation(activation)
    D1, H, D2 = x.shape[-1], w1.shape[0], w2.shape[0]
    x2 = x.reshape(-1, D1)
    M = x2.shape[0]
    if out is None:
        out = _utils.empty((*x.shape[:-1], D2), x.dtype, x.device)
    act = _utils.empty((M, H), x.dtype, x.device)
    pre = _utils.empty((M, H), x.dtype, x.device) if save_pre else None
    matmul(x2, w1.t(), act, EPI_BIAS_ACT, activation, bias=b1, aux=pre)
    torch.addmm(b2.to(x.dtype), act, w2.to(x.dtype).t(), out=out.view(M, D2))  # cuBLAS: bias-only epilogue
    return out, pre


def mlp_backward(grad, x, pre, w1, w2, activation="gelu", need_x: bool = True):
    """Grads (dx or None, dw1, db1, dw2, db2) from the saved x and pre-activation."""
    _check_device(x)
    _check_activation(activation)
    D1, H, D2 = x.shape[-1], w1.shape[0], w2.shape[0]
    x2 = x.reshape(-1, D1)
    M = x2.shape[0]
    dy = grad.reshape(M, D2)
    acc = _utils.torch_acc_dtype(x.dtype)
    dpre = _utils.empty((M, H), x.dtype, x.device)
    act = _utils.empty((M, H), x.dtype, x.device)
    matmul(dy, w2, dpre, EPI_DACT, activation, aux=pre, aux2=act)
    dw2 = (dy.t() @ act).to(w2.dtype)  # the plain products: cuBLAS
    dw1 = (dpre.t() @ x2).to(w1.dtype)
    dx = (dpre @ w1.to(x.dtype)).view(x.shape) if need_x else None
    db1 = dpre.sum(0, dtype=acc)
    db2 = dy.sum(0, dtype=acc)
    return dx, dw1, db1, dw2, db2


class FusedMLP(torch.autograd.Function):
    """Autograd wrapper over the kernels: apply(x, w1, b1, w2, b2, activation)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation="gelu"):
        out, pre = mlp_forward(x, w1, b1, w2, b2, activation, save_pre=True)
        ctx.save_for_backward(x, pre, w1, w2)
        ctx.activation = activation
        ctx.bias_dtypes = (b1.dtype, b2.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, pre, w1, w2 = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = mlp_backward(grad, x, pre, w1, w2, ctx.activation, ctx.needs_input_grad[0])
        return dx, dw1, db1.to(ctx.bias_dtypes[0]), dw2, db2.to(ctx.bias_dtypes[1]), None


# --- kernel report ---

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def report_entries(shapes: dict) -> list[dict]:
    """Every kernel x config x dtype the CUDA path of this module can launch, at these shapes:
    fc1 (bias + activation, with and without the saved pre-activation) and the backward's dact GEMM,
    for each activation; fp32 in both precisions torch's TF32 switch selects."""
    keep = shapes.get("tune_configs")
    tuned = {"fc1": _FC1_CONFIGS, "dact": _DACT_CONFIGS, "fma": _FMA_CONFIGS}
    entries = []
    for shp in shapes["mlp"]:
        M, D1, H, D2 = shp["M"], shp["K"], shp["H"], shp["N"]
        # (kernel, EPI, STORE_AUX, N, K, strides (am, ak, bk, bn) as the launcher passes them, bytes moved / esize)
        gemms = [("mlp_fc1", EPI_BIAS_ACT, True, H, D1, (D1, 1, 1, D1), M * D1 + H * D1 + 2 * M * H),
                 ("mlp_fc1", EPI_BIAS_ACT, False, H, D1, (D1, 1, 1, D1), M * D1 + H * D1 + M * H),
                 ("mlp_dact", EPI_DACT, True, H, D2, (D2, 1, H, 1), M * D2 + D2 * H + 3 * M * H)]
        for dt in shapes["dtypes"]:
            for precision in (("ieee", "tf32") if dt == "fp32" else ("ieee",)):
                for kernel, epi, store_aux, N, K, strides, elems in gemms:
                    configs = tuned[_configs(torch.float32 if dt == "fp32" else torch.bfloat16, epi, precision)]
                    for act_name, act in ACTIVATIONS.items():
                        # the model's activation in every config and dtype; the others (an epilogue choice
                        # of the same main loop) in bf16 with the first config, which keeps the report short
                        if act_name != shp.get("activation", "gelu"):
                            if dt != "bf16":
                                continue
                            chosen = configs[:1]
                        else:
                            chosen = configs[:keep] if keep else configs
                        for cfg in chosen:
                            kw = cfg.kwargs
                            bk = kw["K_BYTES"] // _ESIZE[dt]
                            ints = dict(M=M, N=N, K=K, **dict(zip(("stride_am", "stride_ak", "stride_bk", "stride_bn"),
                                                                  strides)))
                            variant = f"{act_name}{'/pre' if store_aux and epi == EPI_BIAS_ACT else ''}" + \
                                      (f"/{precision}" if dt == "fp32" else "")
                            tag = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{bk}w{cfg.num_warps}s{cfg.num_stages}"
                            entries.append(dict(
                                name=f"{kernel}/{variant}/{dt}/{shp['name']}/{tag}", kernel=kernel, variant=variant,
                                dtype=dt, shape=shp["name"], precision=precision if dt == "fp32" else None,
                                config=f"BM={kw['BLOCK_M']} BN={kw['BLOCK_N']} BK={bk} GM={kw['GROUP_M']} "
                                       f"warps={cfg.num_warps} stages={cfg.num_stages}",
                                fn=_mm_kernel,
                                signature={**{n: _PTR[dt] for n in ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "aux_ptr",
                                                                    "aux2_ptr")},
                                           **{n: "i32" for n in ints},
                                           **{n: "constexpr" for n in ("BLOCK_M", "BLOCK_N", "K_BYTES", "GROUP_M",
                                                                       "EPI", "ACT", "STORE_AUX", "ACC", "DOT_ACC",
                                                                       "PRECISION")}},
                                constexprs=dict(kw, EPI=epi, ACT=act, STORE_AUX=store_aux, ACC=tl.float32,
                                                DOT_ACC=dt == "fp32", PRECISION=precision),
                                divisible=["a_ptr", "b_ptr", "c_ptr", "bias_ptr", "aux_ptr", "aux2_ptr"] +
                                          [n for n, v in ints.items() if v % 16 == 0],
                                ones=[n for n, v in ints.items() if v == 1],
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages, launchable=True, gemm=True,
                                model=dict(kind="gemm", M=M, N=N, K=K, BM=kw["BLOCK_M"], BN=kw["BLOCK_N"], BK=bk,
                                           bytes=elems * _ESIZE[dt], flops=2 * M * N * K)))
    return entries
