"""Tokenizers that work with no network.

The presets use ``ByteTokenizer``: UTF-8 bytes are tokens (0..255, or LLaMA's byte-fallback ids),
then a few special tokens. It needs no training and no files, so a model trained on any text round-trips,
and it is saved next to the model as ``tokenizer.json``. Real checkpoints (Vicuna, LLaVA) bring
their own Hugging Face tokenizer, wrapped by ``HFTokenizer`` and loaded from the local directory.
Either way ``<image>`` is never a text token: the conversation code splits on it and inserts
``image_token_id`` itself.
"""
from __future__ import annotations

import json
import os

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens plus the special ids of a layout:

    - ``"bytes"``: bytes 0..255, then ``<pad>`` 256, ``<s>`` 257, ``</s>`` 258, ``<image>`` 259 (260 ids);
    - ``"llama"``: LLaMA/Vicuna's own ids, ``<unk>`` 0 (the pad, as in LLaVA), ``<s>`` 1, ``</s>`` 2, the
      bytes at their byte-fallback ids ``<0x00>``..``<0xFF>`` = 3..258, and ``<image>`` 32000, just past the
      32000-token vocabulary (never embedded), so a model of a LLaMA-shaped preset trains from random init
      with the special ids a Vicuna checkpoint has.

    ``system``: the conversation's system prompt when it is not Vicuna's (saved with the tokenizer, so
    training, generation and evaluation of a model build the same sequences; "" for none).
    """

    kind = "bytes"
    LAYOUTS = {"bytes": dict(byte_offset=0, pad_id=256, bos_id=257, eos_id=258, image_token_id=259, vocab_size=260),
               "llama": dict(byte_offset=3, pad_id=0, bos_id=1, eos_id=2, image_token_id=32000, vocab_size=32000)}

    def __init__(self, layout: str = "bytes", system: str | None = None):
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(self.LAYOUTS)}, got {layout!r}")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system: expected a string or None, got {type(system).__name__}")
        self.layout, self.system = layout, system
        ids = self.LAYOUTS[layout]
        self.byte_offset = ids["byte_offset"]
        self.pad_id, self.bos_id, self.eos_id = ids["pad_id"], ids["bos_id"], ids["eos_id"]
        self.image_token_id, self.vocab_size = ids["image_token_id"], ids["vocab_size"]

    def encode(self, text: str) -> list[int]:
        return [b + self.byte_offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        lo = self.byte_offset
        return bytes(int(i) - lo for i in ids if lo <= int(i) < lo + 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            data = {"comm_fast_tokenizer": self.kind, "layout": self.layout, "vocab_size": self.vocab_size}
            json.dump(data if self.system is None else {**data, "system": self.system}, f)


class HFTokenizer:
    """A local Hugging Face tokenizer behind the same small interface."""

    kind = "hf"

    def __init__(self, tok, image_token_id: int):
        self.tok = tok
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.unk_token_id or 0)
        self.image_token_id = image_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self.tok.save_pretrained(directory)


def load_tokenizer(directory, image_token_id: int | None = None):
    """The tokenizer saved in ``directory``: ours (tokenizer.json naming comm_fast_tokenizer) or a
    Hugging Face one; None when the directory holds none."""
    path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: corrupt tokenizer file ({exc})") from None
        if isinstance(data, dict) and data.get("comm_fast_tokenizer") == "bytes":
            return ByteTokenizer(data.get("layout", "bytes"), data.get("system"))
    hf_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(directory, f)) for f in hf_files):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
    if image_token_id is None:
        image_token_id = tok.convert_tokens_to_ids("<image>")
        if image_token_id is None or image_token_id == tok.unk_token_id:
            image_token_id = len(tok)  # past the vocabulary: never embedded, always replaced
    return HFTokenizer(tok, image_token_id)
