"""Packed-row attention (comm_fast.models.packing): every method against the padded batch computed in float64
(scores, a causal and key-padding mask, softmax), forward and backward; odd lengths, grouped-query heads, one
sample and many. On CPU the loop runs forward and backward and FlexAttention forward (eager); nested SDPA
(no causal CPU kernel) and FlexAttention's backward are tested under -m gpu."""
import math

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from comm_fast import _backend
from comm_fast.models import packing

CASES = {  # lengths, query heads, kv heads
    "one": ([17], 4, 4),
    "odd": ([1, 3, 17], 4, 2),
    "mqa": ([5, 1, 2, 9], 4, 1),
    "many": ([1, 2, 3, 5, 8, 13, 21, 3, 1, 7, 11], 2, 2),
}


def padded_reference(q, k, v, lengths, scale=None, causal=True):
    """The samples padded to the longest into a [S, H, L, D] batch, attention in float64 with the padding
    keys and the future masked out, unpadded back to [N, H, D]."""
    h, d, longest = q.shape[1], q.shape[2], max(lengths)
    scale = 1 / math.sqrt(d) if scale is None else scale

    def pad(x):
        return torch.nn.utils.rnn.pad_sequence(list(x.double().split(lengths)), batch_first=True).transpose(1, 2)

    k, v = (repeat_kv(pad(x), h // x.shape[1]) for x in (k, v))  # transformers' grouping of query heads
    scores = pad(q) @ k.transpose(-1, -2) * scale
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # [S, L] real keys
    allowed = valid[:, None, None, :] & torch.ones(longest, longest, dtype=torch.bool).tril(0 if causal else longest)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return torch.cat([o[:, :n].transpose(0, 1) for o, n in zip(out, lengths)])


def inputs(lengths, h, hkv, d=16, dtype=torch.float64, grad=True):
    n = sum(lengths)
    return [torch.randn(n, heads, d, dtype=dtype, requires_grad=grad) for heads in (h, hkv, hkv)]


def grads(out, tensors, grad_out):
    return torch.autograd.grad(out, tensors, grad_out)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_loop_equals_the_padded_batch_forward_and_backward(seed, case, scale):
    lengths, h, hkv = CASES[case]
    qkv = inputs(lengths, h, hkv)
    out = packing.packed_attention(*qkv, lengths, scale=scale, method="loop")
    ref = padded_reference(*qkv, lengths, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, qkv, g), grads(ref, qkv, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", ["odd", "mqa"])
@pytest.mark.parametrize("scale", [None, 0.3])  # None: 1/sqrt(16); 0.3 must reach the kernel
def test_flex_forward_on_cpu_equals_the_padded_batch(seed, case, scale):
    lengths, h, hkv = CASES[case]
    qkv = inputs(lengths, h, hkv, dtype=torch.float32, grad=False)  # FlexAttention has no CPU backward
    out = packing.packed_attention(*qkv, lengths, scale=scale, method="flex")
    torch.testing.assert_close(out.double(), padded_reference(*qkv, lengths, scale), rtol=1e-5, atol=1e-5)
    assert _backend.last_used()[packing.OP]["backend"] == "flex"


@pytest.mark.parametrize("case", ["odd", "many"])
def test_nested_tensors_hold_the_samples_on_cpu(seed, case):
    """The nested path's offsets, views and gradients, checked through the CPU math kernel (which has no
    causal mask, so non-causal here; the causal kernels run under -m gpu)."""
    lengths, h, hkv = CASES[case]
    qkv = inputs(lengths, h, hkv, dtype=torch.float32)
    out = packing._nested(*qkv, lengths, 0.3, 0.0, causal=False)
    ref = padded_reference(*qkv, lengths, 0.3, causal=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, qkv, g), grads(ref, qkv, g.double())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Attn(torch.nn.Module):  # what transformers passes as `module`: only .training is read
    pass


def interface_call(q, k, v, position_ids, lengths=None, dropout=0.0, training=False):
    """varlen_sdpa_attention as a LLaMA layer calls it: [B, H, T, D] in (heads-first views), [B, T, H, D] out."""
    module = _Attn().train(training)
    kw = {"comm_packed": True, "position_ids": position_ids}
    if lengths is not None:
        kw["comm_lengths"] = lengths
    return packing.varlen_sdpa_attention(module, q, k, v, None, dropout=dropout, **kw)[0]


def packed_rows(h, hkv, d=16, dtype=torch.float64):
    """Two rows of 24 tokens: [3, 17, 4-token padding tail] and [1, 23]; q, k, v [2, H, 24, D]."""
    rows = [[3, 17, 4], [1, 23]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    qkv = [torch.randn(2, 24, heads, d, dtype=dtype).transpose(1, 2).requires_grad_() for heads in (h, hkv, hkv)]
    return qkv, pos, [n for row in rows for n in row]


@pytest.mark.parametrize("given", [True, False], ids=["lengths-given", "lengths-from-positions"])
def test_the_attention_interface_on_packed_rows_equals_the_padded_batch(seed, given):
    (q, k, v), pos, lengths = packed_rows(4, 2)
    out = interface_call(q, k, v, pos, lengths if given else None)
    assert out.shape == (2, 24, 4, 16)

    def flat(x):
        return x.transpose(1, 2).reshape(48, x.shape[1], 16)

    ref = padded_reference(flat(q), flat(k), flat(v), lengths).reshape(2, 24, 4, 16)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, (q, k, v), g), grads(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dropout_applies_in_training_only(seed):
    (q, k, v), pos, _ = packed_rows(2, 2)
    plain = interface_call(q, k, v, pos)
    assert torch.equal(interface_call(q, k, v, pos, dropout=0.5), plain)  # eval: no dropout
    dropped = interface_call(q, k, v, pos, dropout=0.5, training=True)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)


def test_the_method_comes_from_the_environment_and_is_recorded(monkeypatch):
    qkv = inputs([2, 3], 2, 2)
    monkeypatch.setenv(packing.ENV, "loop")
    packing.packed_attention(*qkv, [2, 3])
    assert _backend.last_used()[packing.OP] == {"backend": "loop", "reason": "one causal SDPA call per sample "
                                                                             "(requested)"}
    monkeypatch.setenv(packing.ENV, "auto")
    assert packing.resolve_method("cpu")[0] == "loop" and packing.resolve_method("cuda")[0] == "nested"
    monkeypatch.setenv(packing.ENV, "fused")
    with pytest.raises(ValueError, match="COMM_FAST_PACKED_ATTENTION: expected one of .* got 'fused'"):
        packing.packed_attention(*qkv, [2, 3])


def test_methods_that_cannot_run_are_refused_with_the_reason():
    qkv = inputs([2, 3], 2, 2)
    with pytest.raises(ValueError, match="nested needs CUDA tensors .* got cpu"):
        packing.packed_attention(*qkv, [2, 3], method="nested")
    with pytest.raises(ValueError, match="FlexAttention has no attention dropout, got dropout=0.1"):
        packing.packed_attention(*qkv, [2, 3], dropout=0.1, method="flex")
    with pytest.raises(ValueError, match=r"lengths must be positive and sum to 5 tokens, got \[2, 2\]"):
        packing.packed_attention(*qkv, [2, 2], method="loop")
    with pytest.raises(ValueError, match=r"H a multiple of Hkv, got q \(5, 2, 16\), k \(5, 3, 16\)"):
        packing.packed_attention(qkv[0], *inputs([5], 3, 3)[1:], [5], method="loop")


def test_nested_asks_sdpa_for_causal_attention_over_the_true_sample_lengths(seed, monkeypatch):
    """A CPU stand-in for the -m gpu tests (CPU SDPA has no causal nested kernel): the nested call is causal
    and its jagged tensors carry the real shortest and longest sample (a varlen kernel sizes its grid by
    them)."""
    import torch.nn.functional as F

    seen, real = {}, F.scaled_dot_product_attention

    def spy(q, k, v, is_causal=False, **kwargs):
        seen.update(causal=is_causal, shortest=q._min_seqlen, longest=q._max_seqlen)
        return real(q, k, v, is_causal=False, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    packing._nested(*inputs([1, 3, 17], 4, 2, dtype=torch.float32, grad=False), [1, 3, 17], 0.3, 0.0)
    assert seen == {"causal": True, "shortest": 1, "longest": 17}


def test_a_row_that_starts_mid_sample_and_empty_samples():
    """The tokens before a row's first position 0 are a sample of their own (block_causal_mask's segments
    too); a sample of no tokens is refused."""
    pos = torch.tensor([[2, 3, 0, 1, 2]])
    assert packing.sample_lengths(pos) == [2, 3]
    allowed = packing.block_causal_mask(pos)[0, 0]
    assert allowed[1, 0] and not allowed[2, 1] and allowed[4, 2]
    with pytest.raises(ValueError, match="lengths must be positive"):
        packing.packed_attention(*inputs([5], 2, 2, grad=False), [0, 5], method="loop")


def test_running_out_of_memory_is_not_a_reason_to_fall_back(seed, monkeypatch):
    """auto falls back when this torch build cannot run the fused call; out of memory, it would only run
    out again (slower): the error is raised and the method is not marked as failed."""
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(packing, "_FAILED", {})
    monkeypatch.setitem(packing._METHODS, "nested", out_of_memory)
    monkeypatch.setattr(packing, "resolve_method", lambda device, method, dropout: ("nested", "as on CUDA"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        packing.packed_attention(*inputs([2, 3], 2, 2), [2, 3])
    assert "nested" not in packing._FAILED


def test_auto_falls_back_to_the_loop_when_the_fused_call_fails_and_says_so(seed, monkeypatch):
    def broken(*args):
        raise RuntimeError("No viable backend for scaled_dot_product_attention was found.")

    monkeypatch.setattr(packing, "_FAILED", {})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setitem(packing._METHODS, "nested", broken)
    monkeypatch.setattr(packing, "resolve_method", lambda device, method, dropout: ("nested", "as on CUDA"))
    qkv = inputs([3, 17], 4, 2)
    with pytest.warns(RuntimeWarning, match="nested failed on cpu .*No viable backend"):
        out = packing.packed_attention(*qkv, [3, 17])
    torch.testing.assert_close(out, padded_reference(*qkv, [3, 17]), rtol=1e-10, atol=1e-10)
    last = _backend.last_used()[packing.OP]
    assert last["backend"] == "loop" and "nested failed" in last["reason"]
    with pytest.raises(RuntimeError, match="No viable backend"):  # asked for by name: the error, no fallback
        packing.packed_attention(*qkv, [3, 17], method="nested")


def test_info_names_the_packed_attention():
    import comm_fast

    d = comm_fast.info()["packed_attention"]
    assert d["cpu"]["backend"] == "loop" and d["cuda"]["backend"] == "nested" and d["requested"] == "auto"


# --- GPU: the fused methods, forward and backward, fp32 and bf16 ---

def bf16_tolerance(out, ref, loop_out):
    """flash-attn's rule: the method's error against the float64 reference at most twice the bf16 loop's,
    plus a small absolute slack."""
    err, base = (out.double() - ref).abs().max().item(), (loop_out.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, f"error {err:.3g} against the bf16 loop's {base:.3g}"


# nested on every case; flex (each new dtype / head layout is a compile) on grouped heads and on many samples
GPU_CASES = [("nested", c) for c in CASES] + [("flex", "odd"), ("flex", "many")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method,case", GPU_CASES)
def test_fused_methods_equal_the_loop_and_the_padded_batch_on_gpu(seed, method, dtype, case):
    lengths, h, hkv = CASES[case]
    qkv64 = [x.detach().cuda().requires_grad_() for x in inputs(lengths, h, hkv, d=64)]
    qkv = [x.detach().to(dtype).requires_grad_() for x in qkv64]
    out = packing.packed_attention(*qkv, lengths, scale=0.2, method=method)
    assert _backend.last_used()[packing.OP]["backend"] == method
    loop_qkv = [x.detach().requires_grad_() for x in qkv]
    loop_out = packing.packed_attention(*loop_qkv, lengths, scale=0.2, method="loop")
    ref = padded_reference(*(x.cpu() for x in qkv64), lengths, 0.2).cuda()
    g = torch.randn_like(ref)
    got = [out, *grads(out, qkv, g.to(dtype))]
    loop = [loop_out, *grads(loop_out, loop_qkv, g.to(dtype))]
    want = [ref, *grads(ref, qkv64, g)]
    for a, b, r in zip(got, loop, want):
        if dtype == torch.float32:
            torch.testing.assert_close(a.double(), r, rtol=2e-4, atol=2e-4)
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
        else:
            bf16_tolerance(a, r, b)


@pytest.mark.gpu
def test_nested_dropout_on_gpu_drops_and_backpropagates(seed):
    qkv = [x.detach().cuda().bfloat16().requires_grad_() for x in inputs([3, 17, 40], 4, 2, d=64)]
    plain = packing.packed_attention(*qkv, [3, 17, 40], method="nested")
    dropped = packing.packed_attention(*qkv, [3, 17, 40], dropout=0.3, method="nested")
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)
    dq = torch.autograd.grad(dropped.float().sum(), qkv[0])[0]
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["nested", "flex"])
def test_packed_loss_equals_padded_loss_on_gpu(seed, monkeypatch, method):
    """The tiny model on CUDA in fp32: packed rows through the fused method give the padded batch's loss and
    gradients."""
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer, tokenize_conversation
    from comm_fast.data.dataset import Sample, collate

    monkeypatch.setenv(packing.ENV, method)
    model = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).cuda()
    tok = model.tokenizer
    convs = [[{"from": "human", "value": "<image>\nWhere is the red circle?"}, {"from": "gpt", "value": "Left."}],
             [{"from": "human", "value": "<image>\nCaption?"}, {"from": "gpt", "value": "A blue square, small."}],
             [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]]
    samples = [Sample(*tokenize_conversation(c, tok, model.num_image_tokens)[:2], ["x"]) for c in convs]
    px = tuple(torch.randn(3, 3, 56, 56, device="cuda") for _ in range(2))
    results = []
    for batch in (collate(samples, tok.pad_id), collate(samples, tok.pad_id, pack=True)):
        model.zero_grad()
        kw = {k: batch[k].cuda() for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in batch}
        out = model(**kw, pixel_values=px, return_logits=False)
        out.loss.backward()
        results.append((out.loss.item(), model.llm.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert _backend.last_used()[packing.OP]["backend"] == method
    assert abs(results[0][0] - results[1][0]) <= 1e-4
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-5)
