"""Helpers shared by the Triton kernel families: layer tables, dtypes, configs, allocation."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
import triton.testing

# Read once, when the kernels are defined: TRITON_INTERPRET must be set before that (conftest).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


def acc_dtype(dtype: torch.dtype):
    """Accumulation / statistics dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_fp32(dtype: torch.dtype) -> bool:
    """Feed tl.dot in the accumulation dtype: always for fp32/fp64 inputs, and for 16-bit inputs
    while interpreting (the interpreter multiplies raw bf16 bit patterns)."""
    return INTERPRET or dtype in (torch.float32, torch.float64)


def _tf32_matmul() -> bool:
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once fp32_precision has been set
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's TF32 switch so results match torch.matmul's accuracy."""
    if dtype == torch.float32 and not INTERPRET and _tf32_matmul():
        return "tf32"
    return "ieee"


def _quick_bench(kernel_call, quantiles):
    # 5 + 20 ms per config instead of triton's 25 + 100: the kernels run for milliseconds at most
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotune(gpu_configs, cpu_config, key):
    """Several configs on a GPU; exactly one otherwise (multi-config tuning needs a GPU benchmarker).
    COMM_FAST_TUNE_CONFIGS=N keeps the first N GPU configs (fewer compiles, e.g. for the GPU tests)."""
    if not ON_GPU:
        return triton.autotune(configs=[cpu_config], key=key)
    keep = int(os.environ.get("COMM_FAST_TUNE_CONFIGS", "0") or 0)
    configs = gpu_configs[:keep] if keep > 0 else gpu_configs
    return triton.autotune(configs=configs, key=key, do_bench=_quick_bench)


def _empty(shape, dtype, device):
    """Every buffer a kernel writes is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def empty(shape, dtype, device):
    return _empty(shape, dtype, device)


_TABLES: dict = {}


def _device_table(rows: tuple, device: torch.device) -> torch.Tensor:
    """The [L, 3] table on ``device``, cached by its contents: the offsets are relative to the first
    layer, so every call on views of one buffer of a given shape (the tower's case) reuses one table
    with no host-to-device copy (and none inside a captured CUDA graph once warmed up)."""
    key = (device, rows)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 256:  # lists of separate tensors give new offsets each call: bounded
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = torch.tensor(rows, dtype=torch.int64).to(device)
    return table


def layer_layout(layers: list[torch.Tensor]):
    """(base, rows, M2, keep, align): layer_table's addressing with the rows as a host tuple
    ((offset, stride1, stride2) per layer), for launchers that pass a uniform layout as scalars."""
    shape = layers[0].shape[:-1]
    dims = [i for i, n in enumerate(shape) if n != 1]

    def cuts(x):  # positions where neighbouring leading dims do not nest
        return {j for j in range(1, len(dims)) if x.stride(dims[j - 1]) != x.stride(dims[j]) * shape[dims[j]]}

    cut = set().union(*(cuts(x) for x in layers))
    if len(cut) > 1:
        layers, cut = [x.contiguous() for x in layers], set()
    j = min(cut) if cut else 0
    outer, inner = dims[:j], dims[j:]
    m2 = 1
    for i in inner:
        m2 *= shape[i]
    base = layers[0]
    esize = base.element_size()
    rows = []
    for x in layers:
        delta = x.data_ptr() - base.data_ptr()
        assert delta % esize == 0, "layers of one dtype are element-aligned"
        rows.append((delta // esize, x.stride(outer[-1]) if outer else 0, x.stride(inner[-1]) if inner else 0))
    vec = max(1, 16 // esize)
    ok = base.data_ptr() % 16 == 0 and base.shape[-1] % vec == 0 and all(v % vec == 0 for r in rows for v in r)
    return base, tuple(rows), max(m2, 1), layers, (vec if ok else 1)


def layer_table(layers: list[torch.Tensor]):
    """(base, table, M2, keep, align): the layers addressed from one base pointer, no stack copy.

    Row m of layer l starts at base + table[l, 0] + (m // M2) * table[l, 1] + (m % M2) * table[l, 2]
    (int64 table on the layers' device): two row strides cover [B, T, D] with a strided token axis.
    Leading dims that need more strides are copied (the copies are kept alive in `keep`).
    align: an element count every row start is a multiple of (for vector loads).
    """
    base, rows, m2, keep, align = layer_layout(layers)
    return base, _device_table(rows, base.device), m2, keep, align


@triton.jit
def layer_rows(tab_ptr, l, r1, r2, ALIGN: tl.constexpr):
    """Element offsets (from base) of the rows (r1, r2) = (m // M2, m % M2) in layer l."""
    off = tl.load(tab_ptr + 3 * l) + r1 * tl.load(tab_ptr + 3 * l + 1) + r2 * tl.load(tab_ptr + 3 * l + 2)
    return tl.multiple_of(off, ALIGN)


# The interpreter casts fp32 -> bf16 by truncation (triton 3.6-3.9); compiled code rounds to nearest
# even (cvt.rn). Stores go through cast_to so that CPU tests see the rounding the GPU does.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` rounded to nearest even."""
    if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # round the upper half; truncation keeps it
        x = tl.where(x32 != x32, x32, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(DTYPE)
