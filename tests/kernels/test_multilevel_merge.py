"""Triton one-GEMM multilevel merge through the interpreter against float64 references."""
import pytest
import torch

from comm_fast.kernels.multilevel_merge import merge_backward, merge_forward

EPS = 1e-5
CASES = [  # L, leading dims, D, N (= D_out), dtype, layout
    (1, (3, 7), 37, 45, torch.float32, "stacked"),
    (3, (2, 9), 40, 33, torch.bfloat16, "strided"),
    (30, (10,), 19, 17, torch.float32, "list"),
    (4, (2, 5), 24, 50, torch.float16, "list_strided"),
    (5, (37,), 33, 20, torch.bfloat16, "list"),
    (2, (2, 6), 48, 40, torch.float64, "strided"),
    (6, (3, 4), 20, 36, torch.float32, "stacked"),
]


class _Merge(torch.autograd.Function):
    """The launchers as the custom op uses them: forward saves inputs + stats only."""

    @staticmethod
    def forward(ctx, lw, lb, w, b, a, *layers):
        out, mean, rstd = merge_forward(list(layers), lw, lb, w, b, a, EPS)
        ctx.save_for_backward(mean, rstd, lw, lb, w, b, a, *layers)
        return out

    @staticmethod
    def backward(ctx, grad):
        mean, rstd, lw, lb, w, b, a, *layers = ctx.saved_tensors
        dh, *rest = merge_backward(grad, layers, mean, rstd, lw, lb, w, b, a, need_h=True)
        return (*rest, *dh.unbind(0))


def _params(H, L, D, N, dtype):
    return [H.rand(L, D, dtype=dtype, scale=0.5, shift=1.0), H.rand(L, D, dtype=dtype),
            H.rand(L, N, D, dtype=dtype, scale=D ** -0.5), H.rand(L, N, dtype=dtype), H.rand(L, dtype=dtype)]


@pytest.mark.parametrize("L,lead,D,N,dtype,layout", CASES)


def test_forward_backward(L, lead, D, N, dtype, layout, seed, H, poison):
    leaves, build = H.hidden(L, lead, D, dtype, layout)
    params = _params(H, L, D, N, dtype)

    out = poison((*lead, N), dtype, "cpu")
    res, mean, rstd = merge_forward(build(leaves)[1], *params, EPS, out=out)
    assert res is out and mean.shape == rstd.shape == (L, out.numel() // N)

    grad = H.rand(*lead, N, dtype=dtype)
    kernel = lambda ls, ps: _Merge.apply(*ps, *build(ls)[1])  # noqa: E731
    ref = lambda ls, ps: H.ref_merge(build(ls)[1], *ps, EPS)  # noqa: E731
    names = [f"dh[{i}]" for i in range(len(leaves))] + ["d ln_weight", "d ln_bias", "d weight", "d bias", "d alpha"]
    lw, lb, w, b, _ = params
    _, r_out, t_out = H.compare(kernel, ref, leaves, params, grad, dtype, names,
                                H.alpha_terms(build(leaves)[1], lw, lb, grad, w, b, EPS))
    H.check("out (preallocated)", out, r_out, t_out)

def test_stats_are_fp32_for_bf16(seed, H):
    leaves, build = H.hidden(2, (5,), 24, torch.bfloat16, "stacked")
    _, mean, rstd = merge_forward(build(leaves)[1], *_params(H, 2, 24, 16, torch.bfloat16), EPS)
    x = leaves[0].double()
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean.double(), x.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (x.var(-1, unbiased=False) + EPS).rsqrt(), rtol=1e-4, atol=1e-5)


def test_param_grads_without_h_grad(seed, H):
    L, D, N = 3, 21, 18
    leaves, build = H.hidden(L, (2, 5), D, torch.float64, "strided")
    params = _params(H, L, D, N, torch.float64)
    layers = build(leaves)[1]
    _, mean, rstd = merge_forward(layers, *params, EPS)
    grad = H.rand(2, 5, N, dtype=torch.float64)
    dh, *p = merge_backward(grad, layers, mean, rstd, *params, need_h=False)
    dh_full, *p_full = merge_backward(grad, layers, mean, rstd, *params, need_h=True)
    assert dh is None and dh_full.shape == (L, 2, 5, D)
    for a, b in zip(p, p_full):
        torch.testing.assert_close(a, b)


def test_expanded_shared_weight(seed, H, poison):
    """weight may be a stride-0 expand of one [N, D] Linear (no copy); grads still match."""
    L, D, N = 3, 20, 12
    leaves, build = H.hidden(L, (2, 5), D, torch.float64, "strided")
    lw, lb, _, b, a = _params(H, L, D, N, torch.float64)
    shared = H.rand(N, D, dtype=torch.float64, scale=D ** -0.5)
    layers = build(leaves)[1]
    out, mean, rstd = merge_forward(layers, lw, lb, shared.expand(L, N, D), b, a, EPS)
    H.check("out", out, H.ref_merge(layers, lw, lb, shared.expand(L, N, D), b, a, EPS))
    grad = H.rand(2, 5, N, dtype=torch.float64)
    dW = merge_backward(grad, layers, mean, rstd, lw, lb, shared.expand(L, N, D), b, a)[3]
    W = shared.expand(L, N, D).clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(H.ref_merge(layers, lw, lb, W, b, a, EPS), [W], grad)
    H.check("d weight", dW, ref)


def test_gradcheck_float64(seed, H):
    L, D, N = 2, 5, 4
    h = [H.rand(3, D, dtype=torch.float64).requires_grad_(True) for _ in range(L)]
    params = [p.requires_grad_(True) for p in _params(H, L, D, N, torch.float64)]
    assert torch.autograd.gradcheck(lambda *args: _Merge.apply(*args), (*params, *h), eps=1e-6, atol=1e-7,
                                    fast_mode=True)

