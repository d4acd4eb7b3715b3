"""Float64 helpers and the one accuracy rule every kernel and op test applies (references: comm_fast.reference)."""
import torch
import torch.nn.functional as F

from comm_fast import reference
from comm_fast.activations import ACTIVATIONS as ACT  # checked against transformers' ACT2FN in tests/test_activations.py


def rand(*shape, dtype=torch.float32, scale=1.0, shift=0.0, device="cpu"):
    return (torch.randn(*shape, dtype=torch.float64, device=device) * scale + shift).to(dtype)


def grads(fn, leaves, params, grad, dtype):
    """fn(leaves, params) in ``dtype``: its output and the grads of every leaf and parameter."""
    ls = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
    ps = [p.detach().to(dtype).requires_grad_(True) for p in params]
    out = fn(ls, ps)
    return out.detach(), torch.autograd.grad(out, ls + ps, grad.to(dtype))


# The ground truth is comm_fast.reference, run in float64 by the tests; no second copy of it here.
ref_lnws = reference.layernorm_weighted_sum
ref_merge = reference.multilevel_merge
ref_mlp = reference.mlp


def mlp_params(D1, H, D2, dtype):
    """w1, b1, w2, b2 of Linear(D1, H) -> Linear(H, D2), weights scaled by 1/sqrt(fan_in)."""
    return [rand(H, D1, dtype=dtype, scale=D1 ** -0.5), rand(H, dtype=dtype),
            rand(D2, H, dtype=dtype, scale=H ** -0.5), rand(D2, dtype=dtype)]


def mlp_input(*shape, params, act, dtype, scale=2.0):
    """A random MLP input. For relu it is drawn again while a pre-activation lies within rounding of
    the kink: there two correct computations may take different sides and their grads differ by O(1)."""
    while True:
        x = rand(*shape, dtype=dtype, scale=scale)
        if act != "relu" or (F.linear(x.double(), params[0].double(), params[1].double()).abs().min() > 1e-3):
            return x


def alpha_terms(layers, ln_weight, ln_bias, grad, weight=None, bias=None, eps=1e-5):
    """Σ|terms| of d alpha_l = Σ grad · y_l (y_l = LN_l(h_l), or LN_l(h_l) W_lᵀ + b_l), per layer, float64.

    d alpha is one long dot product whose terms cancel to a result far smaller than they are (a
    16000x cancellation is common at L = 1), so its rounding floor is eps x Σ|terms|, not eps x |result|.
    """
    g = grad.double().abs().flatten(0, -2)
    out = []
    for l, x in enumerate(layers):
        x = x.double().flatten(0, -2)
        xhat = (x - x.mean(-1, keepdim=True)) * (x.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
        y = xhat.abs() * ln_weight[l].double().abs() + ln_bias[l].double().abs()
        if weight is not None:
            y = y @ weight[l].double().abs().T + bias[l].double().abs()
        out.append((g * y).sum())
    return torch.stack(out)


def check(name, got, ref64, same_dtype=None, terms=None):
    """``got`` against the float64 reference ``ref64``.

    float64 (same_dtype None): tight. Otherwise within 2x PyTorch's own error in that dtype (``same_dtype``,
    the reference computed in it) plus an atol: one ulp of the scale for 16-bit, 64 ulps of max(scale, 1)
    for fp32 (long reductions round at the size of partial sums), plus one fp32 ulp of ``terms`` (Σ|terms|
    of a reduction, elementwise; the kernels accumulate in fp32) where given.
    """
    assert got is not None, name
    got = got.double()
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten or poisoned element)"
    err = (got - ref64).abs()
    scale = max(ref64.abs().max().item(), 1e-30)
    if same_dtype is None:
        assert err.max().item() <= 1e-9 * (1 + scale), f"{name}: max error {err.max().item():.3g} at scale {scale:.3g}"
        return
    base = (same_dtype.double() - ref64).abs().max().item()
    eps = torch.finfo(same_dtype.dtype).eps
    atol = eps * 64 * max(scale, 1.0) if same_dtype.dtype == torch.float32 else eps * scale
    allowed = torch.full_like(err, 2 * base + atol)
    if terms is not None:
        allowed = allowed + torch.finfo(torch.float32).eps * terms.to(err)
    worst = (err - allowed).argmax()
    e, a = err.flatten()[worst].item(), allowed.flatten()[worst].item()
    assert e <= a, f"{name}: error {e:.3g} > allowed {a:.3g} (2 x torch's {base:.3g} + atol {atol:.3g}" + \
        (", + eps x Σ|terms|)" if terms is not None else ")")


def compare(fn, ref, leaves, params, grad, dtype, names, terms=None):
    """fn against ref, both fn(leaves, params): the output and the grads of every leaf and parameter
    (``names``, in that order) in ``dtype`` against float64, with torch's own ``dtype`` error as the
    yardstick. ``terms``: Σ|terms| of the last grad (d alpha) where it has one.
    Returns (fn's output, the float64 reference output, the reference output in ``dtype`` or None)."""
    out, g = grads(fn, leaves, params, grad, dtype)
    r_out, r_g = grads(ref, leaves, params, grad, torch.float64)
    t_out, t_g = (None, [None] * len(r_g)) if dtype == torch.float64 else grads(ref, leaves, params, grad, dtype)
    assert out.dtype == dtype and len(names) == len(g)
    check("out", out, r_out, t_out)
    for i, (name, k, r, t) in enumerate(zip(names, g, r_g, t_g)):
        check(name, k, r, t, terms if i == len(names) - 1 else None)
    return out, r_out, t_out
