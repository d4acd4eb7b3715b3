"""kernels/_utils.py: the device layer tables and the rounding of stores."""
import pytest
import torch
import triton
import triton.language as tl

from comm_fast.kernels import _utils


def test_layer_table_is_reused_for_views_of_one_buffer(H):
    """The tower's case: no new table (no host-to-device copy) for a fresh buffer of the same shape."""

    first, second = (H.rand(4, 2, 9, 16)[:, :, 1:] for _ in range(2))
    base, table, m2, _, _ = _utils.layer_table(list(first.unbind(0)))
    assert _utils.layer_table(list(second.unbind(0)))[1] is table
    assert base.data_ptr() == first.data_ptr() and m2 == 8
    assert table.tolist() == [[l * 2 * 9 * 16, 9 * 16, 16] for l in range(4)]


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, _utils.cast_to(tl.load(x_ptr + offs, mask=mask), y_ptr.dtype.element_ty), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, fp16 -> inf
def test_stores_round_to_nearest_even_like_torch(seed):
    """fp32 -> bf16 / fp16 stores give torch's (and the GPU's) round-to-nearest-even bits, ties, halfway
    cases, infinities, NaN and the overflow to inf included (the interpreter alone would truncate;
    bf16 subnormals, below 1.2e-38, are left to the interpreter's own conversion)."""
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895e38, -3.3895e38, float("inf"),
                         -float("inf"), float("nan"), 0.0, -0.0])
    x = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,)), ties])
    for dtype in (torch.bfloat16, torch.float16):
        y = torch.empty(x.numel(), dtype=dtype)
        _cast_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
        want = x.to(dtype)
        assert torch.equal(y.isnan(), want.isnan())
        ok = y.isnan() | (y.view(torch.int16) == want.view(torch.int16))
        assert ok.all(), (x[~ok][:5], y[~ok][:5], want[~ok][:5])


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_autotune_configs_and_benchmarker(monkeypatch):
    """One config while interpreting; on a GPU every config (or the first COMM_FAST_TUNE_CONFIGS), timed
    for 5 + 20 ms each rather than triton's 25 + 100."""
    configs = [triton.Config({"BLOCK": b}) for b in (64, 128, 256)]
    cpu = triton.Config({"BLOCK": 32})
    assert _utils.autotune(configs, cpu, key=["n"])(_copy_kernel).configs == [cpu]
    monkeypatch.setattr(_utils, "ON_GPU", True)
    tuned = _utils.autotune(configs, cpu, key=["n"])(_copy_kernel)
    assert tuned.configs == configs and tuned.do_bench is _utils._quick_bench
    monkeypatch.setenv("COMM_FAST_TUNE_CONFIGS", "2")
    assert _utils.autotune(configs, cpu, key=["n"])(_copy_kernel).configs == configs[:2]


def test_fp32_dot_precision_follows_torch_tf32_switch(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRET", False)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert _utils.dot_precision(torch.float32) == "tf32" and _utils.dot_precision(torch.bfloat16) == "ieee"
        matmul.allow_tf32 = False
        assert _utils.dot_precision(torch.float32) == "ieee"
        if hasattr(matmul, "fp32_precision"):  # the newer switch (reading allow_tf32 then raises)
            matmul.fp32_precision = "tf32"
            assert _utils.dot_precision(torch.float32) == "tf32"
            matmul.fp32_precision = "none"
    finally:
        matmul.allow_tf32 = before
