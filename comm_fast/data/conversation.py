"""The Vicuna-v1 conversation template (as LLaVA's conv_vicuna_v1), label masking.

    "<system> USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"

Only the assistant replies and their </s> are trained on; the system prompt, the user turns and
the image tokens get label -100. Each ``<image>`` becomes ``num_image_tokens`` copies of the image
token id here, so sequence lengths are known before any image is read (packing needs them). A tokenizer
may carry its own system prompt (``tokenizer.system``, "" for none: a preset's), used in place of Vicuna's.
"""
from __future__ import annotations

import numpy as np

from comm_fast.data.boxes import format_box, parse_boxes  # noqa: F401  (their home; re-exported)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def system_prefix(tokenizer) -> str:
    """What precedes the first USER turn: the tokenizer's system prompt (Vicuna's by default) and a space."""
    system = getattr(tokenizer, "system", None)
    system = SYSTEM if system is None else system
    return system + " " if system else ""


def prompt_text(question: str, prefix: str = SYSTEM + " ") -> str:
    """The generation prompt for one user turn (the assistant's reply follows)."""
    return f"{prefix}USER: {question} ASSISTANT:"


def _encode(tokenizer, text: str, image_token_id: int, num_image_tokens: int) -> list[int]:
    ids: list[int] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.extend([image_token_id] * num_image_tokens)
        if piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def encode_prompt(tokenizer, question: str, num_image_tokens: int) -> list[int]:
    text = prompt_text(question, system_prefix(tokenizer))
    return [tokenizer.bos_id] + _encode(tokenizer, text, tokenizer.image_token_id, num_image_tokens)


def tokenize_conversation(conversations, tokenizer, num_image_tokens: int, max_length: int | None = None):
    """(input_ids, labels, truncated) as int32 arrays for one LLaVA ``conversations`` list."""
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    prefix = system_prefix(tokenizer)
    for turn in conversations:
        if turn["from"] == "human":
            toks = _encode(tokenizer, f"{prefix}USER: {turn['value']} ASSISTANT:", tokenizer.image_token_id,
                           num_image_tokens)
            ids += toks
            labels += [IGNORE_INDEX] * len(toks)
            prefix = ""
        else:  # the reply and its </s> are the targets
            toks = tokenizer.encode(" " + turn["value"]) + [tokenizer.eos_id]
            ids += toks
            labels += toks
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), truncated
