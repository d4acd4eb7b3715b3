"""Random-weight Hugging Face models written with save_pretrained (no network): vision encoders, a tiny Llama."""
from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel)

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14, image_size=56)


def randomise(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random, LayerNorm weights and LayerScale too (so no identity hides a bug)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layer_scale" in name or "layrnorm" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model.eval()


def hf_clip(**overrides) -> CLIPVisionModel:
    cfg = CLIPVisionConfig(**{**SMALL, "intermediate_size": 128, **overrides})
    return randomise(CLIPVisionModel(cfg))


def hf_dinov2(**overrides) -> Dinov2Model:
    return randomise(Dinov2Model(Dinov2Config(**{**SMALL, **overrides})))


def hf_dinov2_reg(**overrides) -> Dinov2WithRegistersModel:
    cfg = Dinov2WithRegistersConfig(**{**SMALL, "num_register_tokens": 4, **overrides})
    return randomise(Dinov2WithRegistersModel(cfg))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def hf_llama_with_tokenizer(directory):
    """A random tiny Llama and a BPE tokenizer trained on the spot (no network), saved like a Vicuna dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from comm_fast.data.conversation import SYSTEM

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [SYSTEM, "USER: ASSISTANT: Where is the red circle? Answer with a box. [0.123,0.456,0.789,0.912]",
              "A blue square and a green triangle on a striped background. What is at"]
    bpe.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(directory)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
