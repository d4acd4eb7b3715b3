"""Compiled Triton kernels on a CUDA GPU at the real sizes (pytest -m gpu; skipped without a GPU).

CLIP ViT-L/14 at 336: L = 24, D = 1024, 576 patch tokens (CLS dropped from 577), batch 32, bf16;
DINOv2 merge: L = 6 (CLS + 4 register tokens dropped). References in float64 on the GPU; the
accuracy rule is the CPU tests' one (tests/accuracy.py: 2x PyTorch's own bf16 error plus one bf16 ulp of
the scale; d alpha also one fp32 ulp of its Σ|terms|).
"""
import pytest
import torch

import accuracy
from accuracy import check, compare, ref_lnws, ref_merge, ref_mlp
from comm_fast import _backend, ops

pytestmark = pytest.mark.gpu
DEV = "cuda"


def rand(*shape, dtype=torch.bfloat16, **kw):
    return accuracy.rand(*shape, dtype=dtype, device=DEV, **kw)


def merge_params(L, D, N):
    return [rand(L, D, scale=0.1, shift=1.0), rand(L, D, scale=0.1), rand(L, N, D, scale=D ** -0.5),
            rand(L, N, scale=0.1), torch.full((L,), 1.0 / L, device=DEV, dtype=torch.bfloat16)]


@pytest.mark.parametrize("L,T,drop", [(24, 577, 1), (6, 581, 5)])  # CLIP; DINOv2 with 4 registers


def test_merge_real_size(L, T, drop, seed):
    full = rand(L, 32, T, 1024, scale=2.0, shift=0.3)
    params = merge_params(L, 1024, 1024)
    view = lambda ls: ls[0][:, :, drop:]  # noqa: E731
    out = ops.multilevel_merge(view([full]), *params)
    assert _backend.last_used()["multilevel_merge"]["backend"] == "triton"
    grad = rand(32, T - drop, 1024)
    kernel = lambda ls, ps: ops.multilevel_merge(view(ls), *ps)  # noqa: E731
    ref = lambda ls, ps: ref_merge(list(view(ls).unbind(0)), *ps)  # noqa: E731
    terms = accuracy.alpha_terms(list(view([full]).unbind(0)), *params[:2], grad, *params[2:4])
    k_out, _, _ = compare(kernel, ref, [full], params, grad, torch.bfloat16,
                          ["dh", "d ln_weight", "d ln_bias", "d weight", "d bias", "d alpha"], terms)
    torch.testing.assert_close(out, k_out, rtol=0, atol=0)  # deterministic

def test_layernorm_weighted_sum_real_size(seed):
    layers = [rand(32, 577, 1024, scale=2.0)[:, 1:] for _ in range(24)]  # a list: no stack copy
    params = merge_params(24, 1024, 1)
    params = [params[0], params[1], params[4]]
    grad = rand(32, 576, 1024)
    kernel = lambda ls, ps: ops.layernorm_weighted_sum(ls, *ps)  # noqa: E731
    ref = lambda ls, ps: ref_lnws(ls, *ps)  # noqa: E731
    names = [f"dh[{i}]" for i in range(24)] + ["d ln_weight", "d ln_bias", "d alpha"]
    compare(kernel, ref, layers, params, grad, torch.bfloat16, names, accuracy.alpha_terms(layers, *params[:2], grad))

def test_fused_mlp_real_size(seed):
    x = rand(32, 576, 1024)
    params = [rand(4096, 1024, scale=1024 ** -0.5), rand(4096, scale=0.1), rand(1024, 4096, scale=4096 ** -0.5),
              rand(1024, scale=0.1)]
    grad = rand(32, 576, 1024)
    kernel = lambda ls, ps: ops.fused_mlp(ls[0], *ps, "gelu")  # noqa: E731
    ref = lambda ls, ps: ref_mlp(ls[0], *ps)  # noqa: E731
    compare(kernel, ref, [x], params, grad, torch.bfloat16, ["dx", "dw1", "db1", "dw2", "db2"])
    assert _backend.last_used()["fused_mlp"]["backend"] == "triton"

def test_autotuning_ran(monkeypatch):
    from comm_fast.kernels import _utils, fused_mlp, multilevel_merge
    monkeypatch.setenv("COMM_FAST_MERGE_VARIANT", "folded")
    ops.multilevel_merge(rand(4, 2, 200, 256), *merge_params(4, 256, 256))
    ops.fused_mlp(rand(300, 256), rand(512, 256), rand(512), rand(256, 512), rand(256))
    dtype = rand(1).dtype
    mlp = fused_mlp._TUNERS[fused_mlp._configs(dtype, fused_mlp.EPI_BIAS_ACT, _utils.dot_precision(dtype))]
    for tuner in (multilevel_merge._folded, mlp):
        assert len(tuner.configs) > 1 and tuner.cache, "several configs benchmarked on the GPU"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])


def test_other_dtypes(dtype, seed):
    full = rand(5, 3, 51, 200, dtype=dtype, scale=2.0)
    params = [p.to(dtype) for p in merge_params(5, 200, 96)]
    out = ops.multilevel_merge(full[:, :, 1:], *params)
    r = ref_merge(list(full[:, :, 1:].double().unbind(0)), *[p.double() for p in params])
    t = ref_merge(list(full[:, :, 1:].unbind(0)), *params)
    check("out", out, r, t)


def test_compile_fullgraph(seed):
    h = rand(6, 2, 65, 256, scale=2.0)
    p = [t.requires_grad_(True) for t in merge_params(6, 256, 256)]
    m = [rand(512, 256, scale=0.06).requires_grad_(True), rand(512).requires_grad_(True),
         rand(256, 512, scale=0.04).requires_grad_(True), rand(256).requires_grad_(True)]

    def tower_like(h, lw, lb, w, b, a, w1, b1, w2, b2):
        v1 = ops.multilevel_merge(h[:, :, 1:], lw, lb, w, b, a)
        v2 = ops.layernorm_weighted_sum(h[:, :, 1:], lw, lb, torch.softmax(a.float(), 0).to(a.dtype))
        return v1 + ops.fused_mlp(v2, w1, b1, w2, b2)

    compiled = torch.compile(tower_like, fullgraph=True)
    out = compiled(h, *p, *m)
    ref = tower_like(h, *p, *m)
    torch.testing.assert_close(out, ref)
    g, rg = torch.autograd.grad(out.float().sum(), p + m), torch.autograd.grad(ref.float().sum(), p + m)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)


def test_opcheck_cuda(seed):
    h = rand(3, 2, 5, 64).requires_grad_(True)
    p = [t.requires_grad_(True) for t in merge_params(3, 64, 32)]
    m = [rand(96, 64).requires_grad_(True), rand(96).requires_grad_(True), rand(32, 96).requires_grad_(True),
         rand(32).requires_grad_(True)]
    torch.library.opcheck(torch.ops.comm_fast.multilevel_merge.default, ([h], True, *p, 1e-5, "triton"))
    torch.library.opcheck(torch.ops.comm_fast.multilevel_merge.default, (list(h.unbind(0)), False, *p, 1e-5, "triton"))
    torch.library.opcheck(torch.ops.comm_fast.layernorm_weighted_sum.default,
                          ([h], True, p[0], p[1], p[4], 1e-5, "triton"))
    torch.library.opcheck(torch.ops.comm_fast.fused_mlp.default,
                          (rand(10, 64).requires_grad_(True), *m, "gelu", True, "triton"))


@pytest.mark.parametrize("variant,dtype,tf32", [("folded", torch.bfloat16, False), ("materialised", torch.bfloat16, False),
                                                ("materialised", torch.float32, True)])
def test_merge_large_mean(variant, dtype, tf32, seed, monkeypatch):
    """Rows of mean ±100·std, each variant forced; fp32 with TF32 on (materialised normalises first, so
    TF32 loses no more than in torch's own fp32 Linear under the same switch)."""
    monkeypatch.setenv("COMM_FAST_MERGE_VARIANT", variant)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    L, M, D, N = 6, 1000, 1024, 512
    sign = torch.randint(0, 2, (L, M, 1), device=DEV).double() * 2 - 1
    h = (torch.randn(L, M, D, device=DEV, dtype=torch.float64) + 100 * sign).to(dtype)
    params = [p.to(dtype) for p in merge_params(L, D, N)]
    out = ops.multilevel_merge(h, *params)
    assert variant in _backend.last_used()["multilevel_merge"]["reason"]
    r = ref_merge(list(h.double().unbind(0)), *[p.double() for p in params])
    check("out", out, r, ref_merge(list(h.unbind(0)), *params))
