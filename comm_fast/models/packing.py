"""Attention over packed rows (several samples in one row, flash-attn varlen convention: ``position_ids``
restart at 0 at each sample, no ``attention_mask``), registered with transformers' attention interface.

Each sample attends causally within itself only. Three ways to compute it, one result:

- ``loop``: one causal SDPA call per sample, the reference and the CPU path;
- ``nested``: one SDPA call on nested (jagged) tensors, which runs FlashAttention's varlen kernel for
  fp16/bf16 CUDA tensors and the memory-efficient varlen kernel for fp32 (CUDA only: the CPU math
  kernel of nested SDPA has no causal mask);
- ``flex``: FlexAttention with a document mask (compiled on CUDA; on CPU eager and forward only).

``auto`` (the default) is ``nested`` on CUDA and ``loop`` elsewhere (should the fused call raise, auto warns
once and runs the loop from then on, recorded as such); ``COMM_FAST_PACKED_ATTENTION`` overrides it. flash-attn's own varlen kernel is used instead of all three when flash-attn imports
(``attention_implementation`` then returns "flash_attention_2" and the rows are flattened into one).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from comm_fast import _backend

VARLEN_SDPA = "comm_sdpa_varlen"
ENV = "COMM_FAST_PACKED_ATTENTION"
METHODS = ("auto", "loop", "nested", "flex")
OP = "packed_attention"  # the name under which the method that ran is recorded (comm_fast.info(), profile)

_FAILED: dict[str, str] = {}  # fused methods that raised here under auto, and why (auto then runs the loop)
_WHY = {
    "loop": "one causal SDPA call per sample",
    "nested": "one SDPA call on nested jagged tensors (FlashAttention varlen for fp16/bf16, memory-efficient "
              "varlen for fp32)",
    "flex": "FlexAttention with a document mask",
}


@functools.lru_cache(maxsize=None)
def attention_implementation() -> str:
    """"flash_attention_2" when flash-attn imports, else SDPA ("comm_sdpa_varlen": transformers' SDPA
    path, plus varlen attention for packed rows; plain "sdpa" where it cannot be registered)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return VARLEN_SDPA if _register_varlen_sdpa() else "sdpa"
    return "flash_attention_2"


def _register_varlen_sdpa() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
    return True


def requested_method(method: str | None = None) -> str:
    """The method asked for: the argument, else COMM_FAST_PACKED_ATTENTION, else "auto"."""
    name = method if method is not None else os.environ.get(ENV, "auto")
    name = (name or "auto").strip().lower()
    if name not in METHODS:
        source = "method" if method is not None else ENV
        raise ValueError(f"{source}: expected one of {METHODS}, got {name!r}")
    return name


def resolve_method(device: torch.device | str, method: str | None = None, dropout: float = 0.0) -> tuple[str, str]:
    """(method, why) for packed attention on ``device``; a clear error for a method that cannot run there."""
    name = requested_method(method)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return "nested", _WHY["nested"] + " (auto on CUDA)"
        return "loop", _WHY["loop"] + f" (auto on {device.type}: nested SDPA has no causal kernel there)"
    if name == "nested" and device.type != "cuda":
        raise ValueError(f"{ENV}=nested needs CUDA tensors (nested SDPA has no causal {device.type} kernel), "
                         f"got {device.type}; use loop or auto")
    if name == "flex" and dropout > 0:
        raise ValueError(f"{ENV}=flex: FlexAttention has no attention dropout, got dropout={dropout}; "
                         "use nested or loop, or attention_dropout=0")
    return name, _WHY[name] + (" (requested)" if method is None else "")


def describe() -> dict:
    """What packed rows run on each device under the current setting (for comm_fast.info())."""
    out = {"requested": requested_method(), "llm_attention": attention_implementation()}
    for dev in ("cpu", "cuda"):
        try:
            name, why = resolve_method(dev)
        except ValueError as exc:
            name, why = "error", str(exc)
        out[dev] = {"backend": name, "reason": why}
    if out["llm_attention"] == "flash_attention_2":
        for dev in ("cpu", "cuda"):
            out[dev] = {"backend": "flash_attention_2", "reason": "flash-attn varlen over the flattened rows"}
    return out


def varlen_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA that, for packed rows, attends within each sample only (``packed_attention``).

    The samples of a packed row are contiguous and start where the position ids restart at 0 (a row's
    padding tail is a sample of its own, whose outputs nothing reads), so the flattened rows are one
    variable-length batch: the work is sum(len^2), with no padding anywhere. Anything else (padded
    batches, decoding with a cache) goes to transformers' SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = kwargs.pop("comm_packed", False)  # set by COMMForCausalLM.forward for packed rows only
    lengths = kwargs.pop("comm_lengths", None)  # the samples' lengths along the flattened rows, if known
    pos = kwargs.get("position_ids")
    b, h, t, d = query.shape
    if not packed or pos is None or key.shape[2] != t or pos.shape[-1] != t:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if lengths is None:
        lengths = sample_lengths(pos.expand(b, t))

    def flat(x):  # [B, H, T, D] (a transpose of [B, T, H, D]) -> [B*T, H, D], a view
        return x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[-1])

    out = packed_attention(flat(query), flat(key), flat(value), lengths, scale=scaling,
                           dropout=dropout if module.training else 0.0)
    return out.reshape(b, t, h, d), None


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float | None = None,
                     dropout: float = 0.0, method: str | None = None) -> torch.Tensor:
    """Causal attention within each sample of packed tokens.

    q ``[N, H, D]``, k and v ``[N, Hkv, D]`` (H a multiple of Hkv: grouped-query attention), the samples
    contiguous along N with ``lengths`` summing to N; returns ``[N, H, D]``. ``method``: see the module
    docstring (None: COMM_FAST_PACKED_ATTENTION, else auto).
    """
    n, h, d = q.shape
    if k.shape[0] != n or v.shape[0] != n or h % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"packed_attention: expected q [N, H, D] and k, v [N, Hkv, D] with H a multiple of Hkv, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if sum(lengths) != n or min(lengths, default=0) < 1:
        raise ValueError(f"packed_attention: lengths must be positive and sum to {n} tokens, got {list(lengths)}")
    name, why = resolve_method(q.device, method, dropout)
    auto = requested_method(method) == "auto"
    if auto and name in _FAILED:
        name, why = "loop", _WHY["loop"] + f" (auto: {_FAILED[name]})"
    try:
        out = _METHODS[name](q, k, v, list(lengths), scale, dropout)
    except (RuntimeError, NotImplementedError) as exc:
        if not auto or name == "loop" or isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        # auto only: this torch build cannot run the fused call here; the loop from now on, said so
        _FAILED[name] = f"{name} failed on {q.device.type} ({type(exc).__name__}: {str(exc)[:160]})"
        _backend.warn_once(f"{OP}:{name}", f"packed attention: {_FAILED[name]}; using the per-sample loop "
                                           f"(set {ENV} to choose)")
        return packed_attention(q, k, v, lengths, scale, dropout, method)
    _backend.record(OP, name, why)
    return out


def _heads_first(x):  # [N, H, D] -> [1, H, N, D], a view
    return x.transpose(0, 1).unsqueeze(0)


def _repeat_kv(x, h):  # [N, Hkv, D] -> [N, H, D]: each kv head serves H / Hkv query heads, in order
    return x if x.shape[1] == h else x.repeat_interleave(h // x.shape[1], dim=1)


def _loop(q, k, v, lengths, scale, dropout):
    gqa = q.shape[1] != k.shape[1]  # SDPA maps query heads to kv heads itself: no repeated K/V copies
    parts = [F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, dropout_p=dropout,
                                            enable_gqa=gqa)
             for qs, ks, vs in zip(*(_heads_first(x).split(lengths, dim=2) for x in (q, k, v)))]
    return torch.cat(parts, dim=2)[0].transpose(0, 1)


@functools.lru_cache(maxsize=16)
def _offsets(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[S + 1] int64 start offsets on ``device``: one host-to-device copy per batch, not per layer."""
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device)


def _nested(q, k, v, lengths, scale, dropout, causal=True):
    """(``causal=False`` only lets CPU tests check the nested tensors' layout through the math kernel.)"""
    h = q.shape[1]
    offsets = _offsets(tuple(lengths), q.device)

    def njt(x):  # [N, H, D] -> nested [S, H, j, D], sharing x's storage
        nt = torch.nested.nested_tensor_from_jagged(x, offsets, min_seqlen=min(lengths), max_seqlen=max(lengths))
        return nt.transpose(1, 2)

    out = F.scaled_dot_product_attention(njt(q), njt(_repeat_kv(k, h)), njt(_repeat_kv(v, h)), is_causal=causal,
                                         scale=scale, dropout_p=dropout)
    return out.transpose(1, 2).values()


@functools.lru_cache(maxsize=16)
def _document_mask(lengths: tuple[int, ...], device: torch.device):
    """FlexAttention's block mask for causal attention within each sample (built once per set of lengths)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))

    def within_sample_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    n = len(doc)
    return create_block_mask(within_sample_causal, None, None, n, n, device=device)


@functools.lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    """flex_attention compiled on CUDA (eager flex is a reference that materialises the scores); eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None) if device_type == "cuda" else flex_attention


def _flex(q, k, v, lengths, scale, dropout):
    assert dropout == 0.0  # resolve_method refuses it
    mask = _document_mask(tuple(lengths), q.device)
    out = _flex_kernel(q.device.type)(*(_heads_first(x) for x in (q, k, v)), block_mask=mask, scale=scale,
                                      enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


_METHODS = {"loop": _loop, "nested": _nested, "flex": _flex}


def sample_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the samples of packed rows, in order along the flattened rows (each starts at position 0)."""
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return [e - s for s, e in zip(starts, starts[1:] + [position_ids.numel()])]


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool mask (True = attend): causal, and only within the sample a token belongs to."""
    seg = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
