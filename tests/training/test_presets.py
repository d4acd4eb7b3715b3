"""Every preset trains and profiles from random init with its own tokenizer and special ids: the full
shapes are built on the meta device, and one training step runs at reduced size (narrow, shallower
encoders at 112 px, a narrow 2-layer decoder; the vocabulary, tokenizer, special ids and options kept)."""
import dataclasses
import json

import pytest
import torch

from comm_fast import COMMForCausalLM, presets
from comm_fast.cli import main as cli
from comm_fast.mllm import COMMConfig

# outside ground truth: parameter counts published for the decoders (Vicuna-7B = LLaMA-7B, TinyLlama-1.1B)
LLM_PARAMS = {"comm-7b": 6_738_415_616, "1b": 1_100_048_384}
IMAGE_TOKENS = {"tiny": 16, "grounding": 64, "1b": 576, "comm-7b": 576}


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_full_preset_builds_on_meta_with_its_tokenizer(name):
    preset = presets.get(name)
    config, tok = preset.config(), preset.tokenizer()
    presets.check_tokenizer(config, tok)  # the ids the shape uses are the tokenizer's
    with torch.device("meta"):
        model = COMMForCausalLM(config, tok)
    assert model.num_image_tokens == IMAGE_TOKENS[name]
    if name in LLM_PARAMS:
        assert sum(p.numel() for p in model.llm.parameters()) == LLM_PARAMS[name]
        # Vicuna's special ids: <unk>/pad 0, <s> 1, </s> 2; <image> just past the vocabulary
        assert (config.text["pad_token_id"], config.text["bos_token_id"], config.text["eos_token_id"]) == (0, 1, 2)
        assert config.image_token_id == config.text["vocab_size"] == 32000
        assert tok.encode("A") == [ord("A") + 3]  # LLaMA's byte-fallback id of 0x41, <0x41>
    assert presets.match(config) is preset


def test_a_tokenizer_with_other_ids_is_refused():
    config = presets.get("comm-7b").config()
    with pytest.raises(ValueError, match="bos_token_id 1 \\(tokenizer: 257\\)"):
        presets.check_tokenizer(config, presets.get("tiny").tokenizer())


@pytest.mark.parametrize("name", ["tiny", "grounding"])
def test_small_presets_take_any_vision_override(name):
    """The layers too (the ablation's one-encoder variants), and aspect; the grounding preset is tiny at 112 px."""
    vision = presets.get(name).config(clip_layers=(3,), dino_layers=(), aspect="crop").vision
    assert vision.branches == ("clip",) and vision.clip_layers == (3,) and vision.aspect == "crop"
    assert presets.get(name).config().vision.aspect == "pad"
    if name == "grounding":
        tiny, grounding = presets.get("tiny").config(), presets.get(name).config()
        assert grounding.vision.clip_image_size == grounding.vision.clip["image_size"] == 112
        assert dataclasses.replace(grounding.vision, clip=tiny.vision.clip, dino=tiny.vision.dino, clip_image_size=56,
                                   dino_image_size=56) == tiny.vision
        assert grounding.text == tiny.text and grounding.max_length == 1024


def _reduced(preset):
    """The preset at a size a CPU test affords: 6-block encoders of width 32 at 112 px (the last two DINOv2
    blocks merged, as the last quarter of 24), a 2-layer decoder of width 64; everything else kept."""
    if preset.name in ("tiny", "grounding"):
        return preset

    def build(tok, **overrides):
        full = preset.build(tok, **overrides)
        vit = dict(hidden_size=32, num_heads=2, mlp_hidden=64, num_layers=6)
        vision = dataclasses.replace(full.vision, clip={**full.vision.clip, **vit, "image_size": 112},
                                     dino={**full.vision.dino, **vit}, out_dim=64, clip_layers=tuple(range(1, 7)),
                                     dino_layers=(5, 6), clip_image_size=112, dino_image_size=112)
        heads, kv = full.text["num_attention_heads"], full.text["num_key_value_heads"]
        text = {**full.text, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 4 if kv == heads else 2}
        return COMMConfig(vision, text, full.image_token_id, full.max_length)

    return dataclasses.replace(preset, build=build)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_trains_and_profiles_one_step(name, tmp_path, monkeypatch):
    monkeypatch.setitem(presets.PRESETS, name, _reduced(presets.PRESETS[name]))
    out = tmp_path / "run"
    assert cli(["train", "--preset", name, "--steps", "1", "--batch-size", "2", "--synthetic-n", "4", "--no-progress",
                "--out", str(out)]) == 0
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step["loss"] > 0 and step["images_per_s"] > 0
    model = COMMForCausalLM.from_pretrained(out / "model")  # saved with its tokenizer
    assert model.tokenizer.layout == presets.get(name).layout
    assert model.tokenizer.system == presets.get(name).system  # the preset's system prompt, saved with the model
    assert model.config.image_token_id == model.tokenizer.image_token_id
    assert cli(["profile-train", "--preset", name, "--steps", "1", "--warmup", "0", "--batch-size", "2",
                "--no-padded", "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["variants"]["ours_packed"]["tokens_per_s"] > 0
