"""COMMForCausalLM.from_components: a COMM model assembled from separate local LLM, CLIP and DINOv2 checkpoints
(random weights written with save_pretrained) is built as COMMForCausalLM(config) builds one."""
import pytest
import torch

from comm_fast import COMMConfig, COMMForCausalLM
from comm_fast.models import packing


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from hf_models import hf_clip, hf_dinov2, hf_llama_with_tokenizer
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("parts")
    hf_llama_with_tokenizer(d / "llm")
    hf_clip().save_pretrained(d / "clip")
    hf_dinov2().save_pretrained(d / "dino")
    LlamaForCausalLM.from_pretrained(d / "llm").to(torch.bfloat16).save_pretrained(d / "llm-bf16")  # no tokenizer
    return d


def tower_options():
    """The tiny preset's tower, as `comm-fast train --llm/--clip/--dino` builds it."""
    vision = COMMConfig.preset("tiny").vision.to_dict()
    return {k: vision[k] for k in ("clip_layers", "dino_layers", "clip_image_size", "dino_image_size")}


def test_built_in_float32_with_frozen_encoders_and_the_packed_attention(parts):
    model = COMMForCausalLM.from_components(parts / "llm-bf16", parts / "clip", parts / "dino", **tower_options())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # whatever the checkpoint's dtype
    assert not any(p.requires_grad for p in (*model.vision.clip.parameters(), *model.vision.dino.parameters()))
    assert model.vision.projector.weight.requires_grad
    assert model.llm.config._attn_implementation == packing.attention_implementation()


def test_the_given_image_token_and_max_length_are_kept(parts):
    model = COMMForCausalLM.from_components(parts / "llm-bf16", parts / "clip", parts / "dino", image_token_id=7,
                                            max_length=77, **tower_options())
    assert model.tokenizer is None  # that LLM directory has none
    assert model.config.image_token_id == 7 and model.config.max_length == 77
