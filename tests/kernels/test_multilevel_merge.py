"""Triton one-GEMM multilevel merge (both forward variants and the backward) through the interpreter
against float64 references."""
import os

import pytest
import torch

from comm_fast.kernels import multilevel_merge as mm
from comm_fast.kernels.multilevel_merge import merge_backward, merge_forward

EPS = 1e-5
CASES = [  # L, leading dims, D, N (= D_out), dtype, layout
    (1, (3, 7), 37, 45, torch.float32, "stacked"),
    (3, (2, 9), 40, 33, torch.bfloat16, "strided"),
    (30, (10,), 19, 17, torch.float16, "stacked"),
    (7, (10,), 19, 17, torch.float32, "list"),
    (4, (2, 5), 24, 50, torch.float16, "list_strided"),
    (5, (37,), 33, 20, torch.bfloat16, "list"),
    (2, (2, 6), 48, 40, torch.float64, "strided"),
    (6, (3, 4), 20, 36, torch.bfloat16, "stacked"),
]


def _variants(layers):
    return [v for v in mm.VARIANTS if v != "folded" or mm.folded_eligible(layers)[0]]


class _Merge(torch.autograd.Function):
    """The launchers as the custom op uses them: forward saves inputs + stats only."""

    @staticmethod
    def forward(ctx, variant, lw, lb, w, b, a, *layers):
        out, mean, rstd = merge_forward(list(layers), lw, lb, w, b, a, EPS, variant)
        ctx.save_for_backward(mean, rstd, lw, lb, w, b, a, *layers)
        return out

    @staticmethod
    def backward(ctx, grad):
        mean, rstd, lw, lb, w, b, a, *layers = ctx.saved_tensors
        dh, *rest = merge_backward(grad, layers, mean, rstd, lw, lb, w, b, a, need_h=True)
        return (None, *rest, *dh.unbind(0))


def _params(H, L, D, N, dtype):
    return [H.rand(L, D, dtype=dtype, scale=0.5, shift=1.0), H.rand(L, D, dtype=dtype),
            H.rand(L, N, D, dtype=dtype, scale=D ** -0.5), H.rand(L, N, dtype=dtype), H.rand(L, dtype=dtype)]


def _names(n_leaves):
    return [f"dh[{i}]" for i in range(n_leaves)] + ["d ln_weight", "d ln_bias", "d weight", "d bias", "d alpha"]


@pytest.mark.parametrize("L,lead,D,N,dtype,layout", CASES)
def test_forward_backward(L, lead, D, N, dtype, layout, seed, H, poison):
    """Every eligible variant: output (into a poisoned buffer) and, for the first, every grad."""
    leaves, build = H.hidden(L, lead, D, dtype, layout)
    params = _params(H, L, D, N, dtype)
    layers = build(leaves)[1]
    variants = _variants(layers)
    if not layout.startswith("list"):  # one buffer: folded wherever the dtype allows
        assert ("folded" in variants) == (dtype != torch.float32)
    grad = H.rand(*lead, N, dtype=dtype)
    lw, lb, w, b, _ = params
    r_out = H.ref_merge([x.double() for x in layers], *[p.double() for p in params], EPS)
    t_out = None if dtype == torch.float64 else H.ref_merge(layers, *params, EPS)
    for i, variant in enumerate(variants):
        out = poison((*lead, N), dtype, "cpu")
        res, mean, rstd = merge_forward(layers, *params, EPS, variant, out=out)
        assert res is out and mean.shape == rstd.shape == (L, out.numel() // N)
        H.check(f"out ({variant}, preallocated)", out, r_out, t_out)
        if i == 0:  # every grad, once: the backward does not depend on the forward variant
            H.compare(lambda ls, ps: _Merge.apply(variant, *ps, *build(ls)[1]),
                      lambda ls, ps: H.ref_merge(build(ls)[1], *ps, EPS), leaves, params, grad, dtype,
                      _names(len(leaves)), H.alpha_terms(layers, lw, lb, grad, w, b, EPS))


def _large_mean(H, L, M, D, dtype, ratio):
    """Rows of mean ±ratio·std (std 1): ViT outlier channels give |mean|/std ~ 100."""
    sign = torch.randint(0, 2, (L, M, 1), dtype=torch.float64) * 2 - 1
    return [(torch.randn(L, M, D, dtype=torch.float64) + ratio * sign * (1 + torch.rand(L, M, 1))).to(dtype)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ratio", [10.0, 100.0])
def test_large_mean(dtype, ratio, seed, H, poison):
    L, M, D, N = 3, 29, 64, 24
    (h,) = _large_mean(H, L, M, D, dtype, ratio)
    layers = list(h.unbind(0))
    params = _params(H, L, D, N, dtype)
    r_out = H.ref_merge([x.double() for x in layers], *[p.double() for p in params], EPS)
    t_out = H.ref_merge(layers, *params, EPS)
    assert _variants(layers) == (["folded", "materialised"] if dtype == torch.bfloat16 else ["materialised"])
    for variant in _variants(layers):
        H.check(f"out ({variant})", merge_forward(layers, *params, EPS, variant)[0], r_out, t_out)


def test_folded_refuses_fp32_and_table_layouts(H):
    params = _params(H, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="variant: folded takes 16-bit .* not torch.float32"):
        merge_forward(list(H.rand(2, 3, 16).unbind(0)), *params, EPS, "folded")
    layers = [H.rand(3, 16, dtype=torch.bfloat16) for _ in range(3)]
    ok, why = mm.folded_eligible(layers)
    assert not ok and "uniform stride" in why
    with pytest.raises(ValueError, match="variant: expected one of"):
        merge_forward(layers, *params, EPS, "on-load")


@pytest.mark.parametrize("variant", ["folded", "materialised"])
def test_accumulate_into_strided_out(variant, seed, H, poison):
    """out (+)= merge, out a column slice of a wider buffer (one row stride): the GEMM adds into C."""
    L, lead, D, N = 3, (2, 5), 24, 20
    leaves, build = H.hidden(L, lead, D, torch.float64, "strided")
    layers = build(leaves)[1]
    params = _params(H, L, D, N, torch.float64)
    wide = H.rand(*lead, 2 * N + 3, dtype=torch.float64)
    before = wide.clone()
    out = wide[..., 1:N + 1]
    ref = H.ref_merge(layers, *params, EPS)
    assert merge_forward(layers, *params, EPS, variant, out=out, accumulate=True)[0] is out
    H.check("out += merge", out, before[..., 1:N + 1] + ref)
    assert torch.equal(wide[..., 0], before[..., 0]) and torch.equal(wide[..., N + 1:], before[..., N + 1:])
    merge_forward(layers, *params, EPS, variant, out=out)
    H.check("out = merge", out, ref)


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
    for variant in mm.VARIANTS:
        out, mean, rstd = merge_forward(layers, lw, lb, shared.expand(L, N, D), b, a, EPS, variant)
        H.check(f"out ({variant})", out, H.ref_merge(layers, lw, lb, shared.expand(L, N, D), b, a, EPS))
    grad = H.rand(2, 5, N, dtype=torch.float64)
    dW = merge_backward(grad, layers, mean, rstd, lw, lb, shared.expand(L, N, D), b, a)[3]
    W = shared.expand(L, N, D).clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(H.ref_merge(layers, lw, lb, W, b, a, EPS), [W], grad)
    H.check("d weight", dW, ref)


def test_gradcheck_float64(seed, H, monkeypatch):
    """Folded (the forward furthest from the reference's formula; the backward is shared). gradcheck
    perturbs the inputs through .data, which bumps no version counter: the derived-weight cache is off."""
    monkeypatch.setattr(mm, "_derived", lambda kind, tensors, dtype, build: build())
    variant, L, D, N = "folded", 2, 5, 4
    h = H.rand(L, 3, D, dtype=torch.float64).requires_grad_(True)
    params = [p.requires_grad_(True) for p in _params(H, L, D, N, torch.float64)]
    assert torch.autograd.gradcheck(lambda h, *ps: _Merge.apply(variant, *ps, *h.unbind(0)), (h, *params),
                                    eps=1e-6, atol=1e-7, fast_mode=True)


def test_folded_weights_cached_by_version_and_identity(seed, H):
    L, D, N = 3, 8, 5
    params = _params(H, L, D, N, torch.float32)
    wf, c, b = mm.folded_weights(*params, torch.bfloat16)
    assert wf.dtype == torch.bfloat16 and torch.equal(c, wf.float().sum(-1))  # c from the rounded W′
    lw, lb, w, bias, a = [p.double() for p in params]
    torch.testing.assert_close(wf.double(), (a[:, None, None] * w * lw[:, None, :]), rtol=2 ** -8, atol=0)
    torch.testing.assert_close(b.double(), a @ (torch.einsum("lnd,ld->ln", w, lb) + bias), rtol=1e-5, atol=1e-6)
    assert mm.folded_weights(*params, torch.bfloat16)[0] is wf  # unchanged parameters: the cached tensors
    params[0].mul_(2)  # an in-place update (an optimizer step) bumps ._version
    wf2 = mm.folded_weights(*params, torch.bfloat16)[0]
    assert wf2 is not wf
    torch.testing.assert_close(wf2.float(), 2 * wf.float(), rtol=2 ** -7, atol=0)
    params[4] = params[4].clone()  # replaced by another tensor (same values): recomputed
    wf3 = mm.folded_weights(*params, torch.bfloat16)[0]
    assert wf3 is not wf2
    params[2].data = 3 * params[2].data  # re-pointed as Module.to does: same identity and version
    wf4 = mm.folded_weights(*params, torch.bfloat16)[0]
    torch.testing.assert_close(wf4.float(), 3 * wf3.float(), rtol=2 ** -7, atol=0)
    sl = slice(1, 2)  # per-layer slices (new view objects every call, as in a streaming merge) hit
    one = mm.folded_weights(*[p[sl] for p in params], torch.bfloat16)[0]
    assert mm.folded_weights(*[p[sl] for p in params], torch.bfloat16)[0] is one
    params[2][0].add_(1)  # a write through another view of the base bumps the shared version
    assert mm.folded_weights(*[p[sl] for p in params], torch.bfloat16)[0] is not one
    with torch.inference_mode():  # inference tensors track no version: never cached
        inf = [p.clone() for p in params]
        assert mm.folded_weights(*inf, torch.bfloat16)[0] is not mm.folded_weights(*inf, torch.bfloat16)[0]


def _sparse(path, numel, dtype):
    """A file-backed tensor of ``numel`` elements that occupies neither disk nor memory until touched."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return torch.from_file(str(path), shared=False, size=numel, dtype=dtype)


@pytest.mark.parametrize("variant", ["folded", "materialised"])
def test_offsets_past_2_31(variant, tmp_path, seed, H, poison):
    """Layers of h and of weight 2**30 + 64 elements apart: layer 2 starts 2**31 + 128 elements from
    layer 0, so an int32 l·stride wraps (a wrapped read crashes the interpreter). The storage is a sparse
    file: only the rows read are ever touched."""
    L, M, D, N, stride = 3, 5, 16, 12, 2 ** 30 + 64
    h = _sparse(tmp_path / "h.bin", (L - 1) * stride + M * D, torch.float16).as_strided((L, M, D), (stride, D, 1))
    weight = _sparse(tmp_path / "w.bin", (L - 1) * stride + N * D, torch.float16).as_strided((L, N, D),
                                                                                             (stride, D, 1))
    params = _params(H, L, D, N, torch.float16)
    for l in range(L):
        h[l] = H.rand(M, D, dtype=torch.float16, scale=2.0, shift=0.5)
        weight[l] = params[2][l]
    dense = h.clone()
    params[2] = weight
    layers = list(h.unbind(0))
    assert mm.uniform_layout(layers)[1] == stride
    out, mean, rstd = merge_forward(layers, *params, EPS, variant)
    H.check("out", out, H.ref_merge([x.double() for x in dense.unbind(0)], *[p.double() for p in params], EPS),
            H.ref_merge(list(dense.unbind(0)), *params, EPS))
    grad = H.rand(M, N, dtype=torch.float16)
    got = merge_backward(grad, layers, mean, rstd, *params)
    want = merge_backward(grad, list(dense.unbind(0)), mean, rstd, *params)
    for name, g, w in zip(["dh", "d ln_weight", "d ln_bias", "d weight", "d bias", "d alpha"], got, want):
        assert torch.equal(g, w), name


def test_report_entries_follow_the_protocol():
    shapes = {"merge": [dict(name="clip", M=18432, N=1024, D=1024, L=24), dict(name="dino", M=18432, N=1024,
                                                                                D=1024, L=6)],
              "dtypes": ["bf16", "fp16", "fp32"], "tune_configs": None}
    entries = mm.report_entries(shapes)
    keys = {"name", "kernel", "variant", "dtype", "shape", "config", "fn", "signature", "constexprs", "divisible",
            "num_warps", "num_stages", "launchable", "gemm", "model"}
    assert len({e["name"] for e in entries}) == len(entries)
    for e in entries:
        assert keys <= set(e) and e["name"].startswith(e["kernel"] + "/"), e["name"]
        assert set(e["signature"]) == set(e["fn"].arg_names)
        assert {k for k, v in e["signature"].items() if v == "constexpr"} == set(e["constexprs"])
        assert set(e["divisible"]) <= set(e["signature"]) - set(e["constexprs"])
    gemms = [e for e in entries if e["gemm"]]
    assert {e["dtype"] for e in gemms} == {"bf16", "fp16"}  # folded is not launched for fp32
    assert len(gemms) == 2 * 2 * 2 * len(mm._FOLDED_CONFIGS)  # shapes x 16-bit dtypes x ACCUMULATE x configs
    for e in gemms:  # the promotion (the main loop's conditional block) runs at each layer's last K step
        assert e["model"]["conditional_every"] == 1024 // e["constexprs"]["BLOCK_K"], e["name"]
    assert len([e for e in mm.report_entries(dict(shapes, tune_configs=2)) if e["gemm"]]) == 2 * 2 * 2 * 2
    assert {e["variant"] for e in entries if e["kernel"] == "merge_normalise"} == {"folded", "materialised", ""}
