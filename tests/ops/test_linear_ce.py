"""comm_fast.ops.linear_ce against cross-entropy on materialised logits in float64: the summed loss, the count,
and the gradients of hidden, weight and bias, chunk sizes that do and do not divide the tokens, ignored labels,
all tokens ignored, bf16 under CPU autocast; and that no [tokens, vocab] tensor is ever allocated."""
import pytest
import torch
import torch.nn.functional as F

from comm_fast.ops.linear_ce import default_chunk, linear_cross_entropy

IGNORE = -100


def reference(h, w, b, y):
    """Sum of token losses and its gradients, through [T, V] logits, in float64."""
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w, b), y, reduction="sum", ignore_index=IGNORE)
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None])
    return loss, grads


def inputs(t, hdim, v, bias, ignore_every=3, dtype=torch.float32):
    h = torch.randn(t, hdim, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, hdim, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(v, dtype=dtype) * 0.5).requires_grad_() if bias else None
    y = torch.randint(0, v, (t,))
    if ignore_every:
        y[::ignore_every] = IGNORE
    return h, w, b, y


def close(a, b, rtol=1e-5):
    a, b = a.detach().double(), b.detach().double()
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-12)


@pytest.mark.parametrize("t,chunk", [(37, 8), (37, 1), (37, 37), (37, 500), (64, 16), (5, None)],
                         ids=["odd-T", "chunk-1", "one-chunk", "chunk>T", "divides", "default"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_loss_and_gradients_equal_materialised_logits(seed, t, chunk, bias):
    h, w, b, y = inputs(t, 24, 61, bias)
    loss, count = linear_cross_entropy(h, w, y, b, chunk=chunk)
    assert loss.dtype == torch.float32 and count == int((y != IGNORE).sum())
    grads = torch.autograd.grad(loss * 0.37, [x for x in (h, w, b) if x is not None])  # the incoming grad scales
    ref, ref_grads = reference(h, w, b, y)
    close(loss, ref)
    for g, r in zip(grads, ref_grads):
        close(g, 0.37 * r)
    assert not grads[0][y == IGNORE].any()  # an ignored token's hidden state gets no gradient


def test_all_tokens_ignored_gives_zero_loss_and_gradients(seed):
    h, w, b, y = inputs(9, 8, 13, True)
    y[:] = IGNORE
    loss, count = linear_cross_entropy(h, w, y, b, chunk=4)
    loss.backward()
    assert count == 0 and loss.item() == 0.0
    for g in (h.grad, w.grad, b.grad):
        assert torch.isfinite(g).all() and not g.any()


def test_no_tokens(seed):
    h, w, _, _ = inputs(0, 8, 13, False)
    loss, count = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert count == 0 and loss.item() == 0.0 and not w.grad.any()


def test_bf16_under_cpu_autocast_matches_linear_under_autocast(seed):
    h, w, b, y = inputs(40, 32, 50, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, y, b, chunk=16)
        eager = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")
    assert loss.dtype == torch.float32
    g = torch.autograd.grad(loss, (h, w, b))
    ge = torch.autograd.grad(eager, (h, w, b))
    assert all(x.dtype == torch.float32 for x in g)  # into the fp32 parameters, through autocast's casts
    torch.testing.assert_close(loss, eager, rtol=2e-2, atol=0.0)
    for x, r in zip(g, ge):
        torch.testing.assert_close(x, r, rtol=5e-2, atol=5e-2 * float(r.abs().max()))


def test_frozen_weight_and_no_grad(seed):
    h, w, _, y = inputs(20, 8, 30, False)
    w.requires_grad_(False)
    loss, _ = linear_cross_entropy(h, w, y, chunk=6)
    loss.backward()
    ref, ref_grads = reference(h, w, None, y)
    close(h.grad, ref_grads[0])
    with torch.no_grad():
        close(linear_cross_entropy(h, w, y, chunk=6)[0], ref)


def test_a_second_backward_is_refused(seed):
    h, w, _, y = inputs(10, 8, 30, False)
    loss, _ = linear_cross_entropy(h, w, y, chunk=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_tokens_by_vocab_tensor_is_allocated(seed, monkeypatch):
    """No tensor made in forward or backward is bigger than a chunk's logits or the weight: none is [T, V]."""
    t, v, chunk = 96, 300, 16
    h, w, _, y = inputs(t, 8, v, False)
    sizes = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with Watch():
        loss, _ = linear_cross_entropy(h, w, y, chunk=chunk)
        loss.backward()
    assert sizes and max(sizes) <= max(chunk * v, w.numel()) < t * v


def test_bad_input():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden, weight"):
        linear_cross_entropy(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), torch.zeros(3))


def test_default_chunk():
    assert default_chunk(2048, 2048, 32000) == 256  # Liger's rule (128) raised to the floor
    assert default_chunk(100, 128, 260) == 100      # never more than the tokens
    assert default_chunk(8192, 4096, 32000) == 1024  # chunk x vocab ~ tokens x hidden
