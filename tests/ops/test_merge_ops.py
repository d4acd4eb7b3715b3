"""comm_fast.ops merge ops: the torch (CPU) path against float64 references, backend dispatch and
recording, input validation, custom-op registration (torch.compile, opcheck)."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import accuracy
from accuracy import compare, mlp_input, mlp_params, ref_lnws, ref_merge, ref_mlp
from comm_fast import _backend, ops
from comm_fast.ops import merge, merge_variants

EPS = 1e-5


def rand(*shape, dtype=torch.float64, **kw):
    return accuracy.rand(*shape, dtype=dtype, **kw)


def hidden(L, D, layout, dtype):
    """(leaf tensors, build(leaves) -> (h for the op, layer views))."""
    if layout == "stacked":
        return [rand(L, 2, 7, D, dtype=dtype, scale=2, shift=0.5)], lambda ls: (ls[0], list(ls[0].unbind(0)))
    if layout == "strided":  # [L, B, T, D] with the CLS token dropped
        return [rand(L, 2, 8, D, dtype=dtype, scale=2, shift=0.5)], \
            lambda ls: (ls[0][:, :, 1:], list(ls[0][:, :, 1:].unbind(0)))
    return [rand(2, 7, D, dtype=dtype, scale=2, shift=0.5) for _ in range(L)], lambda ls: (list(ls), list(ls))


def merge_params(L, D, N, dtype):
    return [rand(L, D, dtype=dtype, scale=0.5, shift=1.0), rand(L, D, dtype=dtype),
            rand(L, N, D, dtype=dtype, scale=D ** -0.5), rand(L, N, dtype=dtype), rand(L, dtype=dtype)]


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("COMM_FAST_BACKEND", raising=False)
    return monkeypatch


# ------------------------------------------------------------------ accuracy, torch and triton backends

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout,L,D,N,dtype", [
    ("stacked", 4, 24, 20, torch.float64), ("strided", 3, 37, 18, torch.float32),
    ("list", 5, 20, 33, torch.bfloat16), ("strided", 1, 30, 12, torch.float32)])
def test_multilevel_merge(backend, layout, L, D, N, dtype, seed, clean_env, poison):
    if backend == "triton" and dtype == torch.float64 and L > 3:
        L = 3  # keep the interpreter quick
    leaves, build = hidden(L, D, layout, dtype)
    params = merge_params(L, D, N, dtype)
    names = [f"dh[{i}]" for i in range(len(leaves))] + ["d ln_weight", "d ln_bias", "d weight", "d bias", "d alpha"]
    grad = rand(2, 7, N)
    compare(lambda ls, ps: ops.multilevel_merge(build(ls)[0], *ps, eps=EPS, backend=backend),
            lambda ls, ps: ref_merge(build(ls)[1], *ps), leaves, params, grad, dtype, names,
            accuracy.alpha_terms(build(leaves)[1], *params[:2], grad, *params[2:4]))
    assert _backend.last_used()["multilevel_merge"]["backend"] == backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout,L,D,dtype", [
    ("stacked", 4, 24, torch.float64), ("strided", 3, 37, torch.bfloat16), ("list", 6, 20, torch.float32)])
def test_layernorm_weighted_sum(backend, layout, L, D, dtype, seed, clean_env, poison):
    leaves, build = hidden(L, D, layout, dtype)
    params = merge_params(L, D, 1, dtype)
    params = [params[0], params[1], params[4]]
    names = [f"dh[{i}]" for i in range(len(leaves))] + ["d ln_weight", "d ln_bias", "d alpha"]
    grad = rand(2, 7, D)
    compare(lambda ls, ps: ops.layernorm_weighted_sum(build(ls)[0], *ps, eps=EPS, backend=backend),
            lambda ls, ps: ref_lnws(build(ls)[1], *ps), leaves, params, grad, dtype, names,
            accuracy.alpha_terms(build(leaves)[1], *params[:2], grad))
    assert _backend.last_used()["layernorm_weighted_sum"]["backend"] == backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("act,dtype", [("gelu", torch.float64), ("gelu_tanh", torch.float32),
                                       ("relu", torch.bfloat16), ("quick_gelu", torch.float32)])
def test_fused_mlp(backend, act, dtype, seed, clean_env, poison):
    params = mlp_params(19, 40, 13, dtype)
    x = mlp_input(2, 7, 19, params=params, act=act, dtype=dtype)
    compare(lambda ls, ps: ops.fused_mlp(ls[0], *ps, act, backend=backend),
            lambda ls, ps: ref_mlp(ls[0], *ps, act), [x], params, rand(2, 7, 13), dtype,
            ["dx", "dw1", "db1", "dw2", "db2"])
    assert _backend.last_used()["fused_mlp"]["backend"] == backend


def test_merge_without_hidden_grads(seed, clean_env):
    """Frozen encoder: h needs no grad, the merge parameters still get theirs."""
    h = rand(3, 2, 5, 16, dtype=torch.float32)
    params = [p.float().requires_grad_(True) for p in merge_params(3, 16, 8, torch.float64)]
    grads = torch.autograd.grad(ops.multilevel_merge(h, *params).sum(), params)
    ref_params = [p.detach().double().requires_grad_(True) for p in params]
    ref_grads = torch.autograd.grad(ref_merge(list(h.double().unbind(0)), *ref_params).sum(), ref_params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


def test_list_with_some_layers_frozen(seed, clean_env):
    layers = [rand(2, 5, 16, dtype=torch.float32) for _ in range(3)]
    layers[1].requires_grad_(True)
    params = merge_params(3, 16, 8, torch.float32)
    out = ops.multilevel_merge(layers, *params)
    (g,) = torch.autograd.grad(out.sum(), [layers[1]])
    x = layers[1].detach().double().requires_grad_(True)
    ref = ref_merge([layers[0].double(), x, layers[2].double()], *[p.double() for p in params])
    (rg,) = torch.autograd.grad(ref.sum(), [x])
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-5)


def test_no_grad_saves_nothing(seed, clean_env):
    x = rand(4, 8, dtype=torch.float32).requires_grad_(True)
    params = mlp_params(8, 16, 4, torch.float32)
    with torch.no_grad():
        out = ops.fused_mlp(x, *params)
    assert out.grad_fn is None
    torch.testing.assert_close(out.double(), ref_mlp(x.double(), *[p.double() for p in params], "gelu"),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ backends and info

def _merge_inputs(dtype=torch.float32):
    return [rand(2, 3, 8, dtype=dtype)] + merge_params(2, 8, 4, dtype)


def test_auto_on_cpu_is_torch(clean_env):
    ops.multilevel_merge(*_merge_inputs())
    assert _backend.last_used()["multilevel_merge"] == {"backend": "torch", "reason": merge.describe()
                                                       ["multilevel_merge"]["cpu"]["reason"]}
    assert merge.describe()["multilevel_merge"]["cpu"]["backend"] == "torch"


@pytest.mark.parametrize("name", ["cpp", "cuda"])
def test_backend_the_op_lacks(name, clean_env):
    with pytest.raises(ValueError, match=f"backend: multilevel_merge has no '{name}' backend"):
        ops.multilevel_merge(*_merge_inputs(), backend=name)
    clean_env.setenv("COMM_FAST_BACKEND", name)
    out = ops.multilevel_merge(*_merge_inputs())  # env var: fall back to auto and say why
    assert out.shape == (3, 4)
    used = _backend.last_used()["multilevel_merge"]
    assert used["backend"] == "torch" and f"COMM_FAST_BACKEND={name}" in used["reason"]
    assert f"COMM_FAST_BACKEND={name}" in merge.describe()["fused_mlp"]["cpu"]["reason"]


def test_unknown_backend(clean_env):
    with pytest.raises(ValueError, match="backend"):
        ops.fused_mlp(rand(2, 4), *mlp_params(4, 6, 3, torch.float64), backend="fast")


def test_triton_on_cpu_needs_the_interpreter(clean_env):
    args = [_merge_inputs()[i] for i in (0, 1, 2, 5)]
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.layernorm_weighted_sum(*args, backend="triton")
    clean_env.setenv("COMM_FAST_BACKEND", "triton")  # the env var falls back instead, warns once, records why
    clean_env.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="COMM_FAST_BACKEND=triton"):
        ops.layernorm_weighted_sum(*args)
    used = _backend.last_used()["layernorm_weighted_sum"]
    assert used["backend"] == "torch" and "TRITON_INTERPRET=1" in used["reason"]


def test_env_triton_under_interpreter(clean_env):
    clean_env.setenv("COMM_FAST_BACKEND", "triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert merge.describe()["fused_mlp"]["cpu"]["backend"] == "triton"
    ops.fused_mlp(rand(3, 4, dtype=torch.float32), *mlp_params(4, 16, 3, torch.float32))
    assert _backend.last_used()["fused_mlp"]["backend"] == "triton"


def test_an_out_call_records_its_own_reason(clean_env):
    """layernorm_weighted_sum(out=...) notes why its backend ran, not what the call before it noted."""
    args = [_merge_inputs()[i] for i in (0, 1, 2, 5)]
    clean_env.setenv("TRITON_INTERPRET", "0")
    ops.layernorm_weighted_sum(*args)
    assert _backend.last_used()["layernorm_weighted_sum"]["reason"].startswith("auto: CPU tensors")
    clean_env.setenv("COMM_FAST_BACKEND", "triton")  # unusable on CPU without the interpreter: falls back
    clean_env.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="COMM_FAST_BACKEND=triton"):
        ops.layernorm_weighted_sum(*args, out=torch.empty(args[0].shape[1:], dtype=args[0].dtype))
    used = _backend.last_used()["layernorm_weighted_sum"]
    assert used["backend"] == "torch" and used["reason"].startswith("COMM_FAST_BACKEND=triton unusable"), used


def test_cuda_tensors_under_the_interpreter_take_torch(clean_env):
    """TRITON_INTERPRET=1 runs Triton on CPU tensors only: on CUDA tensors auto picks torch, and says why."""
    pytest.importorskip("triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    for op, entry in merge.describe().items():
        assert entry["cuda"]["backend"] == "torch" and "TRITON_INTERPRET=1 is set" in entry["cuda"]["reason"], op
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert merge.describe()["fused_mlp"]["cuda"]["backend"] == "triton"


def test_describe_shape(clean_env):
    d = merge.describe()
    assert set(d) == {"layernorm_weighted_sum", "multilevel_merge", "fused_mlp"}
    assert set(d["multilevel_merge"]) == {"cpu", "cuda", "variants"}  # the forward variant chosen per shape
    for entry in d.values():
        assert {"cpu", "cuda"} <= set(entry)
        assert entry["cpu"]["backend"] == "torch" and entry["cpu"]["reason"]
        assert entry["cuda"]["backend"] in ("triton", "torch") and entry["cuda"]["reason"]


# ------------------------------------------------------------------ bad input

def _lnws_args():
    return dict(h=rand(3, 2, 5, 8, dtype=torch.float32), ln_weight=rand(3, 8, dtype=torch.float32),
                ln_bias=rand(3, 8, dtype=torch.float32), alpha=rand(3, dtype=torch.float32))


def _merge_args():
    return dict(_lnws_args(), weight=rand(3, 6, 8, dtype=torch.float32), bias=rand(3, 6, dtype=torch.float32))


@pytest.mark.parametrize("change,exc,match", [
    (dict(ln_weight=rand(2, 8)), ValueError, r"ln_weight: expected shape \[L, D\] = \[3, 8\], got \[2, 8\]"),
    (dict(ln_bias=rand(3, 7)), ValueError, r"ln_bias: expected shape \[L, D\] = \[3, 8\], got \[3, 7\]"),
    (dict(alpha=rand(4)), ValueError, r"alpha: expected shape \[L\] = \[3\], got \[4\]"),
    (dict(weight=rand(2, 6, 8)), ValueError, r"weight: expected shape \[L, D_out, D\] = \[3, 6, 8\], got \[2, 6, 8\]"),
    (dict(weight=rand(3, 6, 9)), ValueError, r"weight: expected shape .* got \[3, 6, 9\]"),
    (dict(weight=rand(6, 8)), ValueError, r"weight: expected shape \[L, D_out, D\]"),
    (dict(bias=rand(3, 5)), ValueError, r"bias: expected shape \[L, D_out\] = \[3, 6\], got \[3, 5\]"),
    (dict(h=[]), ValueError, r"h: expected at least one layer, got an empty list"),
    (dict(h=rand(0, 2, 8)), ValueError, r"h: expected at least one layer"),
    (dict(h=rand(3, 2, 5, 8).to(torch.int32)), TypeError, r"h: expected a floating-point tensor .* got torch.int32"),
    (dict(alpha=torch.ones(3, dtype=torch.int64)), TypeError, r"alpha: expected a floating-point tensor"),
    (dict(h=rand(3, 2, 8, 5).transpose(-1, -2)), ValueError, r"h: the last dimension \(D = 8\) must be contiguous"),
    (dict(h=[rand(2, 8), rand(2, 8), rand(3, 8)]), ValueError, r"h\[2\]: expected shape \[2, 8\]"),
    (dict(h=[rand(2, 8), rand(2, 8), rand(2, 8, dtype=torch.float32)]), TypeError, r"h\[2\]: expected dtype"),
    (dict(h=[rand(2, 8), rand(2, 8), rand(8, 2).t()]), ValueError, r"h\[2\]: the last dimension"),
    (dict(ln_weight=rand(3, 8, dtype=torch.float32).to("meta")), ValueError,
     r"ln_weight: expected a tensor on cpu .* got meta"),
    (dict(h="hidden"), TypeError, r"h: expected a tensor"),
    (dict(ln_weight=[[1.0] * 8] * 3), TypeError, r"ln_weight: expected a torch.Tensor, got list"),
    (dict(eps=-0.5), ValueError, r"eps: expected a non-negative float, got -0\.5"),  # rstd would be NaN
])
def test_bad_merge_input(change, exc, match, clean_env):
    args = _merge_args()
    args.update(change)
    with pytest.raises(exc, match=match):
        ops.multilevel_merge(**args)
    if "weight" not in change and "bias" not in change:
        lnws_args = {k: args[k] for k in ("h", "ln_weight", "ln_bias", "alpha", "eps") if k in args}
        with pytest.raises(exc, match=match):
            ops.layernorm_weighted_sum(**lnws_args)


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.ones(3, 4, dtype=torch.int64)), TypeError, r"x: expected a floating-point tensor"),
    (dict(w1=rand(6, 5)), ValueError, r"w1: expected shape \[H, D1\] = \[6, 4\], got \[6, 5\]"),
    (dict(b1=rand(7)), ValueError, r"b1: expected shape \[H\] = \[6\], got \[7\]"),
    (dict(w2=rand(3, 5)), ValueError, r"w2: expected shape \[D2, H\] = \[3, 6\], got \[3, 5\]"),
    (dict(b2=rand(4)), ValueError, r"b2: expected shape \[D2\] = \[3\], got \[4\]"),
    (dict(activation="swish"), ValueError, r"activation: expected one of"),
    (dict(b2=rand(3).to("meta")), ValueError, r"b2: expected a tensor on cpu"),
])
def test_bad_mlp_input(change, exc, match, clean_env):
    args = dict(x=rand(3, 4), w1=rand(6, 4), b1=rand(6), w2=rand(3, 6), b2=rand(3))
    args.update(change)
    with pytest.raises(exc, match=match):
        ops.fused_mlp(**args)


# ------------------------------------------------------------------ custom ops

def test_ops_are_registered():
    for name in ("layernorm_weighted_sum", "multilevel_merge", "fused_mlp", "layernorm_weighted_sum_backward",
                 "multilevel_merge_backward", "fused_mlp_backward"):
        assert hasattr(torch.ops.comm_fast, name), name


def test_compile_fullgraph_no_graph_breaks(seed, clean_env):
    """The ops trace as single nodes (forward and backward): no graph break with fullgraph=True."""
    h = rand(3, 2, 6, 8, dtype=torch.float32)
    p = [t.float().requires_grad_(True) for t in merge_params(3, 8, 8, torch.float64)]
    m = [t.float().requires_grad_(True) for t in mlp_params(8, 16, 8, torch.float64)]

    def tower_like(h, lw, lb, w, b, a, w1, b1, w2, b2):
        v1 = ops.multilevel_merge(h[:, :, 1:], lw, lb, w, b, a)
        v2 = ops.layernorm_weighted_sum(list(h[:, :, 1:].unbind(0)), lw, lb, torch.softmax(a, 0))
        return v1 + ops.fused_mlp(v2, w1, b1, w2, b2, "gelu")

    compiled = torch.compile(tower_like, fullgraph=True, backend="aot_eager")
    out = compiled(h, *p, *m)
    ref = tower_like(h, *p, *m)
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.sum(), p + m)
    rg = torch.autograd.grad(ref.sum(), p + m)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast casts trace too
        out, ref = compiled(h, *p, *m), tower_like(h, *p, *m)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("stacked", [True, False])
def test_opcheck_cpu(stacked, seed):
    h = rand(2, 3, 8, dtype=torch.float32).requires_grad_(True)
    harg = [h] if stacked else [rand(3, 8, dtype=torch.float32).requires_grad_(True) for _ in range(2)]
    p = [t.float().requires_grad_(True) for t in merge_params(2, 8, 4, torch.float64)]
    m = [t.float().requires_grad_(True) for t in mlp_params(8, 12, 4, torch.float64)]
    torch.library.opcheck(torch.ops.comm_fast.multilevel_merge.default,
                          (harg, stacked, *p, 1e-5, "torch"))
    torch.library.opcheck(torch.ops.comm_fast.layernorm_weighted_sum.default,
                          (harg, stacked, p[0], p[1], p[4], 1e-5, "torch"))
    torch.library.opcheck(torch.ops.comm_fast.fused_mlp.default,
                          (rand(5, 8, dtype=torch.float32).requires_grad_(True), *m, "gelu", True, "torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemm_ops_run_in_autocast_dtype(backend, seed, clean_env):
    """Under torch.autocast the merge and the MLP compute in autocast's dtype, like the nn.Linear layers
    they fuse (custom ops are not cast by autocast itself), and fp32 parameters still get fp32 grads."""
    h = rand(3, 2, 5, 16, dtype=torch.float32)
    params = [p.float().requires_grad_(True) for p in merge_params(3, 16, 8, torch.float64)]
    mlp = [p.float().requires_grad_(True) for p in mlp_params(8, 12, 4, torch.float64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = ops.multilevel_merge(h, *params, backend=backend)
        out = ops.fused_mlp(merged, *mlp, backend=backend)
        ref = ref_mlp(ref_merge(list(h.unbind(0)), *params), *mlp, "gelu")  # torch autocasts its F.linear
        lnws = ops.layernorm_weighted_sum(h, params[0], params[1], params[4], backend=backend)
    assert merged.dtype == out.dtype == ref.dtype == torch.bfloat16 and lnws.dtype == torch.float32
    ref64 = ref_mlp(ref_merge(list(h.double().unbind(0)), *[p.double() for p in params]),
                    *[p.double() for p in mlp], "gelu")
    accuracy.check("out", out, ref64, ref)  # within 2x torch's own error under autocast (+ 1 bf16 ulp)
    grads = torch.autograd.grad(out.float().sum(), params + mlp)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_autocast_leaves_float64_and_meta_alone(seed, clean_env):
    h = rand(3, 2, 5, 16)
    params = merge_params(3, 16, 8, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.multilevel_merge(h, *params).dtype == torch.float64  # as torch's autocast does
        meta = ops.multilevel_merge(h.to("meta"), *[p.to("meta") for p in params])  # shape inference
    assert meta.shape == (2, 5, 8) and meta.device.type == "meta"


# ------------------------------------------------------------------ forward variants

@pytest.fixture
def variants(clean_env, tmp_path):
    """No forced variant, an empty disk cache of our own, no in-memory choices (before and after)."""
    clean_env.delenv(merge_variants.ENV, raising=False)
    clean_env.setenv("COMM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    merge_variants.clear()
    yield clean_env
    merge_variants.clear()


@pytest.mark.parametrize("variant", ["folded", "materialised"])
def test_forced_variant_runs_and_is_reported(variant, seed, variants, poison):
    variants.setenv(merge_variants.ENV, variant)
    h, *params = _merge_inputs(torch.bfloat16)
    out = ops.multilevel_merge(h, *params, backend="triton")
    accuracy.check("out", out, ref_merge(list(h.double().unbind(0)), *[p.double() for p in params]),
                   ref_merge(list(h.unbind(0)), *params))
    assert f"variant {variant}: forced by COMM_FAST_MERGE_VARIANT" in _backend.last_used()["multilevel_merge"]["reason"]


def test_unknown_or_ineligible_variant(variants):
    variants.setenv(merge_variants.ENV, "on-load")
    with pytest.raises(ValueError, match=r"COMM_FAST_MERGE_VARIANT: expected one of \('folded', 'materialised'\)"):
        ops.multilevel_merge(*_merge_inputs(), backend="triton")
    variants.setenv(merge_variants.ENV, "folded")
    with pytest.raises(ValueError, match="COMM_FAST_MERGE_VARIANT=folded: that variant cannot run this call: "
                                         "folded takes 16-bit inputs"):
        ops.multilevel_merge(*_merge_inputs(torch.float32), backend="triton")


def test_interpreter_default_and_info(seed, variants):
    """Nothing is timed under the interpreter: folded where eligible, else materialised; info says which."""
    h, *params = _merge_inputs(torch.bfloat16)
    ops.multilevel_merge(h, *params, backend="triton")
    ops.multilevel_merge(list(h.float().unbind(0)), *[p.float() for p in params], backend="triton")
    chosen = merge.describe()["multilevel_merge"]["variants"]
    assert sorted(v["variant"] for v in chosen.values()) == ["folded", "materialised"]
    (fp32,) = [v for k, v in chosen.items() if "|float32|" in k]
    assert "folded not eligible: folded takes 16-bit inputs" in fp32["reason"]
    assert "not measured" in next(v for k, v in chosen.items() if "|bfloat16|" in k)["reason"]


def _fake_runners(calls):
    return {v: (lambda v=v: calls.append(v)) for v in merge_variants.VARIANTS}


def test_measured_choice_cached_in_memory_and_on_disk(variants):
    """First call: both variants timed, the fastest kept and written atomically; then memory; then disk."""
    calls, timed = [], []
    fake = {"folded": 2.0, "materialised": 1.0}

    def fake_time(fn, device):
        fn()
        timed.append(calls[-1])
        return fake[calls[-1]]

    variants.setattr(merge_variants, "time_ms", fake_time)
    dev = torch.device("cpu")
    assert merge_variants.choose("k1", _fake_runners(calls), {}, dev, measure=True)[0] == "materialised"
    assert sorted(timed) == ["folded", "materialised"]
    path = merge_variants.cache_path()
    assert path.startswith(os.environ["COMM_FAST_CACHE_DIR"])
    assert json.load(open(path))["k1"] == {"variant": "materialised", "times_ms": fake}
    assert os.listdir(os.path.dirname(path)) == ["merge_variants.json"]  # no temporary file left behind
    fake.update(folded=0.5)
    assert merge_variants.choose("k1", _fake_runners(calls), {}, dev, measure=True)[0] == "materialised"  # memory
    merge_variants.clear()
    variant, why = merge_variants.choose("k1", _fake_runners(calls), {}, dev, measure=True)
    assert (variant, len(timed)) == ("materialised", 2) and "cached in" in why  # from disk, not timed again
    assert merge_variants.choose("k2", _fake_runners(calls), {}, dev, measure=True)[0] == "folded"  # a new key
    assert set(json.load(open(path))) == {"k1", "k2"}
    runners = _fake_runners(calls)
    del runners["folded"]  # one eligible variant: nothing timed
    assert merge_variants.choose("k3", runners, {"folded": "table layout"}, dev, measure=True) == (
        "materialised", "the only eligible variant; folded not eligible: table layout")
    assert len(timed) == 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_choice(rank, port, cache, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), COMM_FAST_CACHE_DIR=f"{cache}/{rank}")
    os.environ.pop(merge_variants.ENV, None)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        calls = []
        prefer = "folded" if rank == 0 else "materialised"  # the ranks' timings disagree
        merge_variants.time_ms = lambda fn, device: (fn(), 1.0 if calls[-1] == prefer else 2.0)[1]
        results[rank] = merge_variants.choose("k", _fake_runners(calls), {}, torch.device("cpu"), measure=True)
    finally:
        torch.distributed.destroy_process_group()


def test_a_remembered_choice_is_dropped_when_it_cannot_run_the_call(variants):
    """A variant chosen earlier for a key (in memory, or in a stale cache file naming a variant that no
    longer exists) is not returned when it cannot run this call: the eligible ones are used or timed."""
    calls, dev = [], torch.device("cpu")
    assert merge_variants.choose("k", _fake_runners(calls), {}, dev, measure=False)[0] == "folded"
    runners = _fake_runners(calls)
    del runners["folded"]
    variant, why = merge_variants.choose("k", runners, {"folded": "strided rows"}, dev, measure=False)
    assert variant == "materialised" and "folded not eligible: strided rows" in why
    merge_variants.clear()
    path = merge_variants.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"stale": {"variant": "tiled", "times_ms": {}}}, f)
    variants.setattr(merge_variants, "time_ms", lambda fn, device: (fn(), 1.0)[1])
    variant, why = merge_variants.choose("stale", _fake_runners(calls), {}, dev, measure=True)
    assert variant in merge_variants.VARIANTS and why.startswith("measured fastest"), (variant, why)


def test_distributed_ranks_take_rank_0s_choice(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_choice, args=(_free_port(), str(tmp_path), results), nprocs=2, join=True)
        got = dict(results)
    assert got[0][0] == got[1][0] == "folded"
    assert "rank 0's choice" in got[1][1] and "rank 0's choice" not in got[0][1]
    assert os.path.exists(tmp_path / "0" / "merge_variants.json") and not os.path.exists(tmp_path / "1")


def test_bench_merge_variants_on_cpu(monkeypatch):
    """On a CPU the bench times no GPU variant: it prints the report's prediction, labelled as one, or says
    that there is none."""
    import sys
    import types

    from comm_fast import bench

    h, *params = _merge_inputs()
    shape = dict(M=3, N=4, D=8, L=2, dtype=torch.float32)
    monkeypatch.setitem(sys.modules, "comm_fast.kernel_report", None)  # absent: import fails
    runs, notes = bench._merge_variants(h, params, torch.device("cpu"), shape)
    assert runs == {} and notes == ["GPU variants (folded, materialised): no prediction, "
                                    "comm_fast.kernel_report is absent"]
    report = types.ModuleType("comm_fast.kernel_report")
    report.predict_variants = lambda op, s: {"folded": 1.25, "materialised": 1.5} if s == shape else {}
    monkeypatch.setitem(sys.modules, "comm_fast.kernel_report", report)
    assert bench._merge_variants(h, params, torch.device("cpu"), shape)[1] == [
        "prediction (comm_fast.kernel_report, not measured): folded 1.250 ms, materialised 1.500 ms"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("stacked", [True, False])
def test_merge_gradcheck_float64(backend, stacked, seed, variants, monkeypatch):
    """The op end to end (custom op, autograd registration, backward op). gradcheck perturbs through .data,
    which bumps no version counter: the derived-weight cache of the Triton path is off here."""
    from comm_fast.kernels import multilevel_merge as kernels

    monkeypatch.setattr(kernels, "_derived", lambda kind, tensors, dtype, build: build())
    L, D, N = 2, 5, 3
    h = [rand(L, 3, D).requires_grad_(True)] if stacked else [rand(3, D).requires_grad_(True) for _ in range(L)]
    params = [p.requires_grad_(True) for p in merge_params(L, D, N, torch.float64)]
    fn = lambda *t: ops.multilevel_merge(t[0] if stacked else list(t[:L]), *t[-5:], backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*h, *params), eps=1e-6, atol=1e-7, fast_mode=True)
