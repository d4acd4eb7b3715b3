"""COMMForCausalLM on the tiny preset: forward/backward, label masking, image tokens, generation,
packing, saving and loading, conversion from LLaVA, presets."""
import os

import pytest
import torch

from comm_fast import COMMConfig, COMMForCausalLM
from comm_fast.data import ByteTokenizer, tokenize_conversation
from comm_fast.data.conversation import IGNORE_INDEX
from comm_fast.data.dataset import Sample, collate


@pytest.fixture
def model(seed):
    m = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer())
    with torch.no_grad():  # random merge heads (LayerNorm identity and alpha = 1/L would hide mistakes)
        for name in m.vision.HEADS:
            for p in getattr(m.vision, name).parameters():
                p.add_(0.1 * torch.randn_like(p))
    return m


def pixels(n, size=56):
    return torch.randn(n, 3, size, size), torch.randn(n, 3, size, size)


CONV = [{"from": "human", "value": "<image>\nWhere is the red circle?"}, {"from": "gpt", "value": "[0.1,0.2,0.3,0.4]"},
        {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "None."}]


def sample(model, conv=CONV):
    ids, labels, _ = tokenize_conversation(conv, model.tokenizer, model.num_image_tokens)
    return Sample(ids, labels, ["x"])


def test_forward_backward_trains_heads_and_llm_not_encoders(model):
    s = sample(model)
    ids, labels = torch.from_numpy(s.input_ids)[None], torch.from_numpy(s.labels)[None]
    out = model(ids, pixel_values=pixels(1), labels=labels)
    assert out.logits.shape == (1, ids.shape[1], model.config.text["vocab_size"])
    assert torch.isfinite(out.loss) and out.num_label_tokens > 0
    out.loss.backward()
    assert model.vision.clip_merge.weight.grad is not None and model.vision.projector.weight.grad.abs().sum() > 0
    assert model.llm.model.layers[0].mlp.up_proj.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.vision.clip.parameters())
    assert all(p.grad is None for p in model.vision.dino.parameters())


def test_forward_backward_under_bf16_autocast(model):
    """As training runs on a GPU (bf16 autocast; CPU autocast takes the same paths here)."""
    s = sample(model)
    ids, labels = torch.from_numpy(s.input_ids)[None], torch.from_numpy(s.labels)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, pixel_values=pixels(1), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for p in (model.vision.clip_merge.weight, model.vision.projector.weight, model.llm.model.layers[0].mlp.up_proj.weight):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_label_masking(model):
    tok = model.tokenizer
    s = sample(model)
    ids, labels = s.input_ids, s.labels
    n = model.num_image_tokens
    assert (ids == tok.image_token_id).sum() == n
    assert (labels[ids == tok.image_token_id] == IGNORE_INDEX).all()
    targets = labels[labels != IGNORE_INDEX]
    # exactly the two replies, each with its leading space and </s>
    expected = tok.encode(" [0.1,0.2,0.3,0.4]") + [tok.eos_id] + tok.encode(" None.") + [tok.eos_id]
    assert targets.tolist() == expected
    from comm_fast.data.conversation import SYSTEM
    assert tok.decode(ids) == (f"{SYSTEM} USER: \nWhere is the red circle? ASSISTANT: [0.1,0.2,0.3,0.4]"
                               "USER: And the square? ASSISTANT: None.")  # Vicuna v1 (image tokens not text)

    # the loss is the mean cross-entropy over exactly those targets (shifted), image labels ignored
    ids_t, labels_t = torch.from_numpy(ids)[None], torch.from_numpy(ids.copy())[None]  # labels = ids everywhere
    labels_t[0, torch.from_numpy(labels) == IGNORE_INDEX] = IGNORE_INDEX
    labels_t[0, torch.from_numpy(ids) == tok.image_token_id] = 7  # must be ignored anyway
    out = model(ids_t, pixel_values=pixels(1), labels=labels_t)
    logits = out.logits[0, :-1]
    target = torch.from_numpy(labels)[1:]
    keep = target != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert out.num_label_tokens == len(expected)
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)


def test_one_image_token_expands_to_n(model):
    tok, n = model.tokenizer, model.num_image_tokens
    text = tok.encode("look: ")
    short = torch.tensor([[tok.bos_id, *text, tok.image_token_id, *tok.encode(" what?")]])
    long = torch.tensor([[tok.bos_id, *text, *[tok.image_token_id] * n, *tok.encode(" what?")]])
    px = pixels(1)
    model.eval()
    a, b = model(short, pixel_values=px, labels=short), model(long, pixel_values=px, labels=long)
    assert a.logits.shape == b.logits.shape == (1, long.shape[1], model.config.text["vocab_size"])
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.loss, b.loss)
    # the visual tokens really land in the sequence
    with torch.no_grad():
        feats = model.image_features(px)
        emb = model.embed(long, feats)
    torch.testing.assert_close(emb[0, 1 + len(text):1 + len(text) + n], feats[0])
    with pytest.raises(ValueError, match="image tokens for 2 images"):
        model(long, pixel_values=pixels(2))


TIE = 1e-4  # two decoding paths' logits differ by < 1e-6: their greedy picks may differ only on a near-tie


def assert_greedy(token: int, scores: torch.Tensor, where) -> None:
    """``token`` is the greedy pick of ``scores`` up to a near-tie."""
    assert scores[token] >= scores.max() - TIE, (where, token, int(scores.argmax()))


def test_generate_with_kv_cache_matches_full_recompute(model):
    model.eval()
    tok = model.tokenizer
    ids = torch.tensor([[tok.bos_id, *tok.encode("USER: "), tok.image_token_id, *tok.encode(" hi ASSISTANT:")]])
    px = pixels(1)
    new = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8)[0].tolist()
    assert len(new) == 8 or new[-1] == tok.eos_id
    # each cached step picks what greedy decoding that recomputes the whole sequence, no cache, picks
    with torch.no_grad():
        feats = model.image_features(px)
        seq, _, _ = model.expand_image_tokens(ids)
        for step, t in enumerate(new):
            logits = model.llm(inputs_embeds=model.embed(seq, feats), use_cache=False).logits[0, -1]
            logits[tok.image_token_id] = -float("inf")  # generate never emits the image placeholder
            assert_greedy(t, logits, step)
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
    images = [torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy() for _ in range(2)]
    text = model.generate(images=images[:1], prompt="What is this?", max_new_tokens=4)
    assert isinstance(text, str)
    # a left-padded batch answers as each prompt alone
    prompts = ["What is this?", "Where is the big red circle in the picture?"]
    ids, mask = model.prompt_inputs(prompts)
    assert (mask[0] == 0).any() and mask[1].all()
    scored = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    both = model.generate(input_ids=ids, attention_mask=mask, images=images, **scored)
    for b, (im, p) in enumerate(zip(images, prompts)):
        one = model.generate(input_ids=model.prompt_inputs(p)[0], images=[im], **scored)
        alone, batched = one.sequences[0].tolist(), both.sequences[b].tolist()
        for step, (x, y) in enumerate(zip(batched, alone)):
            torch.testing.assert_close(both.scores[step][b], one.scores[step][0], rtol=0, atol=TIE)
            if x != y:  # only on a near-tie, after which the two histories part
                assert_greedy(y, both.scores[step][b], (b, step))
                break
            if x == tok.eos_id:
                break
        else:
            assert len(alone) == 6
    strings = model.generate(images=images, prompt=prompts, max_new_tokens=6)
    assert isinstance(strings, list) and len(strings) == 2 and all(isinstance(t, str) for t in strings)


def test_generate_never_emits_the_image_placeholder(model):
    model.eval()
    tok = model.tokenizer
    favour = model.llm.lm_head.register_forward_hook(
        lambda mod, args, out: out.index_add(-1, torch.tensor([tok.image_token_id]), torch.full_like(out[..., :1], 1e4)))
    try:
        assert int(model(torch.tensor([[tok.bos_id, 65]])).logits[0, -1].argmax()) == tok.image_token_id
        prompt = torch.tensor([[tok.bos_id, *tok.encode("USER: "), tok.image_token_id, *tok.encode(" ASSISTANT:")]])
        new = model.generate(input_ids=prompt, pixel_values=pixels(1), max_new_tokens=5,
                             suppress_tokens=[tok.eos_id])  # a caller's own suppressions still hold
    finally:
        favour.remove()
    assert new.shape == (1, 5) and tok.image_token_id not in new.tolist()[0] and tok.eos_id not in new.tolist()[0]


@pytest.mark.parametrize("attention", ["comm_sdpa_varlen", "sdpa"], ids=["per-sample", "block-mask"])
def test_packed_loss_equals_padded_loss(model, attention):
    model.llm.set_attn_implementation(attention)
    assert model.llm.config._attn_implementation == attention
    tok = model.tokenizer
    convs = [CONV, CONV[:2], [{"from": "human", "value": "<image>\nCaption?"}, {"from": "gpt", "value": "A blue square."}]]
    samples = [sample(model, c) for c in convs]
    px = pixels(3)
    padded = collate(samples, tok.pad_id, pack=False)
    packed = collate(samples, tok.pad_id, pack=True, capacity=2 * len(samples[0].input_ids))
    assert packed["input_ids"].shape[0] == 2 and "attention_mask" not in packed  # two rows, one with a pad tail
    assert (packed["input_ids"] == tok.pad_id).any()
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in batch}
        out = model(**inputs, pixel_values=px, return_logits=False)
        out.loss.backward()
        losses.append(out)
        grads.append(model.vision.projector.weight.grad.clone())
    assert losses[0].num_label_tokens == losses[1].num_label_tokens
    assert abs(losses[0].loss.item() - losses[1].loss.item()) <= 1e-5
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_gives_same_gradients(model):
    s = sample(model)
    ids, labels = torch.from_numpy(s.input_ids)[None], torch.from_numpy(s.labels)[None]
    px = pixels(1)
    model.train()
    model(ids, pixel_values=px, labels=labels).loss.backward()
    g0 = model.llm.model.layers[1].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.enable_activation_checkpointing()
    model(ids, pixel_values=px, labels=labels).loss.backward()
    torch.testing.assert_close(model.llm.model.layers[1].self_attn.q_proj.weight.grad, g0)


def test_save_and_load_round_trip(model, tmp_path):
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directory left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "m"))
    again = COMMForCausalLM.from_pretrained(tmp_path / "m").eval()
    s = sample(model)
    ids = torch.from_numpy(s.input_ids)[None]
    px = pixels(1)
    torch.testing.assert_close(again(ids, pixel_values=px).logits, model(ids, pixel_values=px).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "m")  # overwrite in place
    with pytest.raises(ValueError, match="not a saved COMMForCausalLM"):
        model.vision.save_pretrained(tmp_path / "tower")
        COMMForCausalLM.from_pretrained(tmp_path / "tower")


def test_from_llava(tmp_path, seed):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from comm_fast.convert import from_llava
    from hf_models import hf_dinov2

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=128, patch_size=14, image_size=56),
                      text_config=LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128),
                      image_token_id=299)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.save_pretrained(tmp_path / "llava")
    hf_dinov2().save_pretrained(tmp_path / "dino")
    model = from_llava(tmp_path / "llava", tmp_path / "dino").eval()
    assert model.config.image_token_id == 299 and model.num_image_tokens == 16
    assert model.config.vision.clip_layers == (1, 2, 3) and model.config.vision.dino_layers == (1, 2, 3)
    ids = torch.randint(0, 290, (2, 12))
    torch.testing.assert_close(model(ids).logits, llava(input_ids=ids).logits)  # same decoder, same head
    clip_sd = llava.model.vision_tower.state_dict()
    torch.testing.assert_close(model.vision.clip.patch_embed.weight,
                               clip_sd["vision_model.embeddings.patch_embedding.weight"]
                               if "vision_model.embeddings.patch_embedding.weight" in clip_sd
                               else clip_sd["embeddings.patch_embedding.weight"])
    assert torch.all(model.vision.clip_merge.alpha == 1 / 3)  # fresh heads as docs/architecture.md §1
    ids[:, 3] = 299  # one <image> per sample
    out = model(ids, pixel_values=pixels(2), labels=ids)
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path / "comm")
    COMMForCausalLM.from_pretrained(tmp_path / "comm")


def test_presets():
    big = COMMConfig.preset("comm-7b")  # configuration only: never instantiated here
    assert big.text["hidden_size"] == 4096 and big.text["num_hidden_layers"] == 32
    assert big.vision.clip_layers == tuple(range(1, 25)) and big.vision.dino_layers == tuple(range(19, 25))
    assert big.vision.clip_image_size == big.vision.dino_image_size == 336
    assert big.vision.clip["hidden_size"] == big.vision.dino["hidden_size"] == 1024
    assert (big.vision.clip_image_size // 14) ** 2 == 576
    assert COMMConfig.preset("1b").text["hidden_size"] == COMMConfig.preset("1b").vision.out_dim
    assert COMMConfig.from_dict(big.to_dict()).to_dict() == big.to_dict()
    with pytest.raises(ValueError, match="preset"):
        COMMConfig.preset("huge")


@pytest.mark.parametrize("layout", ["bytes", "llama"])
def test_byte_tokenizer_layouts_round_trip(layout, tmp_path):
    from comm_fast.data.tokenizer import load_tokenizer

    tok = ByteTokenizer(layout)
    text = "Où est le cercle rouge? [0.125,0.5,0.75,1.000]"
    ids = tok.encode(text)
    assert tok.decode(ids + [tok.eos_id, tok.pad_id, tok.image_token_id]) == text
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id}
    assert len(specials) == 4 and not specials & set(range(tok.byte_offset, tok.byte_offset + 256))
    assert max(ids) < tok.vocab_size
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert (again.layout, again.encode(text), again.image_token_id) == (layout, ids, tok.image_token_id)


def test_stages_freeze_what_the_paper_freezes(model):
    from comm_fast.training.train import configure_stage

    heads = {n for n, _ in model.named_parameters() if n.split(".")[1] in model.vision.HEADS}
    pre = configure_stage(model, "pretrain", None)
    assert pre == heads and len(heads) == 16  # 2 merges x 5, MLP 4, projector 2
    fin = configure_stage(model, "finetune", None)
    assert fin == heads | {n for n, _ in model.named_parameters() if n.startswith("llm.")}
    assert configure_stage(model, "pretrain", True) == fin
    assert not any(n.startswith(("vision.clip.", "vision.dino.")) for n in fin)


def test_text_only_batch_gives_zero_grads_to_the_tower_heads(model):
    """No image: the loss is the text's, and every trainable tower parameter still gets a (zero) grad,
    which DDP/FSDP2 wait for; in the pretrain stage (LLM frozen) the batch still backpropagates."""
    from comm_fast.training.train import configure_stage

    conv = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]
    s = sample(model, conv)
    ids, labels = torch.from_numpy(s.input_ids)[None], torch.from_numpy(s.labels)[None]
    configure_stage(model, "pretrain", None)
    out = model(ids, labels=labels)
    with torch.no_grad():
        assert torch.equal(out.loss.detach(), model(ids, labels=labels).loss)
    out.loss.backward()
    heads = [p for p in model.vision.parameters() if p.requires_grad]
    assert heads and all(p.grad is not None and not p.grad.any() for p in heads)
