"""Turn a Hugging Face LlavaForConditionalGeneration checkpoint into a COMM model.

LLaVA's CLIP tower and its LLaMA decoder (with lm_head) are reused as they are; a DINOv2 encoder is
added from ``dino_path``; the COMM merge modules, the DINOv2 MLP and the projector are new and
initialised as docs/architecture.md §1 says (LayerNorm identity, α = 1/L, Linear default). LLaVA's own
projector (Linear-GELU-Linear over one CLIP layer) has no counterpart and is dropped.
"""
from __future__ import annotations

import os
import tempfile

import torch


def from_llava(directory, dino_path, **vision_overrides):
    """COMMForCausalLM from a local LLaVA directory and a DINOv2 checkpoint (directory or .pth)."""
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    from comm_fast.data.tokenizer import load_tokenizer
    from comm_fast.mllm import COMMForCausalLM
    from comm_fast.models.packing import attention_implementation
    from comm_fast.models import loading
    from comm_fast.tower import COMMVisionTower

    directory = os.fspath(directory)
    data = loading.read_json(os.path.join(directory, "config.json"))
    if data.get("model_type") != "llava":
        raise ValueError(f"{directory}/config.json: expected a LLaVA checkpoint (model_type 'llava'), "
                         f"got {data.get('model_type')!r}")
    llava = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    cfg = llava.config
    if cfg.text_config.model_type != "llama":
        raise ValueError(f"{directory}: from_llava supports LLaMA-family decoders, got "
                         f"{cfg.text_config.model_type!r}")
    vis = cfg.vision_config
    n_clip = vis.num_hidden_layers
    # CLIP: through a temporary Hugging Face directory, so the tower's own loader does the mapping
    with tempfile.TemporaryDirectory() as tmp:
        llava.model.vision_tower.save_pretrained(tmp)
        dino_layers = vision_overrides.pop("dino_layers", None)
        tower = COMMVisionTower.from_pretrained(
            tmp, dino_path, **{"clip_layers": tuple(range(1, n_clip + 1)), "clip_image_size": vis.image_size,
                               "dino_image_size": vis.image_size, "out_dim": cfg.text_config.hidden_size,
                               **vision_overrides, "dino_layers": dino_layers or (1,)})
    if dino_layers is None:  # the last six DINOv2 blocks, as 19..24 of ViT-L
        n_dino = tower.dino.config.num_layers
        tower = _with_dino_layers(tower, tuple(range(max(1, n_dino - 5), n_dino + 1)))

    llm = LlamaForCausalLM._from_config(cfg.text_config, attn_implementation=attention_implementation())
    sd = {"model." + k: v for k, v in llava.model.language_model.state_dict().items()}
    sd["lm_head.weight"] = llava.lm_head.weight
    missing, unexpected = llm.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.text_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{directory}: LLaVA decoder does not fit LlamaForCausalLM (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    image_token_id = getattr(cfg, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(cfg, "image_token_index", cfg.text_config.vocab_size)
    tokenizer = load_tokenizer(directory, image_token_id)
    return COMMForCausalLM.assemble(tower, llm, image_token_id, tokenizer)


def _with_dino_layers(tower, layers):
    """The same tower with another dino_layers (only dino_merge changes shape; it is freshly initialised)."""
    from comm_fast.tower import MultiLevelMerge

    tower.config.dino_layers = tuple(layers)
    old = tower.dino_merge
    d = tower.dino.config.hidden_size
    tower.dino_merge = MultiLevelMerge(len(layers), d, d, per_layer_linear=old.per_layer_linear,
                                       layer_weights=old.layer_weights, eps=old.eps)
    return tower
