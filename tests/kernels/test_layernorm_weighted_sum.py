"""Triton LayerNorm weighted sum through the interpreter against float64 references."""
import pytest
import torch
import triton
import triton.language as tl

from comm_fast import reference
from comm_fast.kernels import _utils
from comm_fast.kernels.layernorm_weighted_sum import (LayerNormWeightedSum, ln_backward_kernel, lnws_backward,
                                                      lnws_forward, row_config)

EPS = 1e-5
CASES = [  # L, leading dims, D, dtype, layout — M and D not powers of two, L from 1 to 30
    (1, (3, 7), 37, torch.float32, "stacked"),
    (4, (2, 9), 24, torch.bfloat16, "strided"),
    (30, (13,), 19, torch.float32, "list"),
    (5, (2, 5), 100, torch.float16, "list_strided"),
    (7, (2, 6), 48, torch.bfloat16, "list"),
    (3, (11,), 33, torch.float64, "stacked"),
    (6, (3, 4), 40, torch.float32, "strided"),
]


def _params(H, L, D, dtype):
    return [H.rand(L, D, dtype=dtype, scale=0.5, shift=1.0), H.rand(L, D, dtype=dtype), H.rand(L, dtype=dtype)]


@pytest.mark.parametrize("L,lead,D,dtype,layout", CASES)


def test_forward_backward(L, lead, D, dtype, layout, seed, H, poison):
    leaves, build = H.hidden(L, lead, D, dtype, layout)
    params = _params(H, L, D, dtype)

    out = poison(build(leaves)[1][0].shape, dtype, "cpu")  # NaN-filled output buffer
    assert lnws_forward(build(leaves)[1], *params, EPS, out=out) is out

    grad = H.rand(*out.shape, dtype=dtype)
    kernel = lambda ls, ps: LayerNormWeightedSum.apply(*ps, EPS, *build(ls)[1])  # noqa: E731
    ref = lambda ls, ps: H.ref_lnws(build(ls)[1], *ps, EPS)  # noqa: E731
    names = [f"dh[{i}]" for i in range(len(leaves))] + ["d ln_weight", "d ln_bias", "d alpha"]
    lw, lb, _ = params
    _, r_out, t_out = H.compare(kernel, ref, leaves, params, grad, dtype, names,
                                H.alpha_terms(build(leaves)[1], lw, lb, grad, eps=EPS))
    H.check("out (preallocated)", out, r_out, t_out)

def test_backward_without_h_grad_matches(seed, H):
    L, D = 3, 21
    leaves, build = H.hidden(L, (2, 5), D, torch.float64, "strided")
    params = _params(H, L, D, torch.float64)
    grad = H.rand(2, 5, D, dtype=torch.float64)
    dh, *p = lnws_backward(grad, build(leaves)[1], *params, EPS, need_h=False)
    dh_full, *p_full = lnws_backward(grad, build(leaves)[1], *params, EPS, need_h=True)
    assert dh is None and dh_full.shape == (L, 2, 5, D)
    for a, b in zip(p, p_full):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64(seed, H):
    L, D = 2, 5
    h = [H.rand(3, D, dtype=torch.float64).requires_grad_(True) for _ in range(L)]
    params = [p.requires_grad_(True) for p in _params(H, L, D, torch.float64)]
    fn = lambda w, b, a, *hs: LayerNormWeightedSum.apply(w, b, a, EPS, *hs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*params, *h), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("L", range(1, 31))


def test_every_layer_count_against_reference(L, seed, H):
    """L = 1..30 on tiny shapes, float64 against comm_fast.reference: the cross-layer prefetch (first,
    middle and last layer) and the (row groups, L) backward grid. D alternates between a power of two
    (no column mask) and an odd width."""
    D = 8 if L % 2 else 5
    leaves, build = H.hidden(L, (2, 3), D, torch.float64, "strided" if L % 3 else "list")
    params = _params(H, L, D, torch.float64)
    grad = H.rand(2, 3, D, dtype=torch.float64)
    kernel = lambda ls, ps: LayerNormWeightedSum.apply(*ps, EPS, *build(ls)[1])  # noqa: E731
    ref = lambda ls, ps: reference.layernorm_weighted_sum(build(ls)[1], *ps, EPS)  # noqa: E731
    H.compare(kernel, ref, leaves, params, grad, torch.float64,
              [f"dh[{i}]" for i in range(len(leaves))] + ["d ln_weight", "d ln_bias", "d alpha"])


def test_gpu_row_config():
    """The CUDA configs (computed without a GPU): forward 64 elements per thread in 16-bit, 32 in fp32;
    backward without partials one row block of one layer per program; with partials the grid covers
    >= 32 programs per SM of the given SM count, with a power-of-two ITERS."""
    assert row_config(1024, 18432, gpu=True, esize=2) == (4, 1024, 1, 2)
    assert row_config(1024, 18432, gpu=True, esize=4) == (2, 1024, 1, 2)
    assert row_config(37, 5, gpu=True, esize=2)[:2] == (32, 64)
    bm, bd, iters, warps = row_config(1024, 18432, backward=True, gpu=True)
    assert iters == 1 and bm * bd // (32 * warps) <= 16
    for sms, L in [(132, 24), (132, 6), (16, 24), (1000, 1)]:
        bm, _, iters, _ = row_config(1024, 18432, backward=True, partials=True, layers=L, gpu=True, sms=sms)
        grid = -(-18432 // (bm * iters)) * L
        assert iters & (iters - 1) == 0 and (grid >= 32 * sms or iters == 1), (sms, L, iters)
        assert iters in (1, 64) or -(-18432 // (bm * iters * 2)) * L < 32 * sms, "the largest such ITERS (<= 64)"


def _huge_buffer(elements, dtype):
    """A buffer far larger than what is touched: its pages are mapped lazily (only the rows a test writes
    and the kernel reads become resident). Skips where the address space cannot be reserved."""
    try:
        return torch.empty(elements, dtype=dtype)
    except RuntimeError as exc:
        pytest.skip(f"cannot reserve {elements} elements of address space: {exc}")


def test_layer_offsets_past_2_31(seed, H):
    """ln_backward_kernel reads layer l's grad at g + l·stride_gl: with stride_gl = 2**31 - 16 layer 2
    lies 2**32 - 32 elements past g. In 32-bit arithmetic that offset wraps to -32, a place that holds
    zeros here (an untouched page), so a wrapped product shows as a wrong grad, not as a crash."""
    L, M, D = 3, 2, 8
    stride = 2**31 - 16
    base = _huge_buffer(64 + 2 * stride + M * D, torch.float16)
    g = base.as_strided((L, M, D), (stride, D, 1), storage_offset=64)
    for l in range(L):
        g[l] = H.rand(M, D, dtype=torch.float16)
    x = H.rand(L, M, D, dtype=torch.float32)
    layers = list(x.unbind(0))
    tab, table, m2, keep, align = _utils.layer_table(layers)
    dh = torch.full((L, M, D), float("nan"))
    mean, rstd = torch.zeros(L, M), torch.zeros(L, M)
    for l in range(L):
        var, mean[l] = torch.var_mean(x[l], -1, correction=0)
        rstd[l] = torch.rsqrt(var + EPS)
    bm, bd, iters, warps = row_config(D, M, backward=True)
    ln_backward_kernel[(triton.cdiv(M, bm * iters), L)](
        tab, table, m2, g[0], stride, dh, mean, rstd, dh, dh, M, D, L, 0.0,
        BLOCK_M=bm, BLOCK_D=bd, ITERS=iters, ALIGN=align, ACC=tl.float32,
        HAS_SCALE=False, HAS_STATS=True, STORE_DH=True, PARTIALS=False, num_warps=warps)
    for l in range(L):
        xx = x[l].double().requires_grad_(True)
        ref, = torch.autograd.grad(torch.nn.functional.layer_norm(xx, (D,), eps=EPS), xx, g[l].double())
        H.check(f"dh[{l}]", dh[l], ref, ref.float())
