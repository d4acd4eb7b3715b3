"""out= / accumulate= of multilevel_merge and layernorm_weighted_sum (streaming inference): against
float64 references, the GEMM accumulating into out itself (no add pass over it), validation."""
import pytest
import torch

import accuracy
from accuracy import check, ref_lnws, ref_merge
from comm_fast import _backend, ops

EPS = 1e-5


def rand(*shape, dtype=torch.float64, **kw):
    return accuracy.rand(*shape, dtype=dtype, **kw)


def layers_of(layout, L, D, dtype):
    """(h for the op, its layers) in one of the layouts the ops accept."""
    if layout == "stacked":
        h = rand(L, 2, 7, D, dtype=dtype, scale=2, shift=0.5)
        return h, list(h.unbind(0))
    if layout == "strided":  # [L, B, T, D] with the CLS token dropped
        h = rand(L, 2, 8, D, dtype=dtype, scale=2, shift=0.5)[:, :, 1:]
        return h, list(h.unbind(0))
    h = [rand(2, 7, D, dtype=dtype, scale=2, shift=0.5) for _ in range(L)]
    return h, h


def merge_params(L, D, N, dtype):
    return [rand(L, D, dtype=dtype, scale=0.5, shift=1.0), rand(L, D, dtype=dtype),
            rand(L, N, D, dtype=dtype, scale=D ** -0.5), rand(L, N, dtype=dtype), rand(L, dtype=dtype)]


def out_buffer(kind, shape, dtype, poison, accumulate):
    """(out, its base, its initial value or None): contiguous or a slice of a wider row (row stride > N),
    NaN-poisoned; when accumulating, starting at random values."""
    *lead, n = shape
    base = poison((*lead, n + 3) if kind == "row_slice" else shape, dtype, "cpu")
    out = base[..., 1:n + 1] if kind == "row_slice" else base
    init = rand(*shape, dtype=dtype) if accumulate else None
    if accumulate:
        out.copy_(init)
    return out, base, init


def expect(ref, layers, params, dtype, init):
    """(float64 reference, the same computed in ``dtype``) of init + ref(layers, params)."""
    r64 = ref([x.double() for x in layers], *[p.double() for p in params])
    rdt = None if dtype == torch.float64 else ref([x for x in layers], *params)
    if init is not None:
        r64 = r64 + init.double()
        rdt = None if rdt is None else rdt + init
    return r64, rdt


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("layout,L,D,N,dtype,kind", [
    ("stacked", 4, 24, 20, torch.float64, "contiguous"), ("strided", 3, 37, 18, torch.float32, "row_slice"),
    ("list", 5, 20, 33, torch.bfloat16, "contiguous"), ("strided", 1, 30, 12, torch.float32, "contiguous")])
def test_merge_out(layout, L, D, N, dtype, kind, accumulate, seed, poison):
    h, layers = layers_of(layout, L, D, dtype)
    params = merge_params(L, D, N, dtype)
    out, base, init = out_buffer(kind, (2, 7, N), dtype, poison, accumulate)
    with torch.no_grad():
        got = ops.multilevel_merge(h, *params, eps=EPS, out=out, accumulate=accumulate)
    assert got is out
    r64, rdt = expect(ref_merge, layers, params, dtype, init)
    check("out", out, r64, rdt)
    if kind == "row_slice":  # the padding around the slice is not touched
        assert torch.isnan(base[..., 0]).all() and torch.isnan(base[..., N + 1:]).all()
    assert _backend.last_used()["multilevel_merge"]["backend"] == "torch"


@pytest.mark.parametrize("layout,dtype", [("stacked", torch.float64), ("list", torch.float32)])
def test_merge_out_without_bias(layout, dtype, seed, poison):
    """bias=None: no bias term; accumulating a layer at a time sums to the one-call merge."""
    L, D, N = 3, 16, 10
    h, layers = layers_of(layout, L, D, dtype)
    params = merge_params(L, D, N, dtype)
    bias_sum = params[4] @ params[3]
    out = poison((2, 7, N), dtype, "cpu")
    out.copy_(bias_sum.expand(2, 7, N))  # streaming: start at the bias sum, add the layers without it
    for l in range(L):
        sl = slice(l, l + 1)
        ops.multilevel_merge([layers[l]], params[0][sl], params[1][sl], params[2][sl], None, params[4][sl],
                             out=out, accumulate=True)
    r64, rdt = expect(ref_merge, layers, params, dtype, None)
    check("out", out, r64, rdt)
    fresh = poison((2, 7, N), dtype, "cpu")
    ops.multilevel_merge(h, params[0], params[1], params[2], None, params[4], out=fresh)  # beta=0: NaN ignored
    r64, rdt = expect(ref_merge, layers, [*params[:3], torch.zeros_like(params[3]), params[4]], dtype, None)
    check("out (bias None)", fresh, r64, rdt)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("layout,L,D,dtype", [
    ("stacked", 4, 24, torch.float64), ("strided", 3, 37, torch.bfloat16), ("list", 6, 20, torch.float32)])
def test_layernorm_weighted_sum_out(layout, L, D, dtype, accumulate, seed, poison):
    h, layers = layers_of(layout, L, D, dtype)
    p = merge_params(L, D, 1, dtype)
    params = [p[0], p[1], p[4]]
    out, base, init = out_buffer("row_slice", (2, 7, D), dtype, poison, accumulate)
    with torch.no_grad():
        got = ops.layernorm_weighted_sum(h, *params, eps=EPS, out=out, accumulate=accumulate)
    assert got is out
    r64, rdt = expect(ref_lnws, layers, params, dtype, init)
    check("out", out, r64, rdt)
    assert torch.isnan(base[..., 0]).all() and torch.isnan(base[..., D + 1:]).all()


def test_merge_out_under_autocast(seed, poison):
    """Under autocast the result (and so out) is in autocast's dtype."""
    L, D, N = 2, 16, 8
    h, layers = layers_of("stacked", L, D, torch.float32)
    params = merge_params(L, D, N, torch.float32)
    out = poison((2, 7, N), torch.bfloat16, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops.multilevel_merge(h, *params, out=out)
        with pytest.raises(TypeError, match=r"out: expected dtype torch.bfloat16 \(the result's\), got torch.float32"):
            ops.multilevel_merge(h, *params, out=torch.empty(2, 7, N))
    r64, _ = expect(ref_merge, layers, params, torch.float64, None)
    rbf = ref_merge([x.bfloat16() for x in layers], *[q.bfloat16() for q in params])
    check("out", out, r64, rbf)


def aten_calls(fn) -> list[tuple[str, list]]:
    """(aten op, input shapes) of every op fn runs, custom ops' insides included, in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events() if e.name.startswith("aten::")]


METADATA = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t",
            "aten::transpose", "aten::expand", "aten::resolve_conj", "aten::resolve_neg", "aten::detach"}


def test_accumulate_is_the_gemm_itself(seed):
    """accumulate=True with bias None: out is read and written only by the L GEMMs (addmm_, beta = 1) —
    no add, copy or fill takes a tensor of out's size."""
    L, M, D, N = 3, 11, 16, 24
    h = rand(L, M, D, dtype=torch.float32)
    p = merge_params(L, D, N, torch.float32)
    out = rand(M, N, dtype=torch.float32)
    calls = aten_calls(lambda: ops.multilevel_merge(h, p[0], p[1], p[2], None, p[4], out=out, accumulate=True))
    on_out = [name for name, shapes in calls if shapes and shapes[0] == [M, N] and name not in METADATA]
    assert on_out == ["aten::addmm_"] * L, on_out
    r64, _ = expect(ref_merge, list(h), [*p[:3], torch.zeros_like(p[3]), p[4]], torch.float64, None)
    assert not torch.allclose(out.double(), r64, atol=1e-3)  # the initial value was kept, not overwritten


def test_out_errors(seed):
    L, D, N = 2, 8, 6
    h = rand(L, 3, 5, D, dtype=torch.float32)
    p = merge_params(L, D, N, torch.float32)
    lw, lb, a = p[0], p[1], p[4]
    with pytest.raises(ValueError, match="accumulate: True adds into out=, but multilevel_merge got no out"):
        ops.multilevel_merge(h, *p, accumulate=True)
    with pytest.raises(ValueError, match="accumulate: True adds into out=, but layernorm_weighted_sum got no out"):
        ops.layernorm_weighted_sum(h, lw, lb, a, accumulate=True)
    with pytest.raises(TypeError, match="accumulate: expected a bool, got int"):
        ops.multilevel_merge(h, *p, out=torch.empty(3, 5, N), accumulate=1)
    with pytest.raises(TypeError, match="out: expected a torch.Tensor, got list"):
        ops.multilevel_merge(h, *p, out=[0.0])
    with pytest.raises(ValueError, match=r"out: expected shape \[3, 5, 6\] \(the result's\), got \[3, 5, 8\]"):
        ops.multilevel_merge(h, *p, out=torch.empty(3, 5, D))
    with pytest.raises(ValueError, match=r"out: expected shape \[3, 5, 8\] \(the result's\), got \[15, 8\]"):
        ops.layernorm_weighted_sum(h, lw, lb, a, out=torch.empty(15, D))
    with pytest.raises(TypeError, match="out: expected dtype torch.float32 .* got torch.float64"):
        ops.multilevel_merge(h, *p, out=torch.empty(3, 5, N, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out: the last dimension \(N = 6\) must be contiguous"):
        ops.multilevel_merge(h, *p, out=torch.empty(3, N, 5).transpose(1, 2))
    with pytest.raises(ValueError, match="out: the leading dimensions must merge into one row stride"):
        ops.multilevel_merge(h, *p, out=torch.empty(5, 3, N).transpose(0, 1))
    with pytest.raises(ValueError, match="out: must not share memory with h"):
        ops.layernorm_weighted_sum(h, lw, lb, a, out=h[0])
    with pytest.raises(ValueError, match=r"bias: expected shape \[L, D_out\]"):
        ops.multilevel_merge(h, *p[:3], p[3][:, :2], a, out=torch.empty(3, 5, N))
    grad_w = p[2].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"out: multilevel_merge\(out=...\) writes in place and records no "
                                           "autograd graph, but an input requires grad"):
        ops.multilevel_merge(h, lw, lb, grad_w, p[3], a, out=torch.empty(3, 5, N))
    with pytest.raises(RuntimeError, match=r"layernorm_weighted_sum\(out=...\) writes in place"):
        ops.layernorm_weighted_sum(h.clone().requires_grad_(True), lw, lb, a, out=torch.empty(3, 5, D))
    with torch.no_grad():  # no graph recorded: fine
        ops.multilevel_merge(h, lw, lb, grad_w, p[3], a, out=torch.empty(3, 5, N))


def test_out_backend(seed, monkeypatch):
    """The out= path is the torch path's: an explicit 'triton' raises, COMM_FAST_BACKEND=triton falls back
    (and says so)."""
    L, D, N = 2, 8, 6
    h = rand(L, 3, D, dtype=torch.float32)
    p = merge_params(L, D, N, torch.float32)
    monkeypatch.delenv("COMM_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: True)  # Triton usable on CPU tensors
    with pytest.raises(NotImplementedError, match="backend: 'triton' has no out=/accumulate path for multilevel_merge"):
        ops.multilevel_merge(h, *p, backend="triton", out=torch.empty(3, N))
    with pytest.raises(NotImplementedError, match="for layernorm_weighted_sum"):
        ops.layernorm_weighted_sum(h, p[0], p[1], p[4], backend="triton", out=torch.empty(3, D))
    monkeypatch.setenv("COMM_FAST_BACKEND", "triton")
    ops.multilevel_merge(h, *p, out=torch.empty(3, N))
    used = _backend.last_used()["multilevel_merge"]
    assert used["backend"] == "torch" and "the Triton kernels have no such path yet" in used["reason"]


def test_out_ops_registered_as_mutating(seed):
    """The out ops declare their mutation (opcheck: schema, fake tensor, autograd registration) and
    trace into a full graph."""
    h = rand(2, 3, 8, dtype=torch.float32)
    p = merge_params(2, 8, 4, torch.float32)
    torch.library.opcheck(torch.ops.comm_fast.multilevel_merge_out.default,
                          ([h], True, *p, 1e-5, "torch", torch.zeros(3, 4), True))
    torch.library.opcheck(torch.ops.comm_fast.multilevel_merge_out.default,
                          ([h[0], h[1]], False, p[0], p[1], p[2], None, p[4], 1e-5, "torch", torch.zeros(3, 4), False))
    torch.library.opcheck(torch.ops.comm_fast.layernorm_weighted_sum_out.default,
                          ([h], True, p[0], p[1], p[4], 1e-5, "torch", torch.zeros(3, 8), True))
