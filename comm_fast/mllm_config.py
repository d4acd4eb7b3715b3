"""COMMConfig: a COMM model's configuration, a transformers ``PretrainedConfig`` (``model_type = "comm"``).

It nests the visual branch's ``COMMVisionConfig`` (``vision``; a dict in config.json) and the LLaMA decoder's
``LlamaConfig`` keyword arguments (``text``). This module imports no model code (COMMVisionConfig is imported
when a config is built), so that registering the class with ``AutoConfig`` costs next to nothing.
"""
from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PretrainedConfig

MODEL_TYPE = "comm"
LEGACY_CONFIG_TYPE = "comm_causal_lm"  # config.json of directories written before model_type "comm"


class COMMConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    vision: Any = None              # COMMVisionConfig
    text: dict | None = None        # LlamaConfig keyword arguments
    image_token_id: int | None = None  # may lie past the vocabulary: it is never embedded
    max_length: int = 2048          # longest training sequence (image tokens included)

    def __init__(self, vision=None, text: dict | None = None, image_token_id: int | None = None,
                 max_length: int = 2048, **kwargs):
        if isinstance(vision, dict):
            from comm_fast.config import COMMVisionConfig

            vision = COMMVisionConfig.from_dict(vision)
        if text is not None and not isinstance(text, dict):
            raise TypeError(f"text: expected a dict of LlamaConfig keyword arguments, got {type(text).__name__}")
        self.vision, self.text = vision, (dict(text) if text is not None else None)
        self.image_token_id, self.max_length = image_token_id, max_length
        super().__init__(**kwargs)
        if vision is not None and text is not None and vision.out_dim != text.get("hidden_size"):
            raise ValueError(f"vision.out_dim: {vision.out_dim} must equal the LLM's hidden_size "
                             f"{text.get('hidden_size')}")

    def llama_config(self):
        from transformers import LlamaConfig

        if self.text is None or self.vision is None:
            raise ValueError("config: a COMM model needs vision (a COMMVisionConfig) and text (LlamaConfig kwargs)")
        return LlamaConfig(**self.text)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, and equal to its own JSON round trip (a resumed run compares the two)."""
        data = super().to_dict()
        for name in ("id2label", "label2id"):  # a classifier's labels (int keys, strings in JSON): none here
            data.pop(name, None)
        data["vision"] = self.vision.to_dict() if self.vision is not None else None
        data["text"] = dict(self.text) if self.text is not None else None
        return data

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """From ``to_dict()``'s output, or from the config.json of a directory written before model_type
        "comm" (``config_type: comm_causal_lm``)."""
        if config_dict.get("config_type") == LEGACY_CONFIG_TYPE:
            config_dict = {k: v for k, v in config_dict.items() if k != "config_type"}
        elif config_dict.get("model_type") not in (None, MODEL_TYPE) or "config_type" in config_dict:
            raise ValueError(f"config: expected model_type {MODEL_TYPE!r} (or config_type {LEGACY_CONFIG_TYPE!r}), "
                             f"got model_type {config_dict.get('model_type')!r}, "
                             f"config_type {config_dict.get('config_type')!r}")
        return super().from_dict(dict(config_dict), **kwargs)

    @classmethod
    def preset(cls, name: str, **vision_overrides) -> "COMMConfig":
        """The config of a preset (comm_fast.presets, where each preset's tokenizer is too)."""
        from comm_fast.presets import get

        return get(name).config(**vision_overrides)
