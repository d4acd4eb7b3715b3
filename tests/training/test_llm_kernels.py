"""The LLM loss kernels in COMMForCausalLM and training: the chunked linear cross-entropy gives the eager loss and
the eager gradients of every parameter (fp32, padded and packed batches, ignored labels, all ignored); its step
needs less memory with a 32k vocabulary; --llm-kernels in train and profile-train; Liger on CUDA only."""
import json

import pytest
import torch

from comm_fast import COMMConfig, COMMForCausalLM, bench
from comm_fast.data import ByteTokenizer, tokenize_conversation
from comm_fast.data.conversation import IGNORE_INDEX
from comm_fast.data.dataset import Sample, collate
from comm_fast.models import llm_kernels
from comm_fast.ops import linear_ce
from train_runs import metrics, train

CONVS = [[{"from": "human", "value": "<image>\nWhere is the red circle?"}, {"from": "gpt", "value": "[0.1,0.2,0.3]"},
          {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "None."}],
         [{"from": "human", "value": "<image>\nCaption?"}, {"from": "gpt", "value": "A blue square."}],
         [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]]


def bench_last_used():
    from comm_fast import _backend

    return _backend.last_used()


@pytest.fixture
def model(seed):
    m = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer())
    with torch.no_grad():  # random heads and LM head: nothing sits at a symmetric point
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batches(model):
    samples = []
    for conv in CONVS:
        ids, labels, _ = tokenize_conversation(conv, model.tokenizer, model.num_image_tokens)
        samples.append(Sample(ids, labels, ["x"] * sum("<image>" in t["value"] for t in conv)))
    pad = model.tokenizer.pad_id
    return {"padded": collate(samples, pad, pack=False),
            "packed": collate(samples, pad, pack=True, capacity=2 * len(samples[0].input_ids))}


def loss_and_grads(model, kind, batch, px):
    model.llm_kernels = kind
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, pixel_values=px, return_logits=False)
    (out.loss_sum * 0.01).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [None, 7], ids=["default-chunk", "chunk-7"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_loss_and_every_gradient_equal_eager(model, layout, chunk, monkeypatch):
    if chunk:  # chunks that end inside answers and across samples
        monkeypatch.setattr(linear_ce, "default_chunk", lambda *shape: chunk)
    batch = batches(model)[layout]
    batch["labels"][0, 5:9] = IGNORE_INDEX  # ignored labels inside an answer too
    px = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    eager, ge = loss_and_grads(model, "eager", batch, px)
    chunked, gc = loss_and_grads(model, "chunked", batch, px)
    assert eager.num_label_tokens == chunked.num_label_tokens > 0
    torch.testing.assert_close(chunked.loss_sum, eager.loss_sum, rtol=1e-5, atol=0.0)
    assert ge.keys() == gc.keys() and "llm.lm_head.weight" in ge and "vision.projector.weight" in ge
    for name in ge:
        scale = float(ge[name].abs().max())
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_all_labels_ignored_gives_zero_loss_and_no_nan(model):
    batch = batches(model)["padded"]
    batch["labels"][:] = IGNORE_INDEX
    out, grads = loss_and_grads(model, "chunked", batch, (torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)))
    assert out.num_label_tokens == 0 and out.loss_sum.item() == 0.0 and out.loss.item() == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in grads.values())


def test_chunked_step_needs_less_memory_with_a_32k_vocabulary(seed):
    """A text-only step with 384 label tokens: eager holds [tokens, 32000] logits (and their softmax and
    gradient), chunked a chunk of them."""
    tok = ByteTokenizer("llama")
    config = COMMConfig.preset("tiny")
    config.text.update(vocab_size=32000, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                       num_hidden_layers=1)
    model = COMMForCausalLM(config, tok)
    ids = torch.randint(3, 32000, (1, 385))
    ids[ids == config.image_token_id] = 3  # a text-only step: no id may be the image token
    peaks = bench.loss_step_peaks_mb(model, ids, ids)
    if None in peaks.values():
        pytest.skip("no heap figures here (glibc mallinfo2)")
    assert peaks["chunked"] <= 0.6 * peaks["eager"], peaks


def test_kernels_resolve_and_liger_is_refused_where_it_cannot_run(model, monkeypatch):
    assert llm_kernels.resolve("auto", "cpu")[0] == "chunked"
    assert model.set_llm_kernels("auto") == "chunked" == model.llm_kernels
    assert model.set_llm_kernels("eager") == "eager"
    with pytest.raises(ValueError, match="llm_kernels: expected one of"):
        model.set_llm_kernels("fast")
    monkeypatch.setattr(llm_kernels, "liger_available", lambda: (False, "liger_kernel does not import (x)"))
    with pytest.raises(ValueError, match="liger-kernel package"):
        model.set_llm_kernels("liger")
    assert llm_kernels.resolve("auto", "cuda")[0] == "chunked"  # auto falls back; only an explicit liger fails
    monkeypatch.setattr(llm_kernels, "liger_available", lambda: (True, "liger_kernel imports"))
    assert llm_kernels.resolve("auto", "cuda")[0] == "liger"
    with pytest.raises(ValueError, match="CUDA only"):
        model.set_llm_kernels("liger")  # a CPU model


def test_train_passes_llm_kernels_and_reports_bad_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(llm_kernels, "liger_available", lambda: (False, "liger_kernel does not import (x)"))
    assert train(tmp_path / "liger", "--steps", "1", "--llm-kernels", "liger") == 2
    assert "liger-kernel package" in capsys.readouterr().err and not (tmp_path / "liger").exists()
    losses = {}
    for kind in ("eager", "chunked"):
        assert train(tmp_path / kind, "--steps", "3", "--llm-kernels", kind) == 0
        losses[kind] = [m["loss"] for m in metrics(tmp_path / kind)]
        assert llm_kernels.LOSS_OP in bench_last_used() and bench_last_used()[llm_kernels.LOSS_OP]["backend"] == kind
    assert losses["chunked"] == pytest.approx(losses["eager"], rel=1e-5)


def test_info_and_profile_report_the_llm_kernels(tmp_path, capsys):
    from comm_fast import info
    from comm_fast.cli import main as cli

    data = info()
    assert data["llm_kernels"]["auto"] in ("chunked", "liger") and data["llm_kernels"]["reason"]
    assert cli(["profile-train", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                "--no-padded", "--llm-kernels", "chunked", "--llm-variants", "--json", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["llm_kernels"] == "chunked" and set(r["variants"]) == {"ours_packed", "ours_packed_loss_eager"}
    assert r["variants"]["ours_packed"]["llm_loss"] == "chunked"
    assert r["variants"]["ours_packed_loss_eager"]["llm_loss"] == "eager"
    assert r["backends"][llm_kernels.LOSS_OP] == "chunked"  # what ours ran, not the last variant's
    assert r["ratios"]["ours_over_eager_loss_tokens_per_s"] > 0
    assert "LLM kernels chunked" in text and "/ eager loss tokens/s" in text
    assert info()["llm_kernels"]["last_used"][llm_kernels.LOSS_OP]["backend"] in ("chunked", "eager")


@pytest.mark.gpu
def test_liger_on_cuda_matches_eager(seed):
    pytest.importorskip("liger_kernel")
    model = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).cuda()
    batch = batches(model)["packed"]
    inputs = {k: batch[k].cuda() for k in ("input_ids", "labels", "position_ids")}
    px = torch.randn(2, 3, 56, 56, device="cuda"), torch.randn(2, 3, 56, 56, device="cuda")
    results = {}
    for kind in ("eager", "liger"):  # eager first: liger patches the decoder for good
        assert model.set_llm_kernels(kind) == kind
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inputs, pixel_values=px, return_logits=False)
        out.loss_sum.backward()
        results[kind] = out.loss_sum.item(), model.llm.lm_head.weight.grad.clone()
    assert bench_last_used()[llm_kernels.LOSS_OP]["backend"] == "liger"
    assert bench_last_used()[llm_kernels.LAYERS_OP]["backend"] == "liger"
    assert results["liger"][0] == pytest.approx(results["eager"][0], rel=2e-2)
    torch.testing.assert_close(results["liger"][1], results["eager"][1], rtol=5e-2, atol=5e-2 * float(
        results["eager"][1].abs().max()))
