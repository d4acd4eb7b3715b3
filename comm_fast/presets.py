"""Model presets for random init: each one's shape, its tokenizer (whose special ids the shape uses), and
the training defaults that go with it.

    tiny       byte tokenizer (260 ids), 56 px images -> 4x4 = 16 visual tokens; a training step in ~0.1-0.3 s
    grounding  tiny's model at 112 px -> 8x8 = 64 visual tokens, sequences up to 1,024 tokens (grounding
               dialogues asking every object's box), no system prompt (Vicuna's 192 bytes would be ~45% of a
               sequence); benchmarks/grounding.py trains and scores it
    1b         GPU profiling: CLIP ViT-L/14-336 + DINOv2 ViT-L/14 at 336 (576 tokens) + a ~1.1B LLaMA (TinyLlama
               shape), LLaMA's special ids (the byte tokenizer's "llama" layout)
    comm-7b    the paper's model: Vicuna-7B, CLIP ViT-L/14-336 (layers 1-24), DINOv2 ViT-L/14 (layers 19-24) at
               336, Vicuna's special ids (<unk>/pad 0, <s> 1, </s> 2, <image> 32000)

A model of a preset is ``COMMForCausalLM(preset.config(), preset.tokenizer())``; ``check_tokenizer`` says
when a tokenizer and a config disagree on an id (which would train, or fail, on the wrong tokens).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

from comm_fast.config import COMMVisionConfig
from comm_fast.data.tokenizer import ByteTokenizer
from comm_fast.models import ViTConfig

# (pretrain, finetune) peak learning rates of a model that starts from pretrained weights (LLaVA's)
PRETRAINED_LR = (1e-3, 2e-5)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[..., object]          # (tokenizer, **vision_overrides) -> COMMConfig
    layout: str                           # ByteTokenizer layout whose ids the shape uses
    lr: tuple[float, float] = PRETRAINED_LR  # (pretrain, finetune) learning-rate defaults
    cpu_threads: int | None = None        # torch CPU threads by default (None: torch's own)
    profile_batch: int = 8                # profile-train's default batch
    system: str | None = None             # the conversation's system prompt (None: Vicuna's; "" for none)

    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer(self.layout, self.system)

    def config(self, **vision_overrides):
        return self.build(self.tokenizer(), **vision_overrides)


def _clip(hidden, layers, heads, mlp, image_size):
    return ViTConfig(family="clip", hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_hidden=mlp,
                     patch_size=14, image_size=image_size, layer_norm_eps=1e-5, activation="quick_gelu",
                     pre_norm=True, patch_bias=False).to_dict()


def _dino(hidden, layers, heads, mlp, image_size):
    return ViTConfig(family="dinov2", hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_hidden=mlp,
                     patch_size=14, image_size=image_size, layer_norm_eps=1e-6, activation="gelu",
                     layerscale=True).to_dict()


def _llama(tok, vocab, hidden, layers, heads, kv_heads, inter, max_pos, rms_norm_eps=1e-5):
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=max_pos,
                rms_norm_eps=rms_norm_eps, tie_word_embeddings=False, bos_token_id=tok.bos_id,
                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def _tiny(tok, image_size=56, max_length=512, **overrides):
    from comm_fast.mllm import COMMConfig

    vision = COMMVisionConfig(**{**dict(clip=_clip(64, 3, 4, 128, image_size), dino=_dino(64, 3, 4, 128, image_size),
                                        clip_layers=(1, 2, 3), dino_layers=(2, 3), mlp_ratio=2, out_dim=128,
                                        clip_image_size=image_size, dino_image_size=image_size), **overrides})
    text = _llama(tok, tok.vocab_size, 128, 4, 4, 4, 344, 1024)
    return COMMConfig(vision, text, tok.image_token_id, max_length=max_length)


def _grounding(tok, **overrides):
    """tiny's model at 112 px: an 8x8 grid of visual tokens, for boxes finer than a quarter of the image."""
    return _tiny(tok, image_size=112, max_length=1024, **overrides)


def _1b(tok, **overrides):
    from comm_fast.mllm import COMMConfig

    vision = COMMVisionConfig(clip=_clip(1024, 24, 16, 4096, 336), dino=_dino(1024, 24, 16, 4096, 518),
                              out_dim=2048, **overrides)
    text = _llama(tok, 32000, 2048, 22, 32, 4, 5632, 2048)
    return COMMConfig(vision, text, tok.image_token_id, max_length=2048)


def _comm_7b(tok, **overrides):
    from comm_fast.mllm import COMMConfig

    vision = COMMVisionConfig(clip=_clip(1024, 24, 16, 4096, 336), dino=_dino(1024, 24, 16, 4096, 518),
                              out_dim=4096, **overrides)
    text = _llama(tok, 32000, 4096, 32, 32, 32, 11008, 4096, rms_norm_eps=1e-6)
    return COMMConfig(vision, text, tok.image_token_id, max_length=2048)


# the tiny models learn from scratch: a high rate in both stages, and one CPU thread, as their small matmuls
# gain little from a second thread and lose badly when cores are shared (grounding, 2 cores at load ~3.5:
# 0.44 s a step with one thread, 2.3-6 s with two)
PRESETS = {p.name: p for p in (
    Preset("tiny", _tiny, "bytes", lr=(2e-3, 2e-3), cpu_threads=1),
    Preset("grounding", _grounding, "bytes", lr=(2e-3, 2e-3), cpu_threads=1, system=""),
    Preset("1b", _1b, "llama"),
    Preset("comm-7b", _comm_7b, "llama", profile_batch=4),
)}


def get(name: str | Preset) -> Preset:
    """The preset of a name (a Preset is its own)."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def _plain(x):
    return json.loads(json.dumps(x))


def match(config) -> Preset | None:
    """The preset a model's config was built from (same decoder and encoder shapes), or None."""
    for preset in PRESETS.values():
        ref = preset.config()
        text = {k: v for k, v in ref.text.items() if k != "attention_dropout"}
        if (_plain(text) == _plain({k: config.text.get(k) for k in text})
                and _plain(ref.vision.clip) == _plain(config.vision.clip)
                and _plain(ref.vision.dino) == _plain(config.vision.dino)):
            return preset
    return None


def check_tokenizer(config, tokenizer) -> None:
    """ValueError when ``tokenizer`` and ``config`` disagree on a special id, or the tokenizer's ids pass the
    decoder's vocabulary."""
    text = config.text
    wanted = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    wrong = [f"{k} {text.get(k)} (tokenizer: {v})" for k, v in wanted.items()
             if text.get(k) is not None and text.get(k) != v]
    if config.image_token_id != tokenizer.image_token_id:
        wrong.append(f"image_token_id {config.image_token_id} (tokenizer: {tokenizer.image_token_id})")
    if wrong:
        raise ValueError("tokenizer: its special ids differ from the model config's: " + ", ".join(wrong))
    if tokenizer.vocab_size > text["vocab_size"]:
        raise ValueError(f"tokenizer: {tokenizer.vocab_size} ids do not fit the decoder's vocabulary of "
                         f"{text['vocab_size']}")
