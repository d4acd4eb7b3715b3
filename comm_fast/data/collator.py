"""COMMDataCollator: dataset samples -> the keyword arguments of ``COMMForCausalLM.forward``, as a
``data_collator`` for ``transformers.Trainer`` (or any DataLoader's ``collate_fn``).

The batches are built as ``comm-fast train`` builds them (``comm_fast.data.dataset.collate`` for the token
layout, the training preprocessing for the images), so a Trainer step sees the same inputs and, with the
model's mean over the batch's label tokens, the same loss as ``comm-fast train`` on one process.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from comm_fast.data.dataset import Sample, collate, load_images

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


class COMMDataCollator:
    """Samples (``ConversationDataset`` items, or mappings with ``input_ids``, ``labels`` and ``images``:
    image paths) -> a batch dict: ``input_ids``, ``labels`` and ``attention_mask`` (padded) or
    ``position_ids`` (``pack=True``: rows of ``pack_length`` tokens, None: one row; packed rows need an
    attention that keeps samples apart, see comm_fast.models.packing), the images as ``pixel_values`` (the
    (clip, dino) pair, preprocessed here, in the data loader's workers) or, ``preprocess=False``, as
    ``images`` (uint8 arrays the model preprocesses), and ``return_logits=False`` (training needs only the
    loss; the LM head then runs on label positions only) unless ``return_logits=True``."""

    def __init__(self, pad_id: int, vision_config, pack: bool = False, pack_length: int | None = None,
                 preprocess: bool = True, return_logits: bool = False):
        if not isinstance(pad_id, int) or isinstance(pad_id, bool):
            raise TypeError(f"pad_id: expected the tokenizer's padding id (an int), got {pad_id!r}")
        if pack_length is not None and pack_length < 1:
            raise ValueError(f"pack_length: expected a positive number of tokens or None, got {pack_length}")
        self.pad_id, self.vision_config = pad_id, vision_config
        self.pack, self.pack_length = pack, pack_length
        self.preprocess, self.return_logits = preprocess, return_logits

    @classmethod
    def for_model(cls, model, **kwargs) -> COMMDataCollator:
        """The collator for ``model``: its tokenizer's padding id and its vision config's image sizes."""
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("model: no tokenizer attached (pass pad_id to COMMDataCollator instead)")
        return cls(model.tokenizer.pad_id, model.config.vision, **kwargs)

    def __call__(self, features) -> dict:
        from comm_fast.training.train import preprocess

        samples = [self._sample(i, f) for i, f in enumerate(features)]
        if not samples:
            raise ValueError("features: expected at least one sample, got an empty batch")
        batch = collate(samples, self.pad_id, pack=self.pack, capacity=self.pack_length)
        out = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if batch["image_paths"]:
            if self.preprocess:
                out["pixel_values"] = preprocess(batch["image_paths"], self.vision_config)
            else:
                out["images"] = load_images(batch["image_paths"])
        out["return_logits"] = self.return_logits
        return out

    @staticmethod
    def _sample(i: int, f) -> Sample:
        if isinstance(f, Sample):
            return f
        if isinstance(f, Mapping) and "input_ids" in f and "labels" in f:
            ids, labels = np.asarray(f["input_ids"], dtype=np.int64), np.asarray(f["labels"], dtype=np.int64)
            if ids.shape != labels.shape or ids.ndim != 1:
                raise ValueError(f"features[{i}]: input_ids and labels must be 1-D of one length, got "
                                 f"{ids.shape} and {labels.shape}")
            images = f.get("images") or []
            return Sample(ids, labels, [images] if isinstance(images, str) else list(images))
        raise TypeError(f"features[{i}]: expected a Sample or a mapping with input_ids, labels (and images), "
                        f"got {type(f).__name__}")
