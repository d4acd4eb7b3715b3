"""Triton fused MLP (bias + activation epilogue) through the interpreter against float64 references."""
import pytest
import torch

from comm_fast import reference
from comm_fast.kernels.fused_mlp import EPI_BIAS_ACT, EPI_DACT, FusedMLP, matmul, mlp_backward, mlp_forward

CASES = [  # leading dims, D1, H, D2, dtype, activation
    ((3, 7), 37, 50, 29, torch.float32, "gelu"),
    ((2, 9), 24, 72, 40, torch.bfloat16, "gelu"),
    ((21,), 33, 40, 18, torch.float16, "gelu_tanh"),
    ((5, 5), 20, 36, 24, torch.float32, "relu"),
    ((19,), 48, 44, 33, torch.bfloat16, "quick_gelu"),
    ((2, 3), 17, 23, 9, torch.float64, "gelu_tanh"),
]


@pytest.mark.parametrize("lead,D1,Hd,D2,dtype,act", CASES)


def test_forward_backward(lead, D1, Hd, D2, dtype, act, seed, H, poison):
    params = H.mlp_params(D1, Hd, D2, dtype)
    x = H.mlp_input(*lead, D1, params=params, act=act, dtype=dtype)

    out = poison((*lead, D2), dtype, "cpu")
    res, pre = mlp_forward(x, *params, act, save_pre=True, out=out)
    assert res is out and pre.shape == (x.numel() // D1, Hd)

    grad = H.rand(*lead, D2, dtype=dtype)
    kernel = lambda ls, ps: FusedMLP.apply(ls[0], *ps, act)  # noqa: E731
    ref = lambda ls, ps: H.ref_mlp(ls[0], *ps, act)  # noqa: E731
    _, r_out, t_out = H.compare(kernel, ref, [x], params, grad, dtype, ["dx", "dw1", "db1", "dw2", "db2"])
    H.check("out (preallocated)", out, r_out, t_out)


def test_pre_activation_saved_not_activation(seed, H):
    """Forward saves x W1ᵀ + b1 (pre), the backward recomputes f(pre)."""
    x = H.rand(6, 20, dtype=torch.float64)
    w1, b1, w2, b2 = H.mlp_params(20, 30, 10, torch.float64)
    _, pre = mlp_forward(x, w1, b1, w2, b2, "gelu", save_pre=True)
    torch.testing.assert_close(pre, x @ w1.t() + b1)
    _, none = mlp_forward(x, w1, b1, w2, b2, "gelu", save_pre=False)
    assert none is None
    out = FusedMLP.apply(x.requires_grad_(True), w1, b1, w2, b2, "gelu")
    saved = [t for t in out.grad_fn.saved_tensors]
    assert not any(t.shape == (6, 30) and torch.allclose(t, H.ACT["gelu"](pre)) for t in saved)
    assert any(t.shape == (6, 30) and torch.equal(t, pre) for t in saved)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])


def test_strided_matmul(trans_a, trans_b, seed, H, poison):
    """Both fused epilogues on column- and row-major operands, float64 against plain torch."""
    a = H.rand(41, 35, dtype=torch.float64)
    b = H.rand(50, 35, dtype=torch.float64) if trans_b else H.rand(35, 50, dtype=torch.float64)
    a_op = a.t().contiguous().t() if trans_a else a  # same values, column-major storage
    b_op = b.t() if trans_b else b
    bias, pre = H.rand(50, dtype=torch.float64), H.rand(41, 50, dtype=torch.float64)
    out, aux, aux2 = (poison((41, 50), torch.float64, "cpu") for _ in range(3))
    matmul(a_op, b_op, out, EPI_BIAS_ACT, "gelu", bias=bias, aux=aux)
    H.check("aux = a @ b + bias", aux, a @ b_op + bias)
    H.check("gelu(a @ b + bias)", out, reference.activation(a @ b_op + bias, "gelu"))
    matmul(a_op, b_op, out, EPI_DACT, "gelu_tanh", aux=pre, aux2=aux2)
    x = pre.clone().requires_grad_(True)
    f = reference.activation(x, "gelu_tanh")
    dpre, = torch.autograd.grad(f, x, a @ b_op)
    H.check("(a @ b) * f'(pre)", out, dpre)
    H.check("f(pre)", aux2, f.detach())


def _huge_buffer(elements, dtype):
    """Address space far larger than what is touched (pages are mapped lazily: only the rows a test
    writes and the kernel reads become resident). Skips where it cannot be reserved."""
    try:
        return torch.empty(elements, dtype=dtype)
    except RuntimeError as exc:
        pytest.skip(f"cannot reserve {elements} elements of address space: {exc}")


@pytest.mark.parametrize("operand", ["a", "b"])


def test_offsets_past_2_31(operand, seed, H, poison):
    """Index x stride past 2**31 in either operand along K: row 2 of a [K, N] view with row stride
    2**31 - 16 starts 2**32 - 32 elements in. 32-bit offset arithmetic wraps that to -32 (zeros here:
    an untouched page), so the product comes out wrong instead of crashing."""
    K, N, M = 3, 16, 5
    stride = 2**31 - 16
    big = _huge_buffer(64 + 2 * stride + N, torch.float16)
    view = big.as_strided((K, N), (stride, 1), storage_offset=64)
    for k in range(K):
        view[k] = H.rand(N, dtype=torch.float16)
    other = H.rand(M, K, dtype=torch.float16)
    if operand == "a":  # a = viewᵀ [N, K] with stride_ak = 2**31 - 16; b [K, M]
        a, b = view.t(), other.t().contiguous()
    else:  # b = view [K, N] with stride_bk = 2**31 - 16
        a, b = other, view
    bias = torch.zeros(b.shape[1], dtype=torch.float16)
    out = poison((a.shape[0], b.shape[1]), torch.float16, "cpu")
    matmul(a, b, out, EPI_BIAS_ACT, "relu", bias=bias)
    ref = torch.relu(a.double() @ b.double())
    H.check("relu(a @ b)", out, ref, torch.relu(a.float() @ b.float()).half())


def test_bad_inputs(H):
    x = H.rand(4, 6)
    w1, b1, w2, b2 = H.mlp_params(6, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="activation: expected one of .* got 'swish'"):
        mlp_forward(x, w1, b1, w2, b2, "swish")
    with pytest.raises(ValueError, match="activation: expected one of"):
        mlp_backward(H.rand(4, 3), x, H.rand(4, 8), w1, w2, "tanh")
    out = torch.empty(4, 8)
    with pytest.raises(ValueError, match="epilogue: expected EPI_BIAS_ACT .* or EPI_DACT .*, got 0"):
        matmul(x, w1.t(), out, 0)
    with pytest.raises(ValueError, match="bias: required by EPI_BIAS_ACT"):
        matmul(x, w1.t(), out, EPI_BIAS_ACT)
    with pytest.raises(ValueError, match="aux: required by EPI_DACT"):
        matmul(x, w1.t(), out, EPI_DACT)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])


def test_gradcheck_float64(act, seed, H):
    x = H.rand(3, 5, dtype=torch.float64).requires_grad_(True)
    params = [p.requires_grad_(True) for p in H.mlp_params(5, 6, 4, torch.float64)]
    fn = lambda *args: FusedMLP.apply(*args, act)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


def test_backward_without_x_grad(seed, H):
    x = H.rand(7, 12, dtype=torch.float64)
    w1, b1, w2, b2 = H.mlp_params(12, 16, 8, torch.float64)
    _, pre = mlp_forward(x, w1, b1, w2, b2, "relu")
    grad = H.rand(7, 8, dtype=torch.float64)
    dx, *p = mlp_backward(grad, x, pre, w1, w2, "relu", need_x=False)
    dx_full, *p_full = mlp_backward(grad, x, pre, w1, w2, "relu", need_x=True)
    assert dx is None and dx_full.shape == x.shape
    for a, b in zip(p, p_full):
        torch.testing.assert_close(a, b)
