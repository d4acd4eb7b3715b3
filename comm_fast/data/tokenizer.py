"""Tokenizers that work with no network.

The presets use ``ByteTokenizer``: UTF-8 bytes are tokens (0..255, or LLaMA's byte-fallback ids),
then a few special tokens. It needs no training and no files, so a model trained on any text round-trips.
It is saved next to the model in Hugging Face's format, so ``AutoTokenizer.from_pretrained`` gives the same
ids: ``tokenizer.json`` (a byte-level model of the layout's ids, no merges) and ``tokenizer_config.json``
(the special tokens, literal special-token text, and comm_fast's own fields). Real checkpoints (Vicuna,
LLaVA) bring their own Hugging Face tokenizer, wrapped by ``HFTokenizer`` and loaded from the local directory.
Either way ``<image>`` is never a text token: the conversation code splits on it and inserts
``image_token_id`` itself.
"""
from __future__ import annotations

import json
import os

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (the printable Latin-1 ones as
    themselves, the rest shifted past 255), the form Hugging Face's byte-level tokenizers store."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


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

    @property
    def pad_token(self) -> str:
        return "<pad>" if self.layout == "bytes" else "<unk>"  # LLaMA's pad is its <unk>, as in LLaVA

    def special_tokens(self) -> dict[str, int]:
        return {self.pad_token: self.pad_id, "<s>": self.bos_id, "</s>": self.eos_id, "<image>": self.image_token_id}

    def save(self, directory: str) -> None:
        """tokenizer.json and tokenizer_config.json in Hugging Face's format (see the module docstring)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        special = self.special_tokens()
        vocab = {char: b + self.byte_offset for b, char in bytes_to_unicode().items()} | special
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every byte its own token
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        tok.save(os.path.join(directory, TOKENIZER_FILE))
        config = {"tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": self.pad_token,
                  "split_special_tokens": True,  # "<s>" in text is five bytes, as ByteTokenizer.encode has it
                  "clean_up_tokenization_spaces": False,
                  "comm_fast_tokenizer": self.kind, "layout": self.layout, "vocab_size": self.vocab_size}
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config if self.system is None else {**config, "system": self.system}, f, indent=2)


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
    """The tokenizer saved in ``directory``: ours (tokenizer_config.json naming comm_fast_tokenizer, or the
    earlier layout's tokenizer.json that held those fields alone) or a Hugging Face one; None when the
    directory holds none."""
    for name in (TOKENIZER_CONFIG_FILE, TOKENIZER_FILE):
        path = os.path.join(os.fspath(directory), name)
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
