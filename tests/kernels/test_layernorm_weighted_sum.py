"""Triton LayerNorm weighted sum through the interpreter against float64 references."""
import pytest
import torch

from comm_fast.kernels.layernorm_weighted_sum import LayerNormWeightedSum, lnws_backward, lnws_forward

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
