"""COMMProcessor: a COMM model's inputs from text and images, saved next to the model (processor_config.json).

    questions    the Vicuna-v1 prompt (comm_fast.data.conversation), N image tokens per ``<image>``, left-padded
    dialogues    ``conversations=`` (LLaVA's format): input_ids and labels (the replies), right-padded
    images       ``joint_preprocess``: the (clip_pixels, dino_pixels) pair the visual branch reads

The output is the model's keyword arguments: ``model(**processor(text=..., images=...))`` and
``model.generate(**processor(...))``. Not a transformers ``ProcessorMixin``: that class holds Hugging Face
tokenizers only, and comm_fast's presets use their ByteTokenizer; the contract is the same
(``from_pretrained`` / ``save_pretrained`` / ``__call__`` / ``decode``), and ``AutoProcessor`` loads it once comm_fast
is imported.
"""
from __future__ import annotations

import json
import os

import torch

from comm_fast.config import COMMVisionConfig

PROCESSOR_FILE = "processor_config.json"  # transformers' PROCESSOR_NAME: AutoProcessor reads processor_class here


class COMMProcessor:
    def __init__(self, tokenizer, num_image_tokens: int, clip_image_size: int = 336, dino_image_size: int = 336,
                 aspect: str = COMMVisionConfig.aspect):  # the model's default image aspect
        if tokenizer is None:
            raise ValueError("tokenizer: a COMMProcessor needs one (ByteTokenizer or HFTokenizer), got None")
        self.tokenizer, self.num_image_tokens = tokenizer, int(num_image_tokens)
        self.clip_image_size, self.dino_image_size, self.aspect = int(clip_image_size), int(dino_image_size), aspect

    @classmethod
    def of(cls, model) -> "COMMProcessor":
        """The processor of a COMMForCausalLM (its tokenizer and its visual branch's image sizes)."""
        vision = model.config.vision
        return cls(model.tokenizer, model.num_image_tokens, vision.clip_image_size, vision.dino_image_size,
                   vision.aspect)

    # -- inputs ------------------------------------------------------------------------------------------------
    def __call__(self, text: str | list[str] | None = None, images=None, conversations: list | None = None,
                 **kwargs) -> dict:
        """``input_ids`` / ``attention_mask`` (+ ``labels`` for ``conversations``) and ``pixel_values``.

        ``text``: a question or a list of them (one per image when images come); ``conversations``: a list of
        LLaVA ``conversations`` lists; ``images``: uint8 images (a list of HxWx3 arrays, or a batch)."""
        unknown = sorted(set(kwargs) - {"return_tensors"})
        if unknown or kwargs.get("return_tensors", "pt") != "pt":
            raise ValueError(f"COMMProcessor: accepts text=, images=, conversations= and return_tensors='pt', got "
                             f"{unknown or kwargs}")
        if (text is None) == (conversations is None):
            raise ValueError("COMMProcessor: pass either text= (questions) or conversations= (dialogues)")
        if text is not None:
            input_ids, attention_mask = self.prompt_inputs(text, with_images=images is not None)
            out = {"input_ids": input_ids, "attention_mask": attention_mask}
        else:
            out = self.conversation_inputs(conversations)
        if images is not None:
            out["pixel_values"] = self.pixel_values(images)
        return out

    def prompt_inputs(self, prompt: str | list[str], with_images: bool = True):
        """Left-padded ``(input_ids, attention_mask)`` of the Vicuna-v1 prompt of a question or a list of
        them; with images, a question without ``<image>`` gets one in front."""
        from comm_fast.data.conversation import encode_prompt

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p if "<image>" in p or not with_images else "<image>\n" + p for p in prompts]
        rows = [encode_prompt(self.tokenizer, p, self.num_image_tokens) for p in prompts]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return input_ids, attention_mask

    def conversation_inputs(self, conversations: list) -> dict:
        """Right-padded input_ids, attention_mask and labels (-100 but on the replies and their </s>)."""
        from comm_fast.data.conversation import IGNORE_INDEX, tokenize_conversation

        rows = [tokenize_conversation(c, self.tokenizer, self.num_image_tokens)[:2] for c in conversations]
        width = max(len(ids) for ids, _ in rows)
        out = {"input_ids": torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
               "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)}
        for b, (ids, labels) in enumerate(rows):
            out["input_ids"][b, :len(ids)] = torch.from_numpy(ids)
            out["attention_mask"][b, :len(ids)] = 1
            out["labels"][b, :len(ids)] = torch.from_numpy(labels)
        return out

    def pixel_values(self, images):
        from comm_fast import ops

        return ops.joint_preprocess(images, self.clip_image_size, self.dino_image_size, aspect=self.aspect)

    def decode(self, ids, **kwargs) -> str:
        """The text of token ids (special tokens and image tokens dropped); transformers' keyword arguments
        (``skip_special_tokens``, ...) are accepted, so streamers can take the processor."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)

    def batch_decode(self, rows, **kwargs) -> list[str]:
        return [self.decode(row, **kwargs) for row in rows]

    # -- files ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"processor_class": type(self).__name__, "num_image_tokens": self.num_image_tokens,
                "image_token_id": self.tokenizer.image_token_id, "clip_image_size": self.clip_image_size,
                "dino_image_size": self.dino_image_size, "aspect": self.aspect}

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """processor_config.json and the tokenizer files, into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, PROCESSOR_FILE), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        self.tokenizer.save(os.fspath(save_directory))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "COMMProcessor":
        """From a directory ``save_pretrained`` (or COMMForCausalLM.save_pretrained) wrote; transformers'
        loading keyword arguments (``trust_remote_code``, ...) are accepted and have nothing to do here."""
        from comm_fast.data.tokenizer import load_tokenizer
        from comm_fast.models import loading

        directory = os.fspath(pretrained_model_name_or_path)
        path = os.path.join(directory, PROCESSOR_FILE)
        data = loading.read_json(path)
        if data.get("processor_class") != cls.__name__:
            raise ValueError(f"{path}: expected processor_class {cls.__name__!r}, got {data.get('processor_class')!r}")
        tokenizer = load_tokenizer(directory, data.get("image_token_id"))
        if tokenizer is None:
            raise FileNotFoundError(f"{directory}: no tokenizer files next to {PROCESSOR_FILE}")
        fields = ("num_image_tokens", "clip_image_size", "dino_image_size", "aspect")
        return cls(tokenizer, **{k: data[k] for k in fields if k in data})
