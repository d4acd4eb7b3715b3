"""The LLM side of a training step: how the language-model loss (and, with Liger, the decoder's RMSNorm,
RoPE and SwiGLU) is computed.

    eager    transformers' modules; the LM head's [tokens, vocab] logits, then F.cross_entropy
    chunked  comm_fast.ops.linear_ce: the loss in token chunks, the logits never materialised (every device)
    liger    Liger-Kernel (CUDA, when ``liger_kernel`` imports): its fused linear cross-entropy for the loss,
             and its RMSNorm / RoPE / SwiGLU patched into the decoder
    auto     liger on CUDA when liger_kernel imports, else chunked
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from comm_fast import _backend
from comm_fast.ops.linear_ce import autocast_inputs, linear_cross_entropy

LLM_KERNELS = ("auto", "liger", "chunked", "eager")
LOSS_OP = "llm_loss"        # the name under which the loss that ran is recorded (comm_fast.info, the profile)
LAYERS_OP = "llm_layers"    # and the decoder's RMSNorm / RoPE / SwiGLU


@functools.lru_cache(maxsize=None)
def liger_available() -> tuple[bool, str]:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"liger_kernel does not import ({type(exc).__name__}: {exc})"
    return True, "liger_kernel imports"


def resolve(kind: str, device) -> tuple[str, str]:
    """(kernels, why) for ``kind`` on ``device``; ValueError for an unknown kind, or liger where it cannot run."""
    if kind not in LLM_KERNELS:
        raise ValueError(f"llm_kernels: expected one of {LLM_KERNELS}, got {kind!r}")
    cuda = torch.device(device).type == "cuda"
    ok, why = liger_available()
    if kind == "liger":
        if not ok:
            raise ValueError(f"llm_kernels: 'liger' needs the liger-kernel package (pip install liger-kernel): {why}")
        if not cuda:
            raise ValueError(f"llm_kernels: 'liger' runs on CUDA only (Triton kernels), the model is on {device}")
        return "liger", "asked for"
    if kind == "auto":
        if ok and cuda:
            return "liger", f"auto: CUDA and {why}"
        return "chunked", f"auto: {why if cuda else 'not CUDA'}; chunked linear cross-entropy in torch"
    return kind, "asked for"


def apply_liger(llm) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU in this LlamaForCausalLM instance (the loss is ours to call: its
    fused linear cross-entropy, in ``lm_loss``). Liger also swaps transformers' Llama classes for its own,
    so Llama models built later in the process get them too."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=llm)
    _backend.record(LAYERS_OP, "liger", "Liger-Kernel RMSNorm, RoPE, SwiGLU patched into the decoder")


def lm_loss(kind: str, hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Linear) -> torch.Tensor:
    """Sum of the token losses (fp32) of ``hidden`` [T, H] through ``lm_head`` against ``labels`` [T]
    (-100 ignored), computed the ``kind`` way (resolved: eager, chunked or liger)."""
    _backend.record(LOSS_OP, kind, {"eager": "LM head logits + F.cross_entropy",
                                    "chunked": "comm_fast.ops.linear_ce, token chunks",
                                    "liger": "LigerFusedLinearCrossEntropyLoss"}[kind])
    if kind == "chunked":
        return linear_cross_entropy(hidden, lm_head.weight, labels, lm_head.bias)[0]
    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        h, w, b = autocast_inputs(hidden, lm_head.weight, lm_head.bias)
        out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, labels, b)
        return (out[0] if isinstance(out, tuple) else out).float()  # (loss, z_loss) in versions that return both
    return F.cross_entropy(lm_head(hidden).float(), labels, reduction="sum")
