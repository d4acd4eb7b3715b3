"""Linear → activation → Linear with the bias and activation fused into the first GEMM's epilogue.

One strided GEMM kernel with an epilogue switch serves every product:
    forward   act = f(x W1ᵀ + b1)  [also writes pre = x W1ᵀ + b1 when training]; out = act W2ᵀ + b2
    backward  dpre = (dY W2) ⊙ f'(pre), and act = f(pre) recomputed in the same epilogue;
              dW2 = dYᵀ act, dW1 = dpreᵀ x, dx = dpre W1 (plain GEMMs); db = column sums.
Only x and pre are saved for backward, never the activated hidden tensor; the recomputed act is a
transient buffer of the backward (computing f inside the dW2 GEMM instead would evaluate it once
per output tile, which costs more than the GEMM on tensor cores).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from comm_fast.kernels import _utils
from comm_fast.kernels._utils import cast_to
from comm_fast.kernels.layernorm_weighted_sum import _check_device
from comm_fast.kernels.multilevel_merge import _CPU_CONFIG, _GEMM_CONFIGS, _dot_args, _grouped

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "quick_gelu": 3}
EPI_NONE, EPI_BIAS, EPI_BIAS_ACT, EPI_DACT = 0, 1, 2, 3


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
        return x * tl.sigmoid(1.702 * x)


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
        s = tl.sigmoid(1.702 * x)
        return s + 1.702 * x * s * (1.0 - s)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, aux2_ptr, M, N, K,
               stride_am, stride_ak, stride_bk, stride_bn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               EPI: tl.constexpr, ACT: tl.constexpr, STORE_AUX: tl.constexpr,
               ACC: tl.constexpr, DOT_ACC: tl.constexpr, PRECISION: tl.constexpr):
    """C [M, N] (contiguous) = A [M, K] · B [K, N] (any strides), then the epilogue EPI:
    EPI_BIAS: C += bias.  EPI_BIAS_ACT: pre = C + bias, C = f(pre), aux = pre if STORE_AUX.
    EPI_DACT: C *= f'(aux) with aux = pre [M, N]; aux2 = f(aux) if STORE_AUX.
    The dot runs in A's dtype (B is cast to it), or in ACC while interpreting / for fp32.
    """
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_ACC:
            acc = tl.dot(a.to(ACC), b.to(ACC), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b.to(a_ptr.dtype.element_ty), acc)
    mask = mmask[:, None] & nmask[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if EPI == 1 or EPI == 2:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(ACC)[None, :]
    if EPI == 2:
        if STORE_AUX:
            tl.store(aux_ptr + offs, cast_to(acc, aux_ptr.dtype.element_ty), mask=mask)
        acc = _act(acc, ACT)
    if EPI == 3:
        pre = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc = acc * _act_grad(pre, ACT)
        if STORE_AUX:
            tl.store(aux2_ptr + offs, cast_to(_act(pre, ACT), aux2_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + offs, cast_to(acc, c_ptr.dtype.element_ty), mask=mask)


_mm = _utils.autotune(_GEMM_CONFIGS, _CPU_CONFIG, key=["M", "N", "K", "EPI"])(_mm_kernel)


def matmul(a, b, out, epilogue=EPI_NONE, activation="gelu", bias=None, aux=None, aux2=None):
    """out [M, N] = a [M, K] @ b [K, N] (strided views welcome), with the fused epilogue."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty reduction: run the epilogue on zeros through the same kernel
        a = torch.zeros(M, 1, dtype=a.dtype, device=a.device)
        b = torch.zeros(1, N, dtype=b.dtype, device=b.device)
        K = 1
    store_aux = (epilogue == EPI_BIAS_ACT and aux is not None) or (epilogue == EPI_DACT and aux2 is not None)
    dummy = out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _mm[grid](a, b, out, dummy if bias is None else bias, dummy if aux is None else aux,
              dummy if aux2 is None else aux2, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
              EPI=epilogue, ACT=ACTIVATIONS[activation], STORE_AUX=store_aux, **_dot_args(a.dtype))
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
    matmul(act, w2.t(), out.view(M, D2), EPI_BIAS, activation, bias=b2)
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
    dw2 = matmul(dy.t(), act, _utils.empty((D2, H), w2.dtype, x.device))
    dw1 = matmul(dpre.t(), x2, _utils.empty((H, D1), w1.dtype, x.device))
    dx = matmul(dpre, w1, _utils.empty((M, D1), x.dtype, x.device)).view(x.shape) if need_x else None
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


def report_entries(shapes: dict) -> list[dict]:
    """Every product x config x dtype the CUDA path of this module launches, at these shapes.

    x [M, K] contiguous, w1 [H, K], w2 [N, H] (nn.Linear), all in x's dtype. Unit strides are passed
    as 1, which the runtime turns into constants. dW1 and dW2 have the same strides pattern (one compile)."""
    from comm_fast import kernel_report as kr
    from comm_fast.kernels.multilevel_merge import _report_dot_args

    P = kr.ptr
    tune = shapes.get("tune_configs")
    out = []
    for s in shapes["mlp"]:
        M, K, H, N = s["M"], s["K"], s["H"], s["N"]
        act = ACTIVATIONS[s["activation"]]
        for dt in shapes["dtypes"]:
            es = kr.ESIZE[dt]
            # (variant, M', N', K', strides am ak bk bn, EPI, STORE_AUX, HBM bytes in elements)
            products = [
                ("fc1", M, H, K, (K, 1, 1, K), EPI_BIAS_ACT, True, M * K + H * K + 2 * M * H),
                ("fc1-infer", M, H, K, (K, 1, 1, K), EPI_BIAS_ACT, False, M * K + H * K + M * H),
                ("fc2", M, N, H, (H, 1, 1, H), EPI_BIAS, False, M * H + N * H + M * N),
                ("dact", M, H, N, (N, 1, H, 1), EPI_DACT, True, M * N + N * H + 3 * M * H),
                ("dw2", N, H, M, (1, N, H, 1), EPI_NONE, False, M * N + M * H + N * H),
                ("dw1", H, K, M, (1, H, K, 1), EPI_NONE, False, M * H + M * K + H * K),
                ("dx", M, K, H, (H, 1, K, 1), EPI_NONE, False, M * H + H * K + M * K),
            ]
            # the model's activation in every config; the other activations (an epilogue choice) in the first
            jobs = [(v, act, kr.tuned(_GEMM_CONFIGS, tune)) for v in products]
            jobs += [((f"{v[0]}-{name}",) + v[1:], code, _GEMM_CONFIGS[:1]) for v in products
                     if v[5] in (EPI_BIAS_ACT, EPI_DACT) for name, code in ACTIVATIONS.items()
                     if code != act and dt == "bf16"]
            for prec in kr.dot_precisions(dt):
                dot = _report_dot_args(dt, prec)
                for (variant, m, n, k, (sam, sak, sbk, sbn), epi, aux, elems), act_code, cfgs in jobs:
                    for cfg in cfgs:
                        c = cfg.kwargs
                        out.append(kr.entry(
                            kernel="mlp_mm", variant=variant, dtype=dt, shape=s["name"], fn=_mm_kernel, config=c,
                            precision=prec,
                            args=dict(a_ptr=P(dt), b_ptr=P(dt), c_ptr=P(dt), bias_ptr=P(dt), aux_ptr=P(dt),
                                      aux2_ptr=P(dt), M=m, N=n, K=k, stride_am=sam, stride_ak=sak, stride_bk=sbk,
                                      stride_bn=sbn),
                            constexprs=dict(c, EPI=epi, ACT=act_code, STORE_AUX=aux, **dot), num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages, gemm=True,
                            model=kr.gemm_model(m, n, k, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], elems * es),
                            ))
    return out
