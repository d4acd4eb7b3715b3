"""Linear cross-entropy in token chunks: ``sum_t CE(hidden[t] @ weight.T + bias, labels[t])`` without the
``[tokens, vocab]`` logits ever existing at once, in forward or backward.

Each chunk's logits are computed (fp32 softmax), its loss summed, and its gradients with respect to the
hidden states, the weight and the bias taken right away, in forward (as Liger-Kernel's fused linear
cross-entropy does); backward only scales them by the incoming gradient. Peak memory is O(chunk x vocab)
above the inputs and the gradients themselves. Plain torch: every device and dtype; under autocast the
matmuls run in the autocast dtype, as ``nn.Linear`` would.
"""
from __future__ import annotations

import math

import torch

from comm_fast.data.conversation import IGNORE_INDEX


MIN_CHUNK = 256  # tokens: each chunk's weight-gradient update streams the whole [V, H] gradient once, so
                 # smaller chunks turn it from a matmul into a memory-bound loop (measured ~2x slower at 8 on CPU)


def default_chunk(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: a power of two with chunk x vocab about tokens x hidden (a chunk's logits weigh
    about as much as the hidden states, Liger-Kernel's rule), at least MIN_CHUNK, at most ``tokens``."""
    rule = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / hidden)))))
    return max(1, min(tokens, max(rule, MIN_CHUNK)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, ignore_index: int, any_ignored: bool):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        tokens = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 softmax and sums (fp64 stays fp64)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, tokens, chunk):
            h = hidden[start:start + chunk]
            target = labels[start:start + chunk]
            logits = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).to(acc)
            valid = target != ignore_index
            safe = target.masked_fill(~valid, 0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1)
            loss += ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(loss)/d(logits) = softmax - onehot(target) on the valid rows, 0 on the ignored ones
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
            if any_ignored:
                grad.mul_(valid.unsqueeze(1))
            if need_b:
                grad_b += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if need_h:
                torch.mm(grad, weight, out=grad_h[start:start + chunk])
            if need_w:  # a matmul in the input dtype, summed over the chunks in fp32
                if grad.dtype == grad_w.dtype:
                    grad_w.addmm_(grad.t(), h)
                else:
                    grad_w += (grad.t() @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None,
                              grad_b.to(bias.dtype) if need_b else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # the gradients are scaled in place (no second weight-sized buffer), so they serve one backward only
        if getattr(ctx, "used", False):
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same loss (its gradients are "
                               "computed in forward and scaled in place once)")
        ctx.used = True
        grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors)
        return grads + (None,) * 4


def autocast_inputs(hidden, weight, bias):
    """Under autocast, the LM head's operands in the autocast dtype (as ``nn.Linear`` would run), cast
    here so that a function running its own matmuls sees one dtype; unchanged otherwise."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk: int | None = None,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, int]:
    """(sum of the token losses as an fp32 scalar (fp64 for fp64 inputs), number of counted tokens) of ``hidden`` [T, H] through
    the LM head ``weight`` [V, H] (+ ``bias`` [V]) against ``labels`` [T]; ``ignore_index`` labels count
    for nothing. Differentiable in ``hidden``, ``weight`` and ``bias``; ``chunk`` tokens at a time
    (default: ``default_chunk``)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden, weight: expected [T, H] and [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels: expected shape [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk: expected a positive number of tokens, got {chunk}")
    count = int((labels != ignore_index).sum())
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0 + weight.sum() * 0).float(), 0
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden, weight: expected one dtype, got {hidden.dtype} and {weight.dtype}")
    chunk = chunk or default_chunk(hidden.shape[0], hidden.shape[1], weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, ignore_index, count < hidden.shape[0])
    return loss, count
