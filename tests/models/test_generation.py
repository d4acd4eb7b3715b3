"""COMMForCausalLM.generate through transformers' decoding: a GenerationConfig (greedy, sampling, beam search)
and streamers, checked against the model's own full recompute (no KV cache) of each sequence."""
import pytest
import torch
from transformers import GenerationConfig, TextStreamer
from transformers.generation.streamers import BaseStreamer

from comm_fast import COMMConfig, COMMForCausalLM
from comm_fast.data import ByteTokenizer


@pytest.fixture
def model(seed):
    m = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).eval()
    with torch.no_grad():
        for name in m.vision.HEADS:
            for p in getattr(m.vision, name).parameters():
                p.add_(0.1 * torch.randn_like(p))
    return m


def prompt(model):
    tok = model.tokenizer
    ids = torch.tensor([[tok.bos_id, *tok.encode("USER: "), tok.image_token_id, *tok.encode(" hi ASSISTANT:")]])
    return ids, (torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56))


def log_likelihood(model, ids, pixels, new) -> float:
    """Σ log p(token | everything before it), each step's distribution recomputed from the whole sequence."""
    with torch.no_grad():
        feats = model.image_features(pixels)
        seq, _, _ = model.expand_image_tokens(ids)
        total = 0.0
        for t in new:
            logits = model.llm(inputs_embeds=model.embed(seq, feats), use_cache=False).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[t])
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
    return total


def until_eos(row, eos):
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def test_greedy_from_a_generation_config_is_the_default(model):
    ids, px = prompt(model)
    default = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=6)
    config = model.generate(input_ids=ids, pixel_values=px, generation_config=GenerationConfig(max_new_tokens=6))
    assert torch.equal(default, config) and default.shape[1] <= 6
    assert model.generation_config.max_new_tokens == 64 and not model.generation_config.do_sample
    # keyword arguments override the config's fields
    assert model.generate(input_ids=ids, pixel_values=px, generation_config=GenerationConfig(max_new_tokens=9),
                          max_new_tokens=3).shape[1] <= 3


def test_beam_search_scores_are_the_sequences_log_likelihood(model):
    ids, px = prompt(model)
    eos = model.tokenizer.eos_id
    config = GenerationConfig(max_new_tokens=4, num_beams=4, num_return_sequences=3, length_penalty=0.0)
    out = model.generate(input_ids=ids, pixel_values=px, generation_config=config, return_dict_in_generate=True,
                         output_scores=True)
    assert out.sequences.shape[0] == 3 and len({tuple(r.tolist()) for r in out.sequences}) == 3
    scores = out.sequences_scores.tolist()
    assert scores == sorted(scores, reverse=True)
    for row, score in zip(out.sequences, scores):
        assert abs(log_likelihood(model, ids, px, until_eos(row, eos)) - score) < 1e-4
    # Beam search need not beat greedy past the first step (the greedy prefix can fall out of the beam), but
    # one step of it is exact: the three likeliest next tokens, in order, with their log-probabilities.
    first = model.generate(input_ids=ids, pixel_values=px, return_dict_in_generate=True, output_scores=True,
                           generation_config=GenerationConfig(max_new_tokens=1, num_beams=4, num_return_sequences=3,
                                                              length_penalty=0.0))
    with torch.no_grad():
        seq, _, _ = model.expand_image_tokens(ids)
        logits = model.llm(inputs_embeds=model.embed(seq, model.image_features(px)), use_cache=False).logits[0, -1]
    log_p = torch.log_softmax(logits.double(), -1)
    log_p[model.tokenizer.image_token_id] = float("-inf")  # generation never emits the image placeholder
    top = log_p.topk(3)
    assert first.sequences[:, -1].tolist() == top.indices.tolist()
    assert torch.allclose(first.sequences_scores.double(), top.values, atol=1e-4)
    greedy = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=4)[0]
    one_beam = model.generate(input_ids=ids, pixel_values=px, generation_config=GenerationConfig(max_new_tokens=4,
                                                                                                 num_beams=1))
    assert torch.equal(one_beam[0], greedy)


def test_sampling(model, seed):
    ids, px = prompt(model)
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0)
    torch.manual_seed(seed)
    a = model.generate(input_ids=ids, pixel_values=px, generation_config=config)
    torch.manual_seed(seed)
    b = model.generate(input_ids=ids, pixel_values=px, generation_config=config)
    assert torch.equal(a, b)
    draws = {tuple(model.generate(input_ids=ids, pixel_values=px, generation_config=config)[0].tolist())
             for _ in range(4)}
    assert len(draws) > 1  # a random tiny model's next-token distribution is far from one-hot
    top1 = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=1)  # sampling from the argmax alone
    greedy = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=6)
    assert torch.equal(model.generate(input_ids=ids, pixel_values=px, generation_config=top1), greedy)
    # a sampled image placeholder is suppressed too
    assert model.tokenizer.image_token_id not in a.tolist()[0]


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamers_receive_the_new_tokens(model, capsys):
    ids, px = prompt(model)
    recorder = Recorder()
    new = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, streamer=recorder)
    assert recorder.ended and recorder.puts[0] == [[]]  # the prompt is embeddings: no prompt tokens to stream
    assert [t for put in recorder.puts[1:] for t in put] == new[0].tolist()
    image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()
    capsys.readouterr()
    answer = model.generate(images=[image], prompt="What is this?", max_new_tokens=8,
                            streamer=TextStreamer(model.tokenizer))
    assert capsys.readouterr().out.strip() == answer


def test_the_generate_command_streams_and_searches_beams(tmp_path, capsys, seed):
    from comm_fast.cli import main

    model = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).eval()
    model.save_pretrained(tmp_path / "m")
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "4"]
    capsys.readouterr()
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out.strip() == plain.strip() == model.generate(prompt="hi", max_new_tokens=4)
    assert main([*args, "--num-beams", "3"]) == 0
    assert capsys.readouterr().out.strip() == model.generate(prompt="hi", max_new_tokens=4, num_beams=3)


def favour(model, token_id):
    """A hook that makes ``token_id`` the LM head's clear favourite at every step (remove() it after)."""
    def hook(module, args, out):
        return out.index_add(-1, torch.tensor([token_id]), torch.full_like(out[..., :1], 1e4))
    return model.llm.lm_head.register_forward_hook(hook)


def test_a_left_padded_batch_with_one_image_token_per_image_scores_as_each_prompt_alone(model):
    """Prompts of different lengths, each with one <image> token that generate expands to the visual
    tokens, left-padded into one batch: each row's first-step scores are those of its prompt alone."""
    tok = model.tokenizer
    rows = [[tok.bos_id, *tok.encode("USER: "), tok.image_token_id, *tok.encode(q + " ASSISTANT:")]
            for q in (" hi", " where is the big red circle?")]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    px = (torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56))
    kw = dict(max_new_tokens=2, return_dict_in_generate=True, output_scores=True)
    both = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw)
    for b in range(2):
        alone = model.generate(input_ids=torch.tensor([rows[b]]), pixel_values=(px[0][b:b + 1], px[1][b:b + 1]), **kw)
        torch.testing.assert_close(both.scores[0][b], alone.scores[0][0], rtol=0, atol=1e-4)


def test_generation_config_fields_and_keywords_reach_the_decoder(model):
    """As transformers' generate has them: a bare GenerationConfig gives the documented 64 new tokens, its
    suppress_tokens hold, logits processors and do_sample given as keywords are applied."""
    from transformers import LogitsProcessor, LogitsProcessorList

    tok = model.tokenizer
    ids = torch.tensor([[tok.bos_id, 65]])
    assert model.generate(input_ids=ids, generation_config=GenerationConfig(), suppress_tokens=[tok.eos_id]).shape == (1, 64)
    handle = favour(model, tok.eos_id)
    try:
        new = model.generate(input_ids=ids, generation_config=GenerationConfig(max_new_tokens=4,
                                                                               suppress_tokens=[tok.eos_id]))
        assert new.shape == (1, 4) and tok.eos_id not in new[0].tolist()
    finally:
        handle.remove()

    class OnlyA(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, -float("inf"))
            out[:, 65] = 0
            return out

    assert model.generate(input_ids=ids, max_new_tokens=3,
                          logits_processor=LogitsProcessorList([OnlyA()])).tolist() == [[65, 65, 65]]
    draws = set()
    for s in range(4):
        torch.manual_seed(s)
        draws.add(tuple(model.generate(input_ids=ids, max_new_tokens=6, do_sample=True, top_k=0)[0].tolist()))
    assert len(draws) > 1


def test_prompt_strings_in_and_out(model, seed):
    """prompt= returns a string for a string and a list for a list (of one too), stripped as eval's answers
    are; pixel_values stand for images; a list of eos ids (transformers allows one) stops decoding."""
    import numpy as np

    assert isinstance(model.generate(prompt="hi", max_new_tokens=3), str)
    out = model.generate(prompt=["hi"], max_new_tokens=3)
    assert isinstance(out, list) and len(out) == 1
    image = np.random.default_rng(seed).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert model.generate(prompt="What?", images=[image], max_new_tokens=4) == model.generate(
        prompt="What?", pixel_values=model.processor.pixel_values([image]), max_new_tokens=4)
    handle = favour(model, ord(" "))
    try:
        assert model.generate(prompt="hi", max_new_tokens=3) == ""  # three spaces, stripped
    finally:
        handle.remove()
    model.generation_config.eos_token_id = [model.tokenizer.eos_id, ord(".")]
    handle = favour(model, ord("."))
    try:
        assert model.generate(prompt="hi", max_new_tokens=3) == ""  # "." ends it and is not shown
    finally:
        handle.remove()
