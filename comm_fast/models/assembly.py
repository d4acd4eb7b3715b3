"""Building a COMMForCausalLM from parts, and writing and reading its directories.

- ``save`` / ``load``: the Hugging Face layout (transformers' save_pretrained / from_pretrained: config.json with
  model_type "comm", safetensors sharded with an index, generation_config.json) plus the tokenizer and processor
  files; ``load`` refuses weights that do not fit, naming them. Directories of the earlier layout (config.json
  with ``config_type: comm_causal_lm``, one model.safetensors with the same keys) load the same way: only their
  config.json differs, and COMMConfig.from_dict reads it.
- ``from_components`` / ``assemble``: a Llama checkpoint and the two encoders, or modules already built.
"""
from __future__ import annotations

import copy
import os

import torch

from comm_fast.mllm_config import LEGACY_CONFIG_TYPE, MODEL_TYPE, COMMConfig
from comm_fast.models import loading

TIED_HEAD = "llm.lm_head.weight"


def save(model, directory, state_dict, save_pretrained, **kwargs) -> None:
    """``save_pretrained`` (transformers') into a temporary directory renamed over ``directory``, then the
    tokenizer and the processor files."""
    from comm_fast._io import atomic_directory
    from comm_fast.models.processing import COMMProcessor

    if state_dict is not None and model.config.text.get("tie_word_embeddings"):
        state_dict = {k: v for k, v in state_dict.items() if k != TIED_HEAD}  # shares the embedding's storage
    with atomic_directory(directory) as tmp:
        save_pretrained(tmp, state_dict=state_dict, **kwargs)
        if model.tokenizer is not None:
            COMMProcessor.of(model).save_pretrained(tmp)  # processor_config.json + the tokenizer


def read_config(directory) -> tuple[str, dict]:
    """(directory, config.json) of a saved COMM model, either layout; errors say what the directory holds."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model: no such directory: {directory}")
    data = loading.read_json(os.path.join(directory, "config.json"))
    if data.get("model_type") != MODEL_TYPE and data.get("config_type") != LEGACY_CONFIG_TYPE:
        raise ValueError(f"{directory}/config.json: not a saved COMMForCausalLM (config_type "
                         f"{data.get('config_type')!r}, model_type {data.get('model_type')!r}; expected model_type "
                         f"{MODEL_TYPE!r}, or config_type {LEGACY_CONFIG_TYPE!r} of the earlier layout)")
    return directory, data


def load(cls, path, dtype, from_pretrained, *model_args, **kwargs):
    """COMMForCausalLM ``cls`` from a directory of either layout; ``from_pretrained`` is transformers'."""
    from comm_fast.data.tokenizer import load_tokenizer

    directory, _ = read_config(path)
    dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
    dtype = torch.float32 if dtype is None else dtype
    want_info = kwargs.pop("output_loading_info", False)
    kwargs.setdefault("local_files_only", True)
    model, info = from_pretrained(directory, *model_args, dtype=dtype, output_loading_info=True, **kwargs)
    _check_loaded(directory, info)
    model.tokenizer = load_tokenizer(directory, model.config.image_token_id)
    model.freeze_encoders()
    return (model, info) if want_info else model


def _check_loaded(directory, info: dict) -> None:
    """transformers warns about weights that did not load; here they are an error, each kind named."""
    problems = [f"{kind.replace('_', ' ')} {sorted(map(str, info[kind]))[:8]} ({len(info[kind])} in all)"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise ValueError(f"{directory}: checkpoint does not fit COMMForCausalLM: " + "; ".join(problems))


def from_components(cls, llm_path, clip_path, dino_path, image_token_id: int | None = None, max_length: int = 2048,
                    **vision_overrides):
    """A Llama/Vicuna checkpoint + a CLIP + a DINOv2 checkpoint (local directories); new merge heads."""
    from transformers import LlamaForCausalLM

    from comm_fast.data.tokenizer import load_tokenizer
    from comm_fast.models.packing import attention_implementation
    from comm_fast.tower import COMMVisionTower

    llm = LlamaForCausalLM.from_pretrained(os.fspath(llm_path), local_files_only=True,
                                           attn_implementation=attention_implementation(), dtype=torch.float32)
    tokenizer = load_tokenizer(llm_path, image_token_id)
    if image_token_id is None:
        image_token_id = tokenizer.image_token_id if tokenizer is not None else llm.config.vocab_size
    vision_overrides.setdefault("out_dim", llm.config.hidden_size)
    tower = COMMVisionTower.from_pretrained(clip_path, dino_path, **vision_overrides)
    return assemble(cls, tower, llm, image_token_id, tokenizer, max_length)


def assemble(cls, tower, llm, image_token_id: int, tokenizer=None, max_length: int = 2048):
    """Wrap an existing tower and LlamaForCausalLM without copying weights."""
    text = llm.config.to_dict()
    text = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version", "_name_or_path",
                                                        "dtype", "torch_dtype", "model_type")}
    config = COMMConfig(copy.deepcopy(tower.config), text, image_token_id, max_length)
    with torch.device("meta"):
        model = cls(config)
    model.vision, model.llm, model.tokenizer = tower, llm, tokenizer
    model.freeze_encoders()
    return model
