"""COMMForCausalLM: the COMM visual branch feeding a LLaMA-family decoder (LLaVA-style composition).

Each image is turned into N visual tokens by ``COMMVisionTower``; in the text every image occupies
N copies of ``image_token_id`` (one ``<image>`` per image is also accepted and expanded here), and
the decoder's input embeddings at those positions are replaced by the visual tokens, in order.

Packed rows (several samples in one row) are described as in flash-attn varlen: ``position_ids``
restart at 0 at each sample and ``attention_mask`` is None; comm_fast.models.packing attends within
each sample (with flash-attn the rows are flattened into one varlen row).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from comm_fast.config import COMMVisionConfig
from comm_fast.data.conversation import IGNORE_INDEX, encode_prompt
from comm_fast.models.packing import VARLEN_SDPA, attention_implementation, block_causal_mask, sample_lengths
from comm_fast.models.llm_kernels import lm_loss

CONFIG_TYPE = "comm_causal_lm"
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass
class COMMConfig:
    vision: COMMVisionConfig
    text: dict                      # LlamaConfig keyword arguments
    image_token_id: int             # may lie past the vocabulary: it is never embedded
    max_length: int = 2048          # longest training sequence (image tokens included)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = COMMVisionConfig.from_dict(self.vision)
        hidden = self.text.get("hidden_size")
        if self.vision.out_dim != hidden:
            raise ValueError(f"vision.out_dim: {self.vision.out_dim} must equal the LLM's hidden_size {hidden}")

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**self.text)

    def to_dict(self) -> dict[str, Any]:
        return {"config_type": CONFIG_TYPE, "vision": self.vision.to_dict(), "text": dict(self.text),
                "image_token_id": self.image_token_id, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "COMMConfig":
        if data.get("config_type") != CONFIG_TYPE:
            raise ValueError(f"config: expected config_type {CONFIG_TYPE!r}, got {data.get('config_type')!r}")
        data = {k: v for k, v in data.items() if k != "config_type"}
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **vision_overrides) -> "COMMConfig":
        """The config of a preset (comm_fast.presets, where each preset's tokenizer is too)."""
        from comm_fast.presets import get

        return get(name).config(**vision_overrides)


@dataclasses.dataclass
class COMMOutput(ModelOutput):
    """A transformers ModelOutput: ``out.loss``, ``out["loss"]`` and ``out[0]`` (the first field set) all work."""

    loss: torch.Tensor | None = None        # mean over label tokens
    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None    # summed token losses, for exact global normalisation
    num_label_tokens: int | None = None  # label tokens counted (with labels)


def _range(name: str):
    """A torch.profiler range (``comm_fast::<name>``) around a phase of the forward; nothing while
    torch.compile traces, and next to free when no profiler is running."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"comm_fast::{name}")


class COMMForCausalLM(nn.Module):
    def __init__(self, config: COMMConfig, tokenizer=None):
        super().__init__()
        from transformers import LlamaForCausalLM

        from comm_fast.tower import COMMVisionTower

        self.config = config
        self.tokenizer = tokenizer
        self.vision = COMMVisionTower(config.vision)
        self.llm = LlamaForCausalLM._from_config(config.llama_config(), attn_implementation=attention_implementation())
        self.llm_kernels = "eager"  # how the loss is computed: set_llm_kernels
        self.freeze_encoders()

    def set_llm_kernels(self, kind: str = "auto", device=None) -> str:
        """The LLM's training kernels (comm_fast.models.llm_kernels): "auto" | "liger" | "chunked" | "eager"
        on ``device`` (default: where the model is). Returns the kernels resolved; liger also patches its
        RMSNorm / RoPE / SwiGLU into the decoder. ValueError where the kind cannot run."""
        from comm_fast.models import llm_kernels

        device = self.llm.lm_head.weight.device if device is None else device
        name, _ = llm_kernels.resolve(kind, device)
        if name == "liger" and self.llm_kernels != "liger":
            llm_kernels.apply_liger(self.llm)
        self.llm_kernels = name
        return name

    def freeze_encoders(self) -> None:
        """CLIP and DINOv2 are frozen in every stage (the tower then runs them without autograd)."""
        for p in (*self.vision.clip.parameters(), *self.vision.dino.parameters()):
            p.requires_grad_(False)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each LLM block in backward (non-reentrant, so frozen weights and inputs that need
        grads both work)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.llm.activation_checkpointing_enable(kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    # -- inputs ---------------------------------------------------------------------------------------
    def image_features(self, pixel_values=None, images=None) -> torch.Tensor | None:
        """[n_images, N, D] visual tokens from (clip_pixels, dino_pixels) or from uint8 images."""
        if images is not None:
            return self.vision.encode(images)
        if pixel_values is None:
            return None
        if not isinstance(pixel_values, (tuple, list)) or len(pixel_values) != 2:
            raise TypeError("pixel_values: expected a (clip_pixels, dino_pixels) pair of [B, 3, H, W] tensors")
        dtype = self.vision.projector.weight.dtype
        device = self.vision.projector.weight.device
        return self.vision(pixel_values[0].to(device, dtype), pixel_values[1].to(device, dtype))

    def expand_image_tokens(self, input_ids, attention_mask=None, labels=None):
        """One ``<image>`` token per image -> N tokens, rows re-padded on the side they were padded."""
        n, img = self.num_image_tokens, self.config.image_token_id
        pad = self.config.text.get("pad_token_id") or 0
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        left = bool((attention_mask[:, 0] == 0).any()) and bool((attention_mask[:, -1] == 1).all())
        rows = []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids = input_ids[b][keep].tolist()
            lab = labels[b][keep].tolist() if labels is not None else [IGNORE_INDEX] * len(ids)
            out_ids, out_lab = [], []
            for t, l in zip(ids, lab):
                out_ids += [t] * (n if t == img else 1)
                out_lab += [IGNORE_INDEX] * n if t == img else [l]
            rows.append((out_ids, out_lab))
        width = max(len(r[0]) for r in rows)
        ids_t = torch.full((len(rows), width), pad, dtype=input_ids.dtype)
        mask_t = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
        lab_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            sl = slice(width - len(ids), width) if left else slice(0, len(ids))
            ids_t[b, sl], mask_t[b, sl], lab_t[b, sl] = torch.tensor(ids), 1, torch.tensor(lab)
        dev = input_ids.device
        return ids_t.to(dev), mask_t.to(dev), (lab_t.to(dev) if labels is not None else None)

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the visual tokens written over the image-token positions, in order."""
        is_img = input_ids == self.config.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_img, 0))
        count = int(is_img.sum())
        have = 0 if features is None else features.shape[0] * features.shape[1]
        if count != have:
            n_img = 0 if features is None else features.shape[0]
            raise ValueError(f"input_ids: {count} image tokens for {n_img} images of {self.num_image_tokens} "
                             f"tokens each (expected {have}); each image needs one <image> in the text")
        if count:
            embeds = embeds.masked_scatter(is_img.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None,
                images=None, labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_logits: bool = True) -> COMMOutput:
        """Loss (mean over label tokens) and logits.

        ``labels`` are aligned with ``input_ids`` (shifted here); -100 is ignored, and image tokens and
        the first token of every packed sample are never targets. ``position_ids`` with no
        ``attention_mask`` marks packed rows. ``return_logits=False`` projects only the label positions
        through the LM head (what training needs).
        """
        with _range("vision"):
            features = self.image_features(pixel_values, images)
        with _range("llm_forward"):
            out = self._forward_llm(input_ids, attention_mask, features, labels, position_ids, return_logits)
        if features is None and out.loss_sum is not None and torch.is_grad_enabled():
            # A text-only batch leaves the tower's trainable modules out of the graph, yet DDP and FSDP2
            # wait for a grad of every trainable parameter on every rank: they join with weight 0.
            unused = [p.sum().float() for p in self.vision.parameters() if p.requires_grad]
            if unused:
                out.loss_sum = out.loss_sum + 0.0 * torch.stack(unused).sum()
                out.loss = out.loss_sum / max(out.num_label_tokens, 1)
        return out

    def _inputs_embeds(self, input_ids, attention_mask, features, labels=None, packed=False):
        """(input_ids, attention_mask, labels, embeds): one ``<image>`` per image expanded to N tokens
        when the text has not done so, then the visual tokens written in."""
        n_img = 0 if features is None else features.shape[0]
        count = int((input_ids == self.config.image_token_id).sum())
        if n_img and count == n_img and self.num_image_tokens > 1:
            if packed:
                raise ValueError("input_ids: packed rows must carry N image tokens per image (already expanded)")
            input_ids, attention_mask, labels = self.expand_image_tokens(input_ids, attention_mask, labels)
        return input_ids, attention_mask, labels, self.embed(input_ids, features)

    def _forward_llm(self, input_ids, attention_mask, features, labels, position_ids, return_logits) -> COMMOutput:
        input_ids, attention_mask, labels, embeds = self._inputs_embeds(input_ids, attention_mask, features, labels,
                                                                        packed=position_ids is not None)

        packed = position_ids is not None and attention_mask is None
        kw: dict[str, Any] = dict(use_cache=False)
        if packed:
            impl = self.llm.config._attn_implementation
            if impl == "flash_attention_2":
                # one varlen row: transformers derives cu_seqlens from the restarting position_ids
                shape = embeds.shape
                embeds, kw["position_ids"] = embeds.reshape(1, -1, shape[-1]), position_ids.reshape(1, -1)
            elif impl == VARLEN_SDPA:
                kw["position_ids"], kw["comm_packed"] = position_ids, True  # per sample: varlen_sdpa_attention
                kw["comm_lengths"] = sample_lengths(position_ids)  # once, not per layer
            else:  # any other attention: the block-diagonal causal mask, row_length^2 work
                kw["attention_mask"], kw["position_ids"] = block_causal_mask(position_ids), position_ids
        else:
            kw["attention_mask"], kw["position_ids"] = attention_mask, position_ids
        hidden = self.llm.model(inputs_embeds=embeds, **kw).last_hidden_state
        if packed and hidden.shape[0] != input_ids.shape[0]:
            hidden = hidden.reshape(*input_ids.shape, -1)

        out = COMMOutput()
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
            if position_ids is not None:  # a sample's first token is not predicted from the previous sample
                labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
            target = labels[:, 1:]
            valid = target != IGNORE_INDEX
            out.num_label_tokens = int(valid.sum())
            with _range("lm_loss"):
                out.loss_sum = lm_loss(self.llm_kernels, hidden[:, :-1][valid], target[valid], self.llm.lm_head)
            out.loss = out.loss_sum / max(out.num_label_tokens, 1)
        if return_logits:
            out.logits = self.llm.lm_head(hidden)
        return out

    # -- generation -----------------------------------------------------------------------------------
    def prompt_inputs(self, prompt: str | list[str], with_images: bool = True):
        """Left-padded ``(input_ids, attention_mask)`` of the Vicuna-v1 prompt of a question or a list of
        them; with images, a question without ``<image>`` gets one in front."""
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; pass input_ids instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p if "<image>" in p or not with_images else "<image>\n" + p for p in prompts]
        rows = [encode_prompt(self.tokenizer, p, self.num_image_tokens) for p in prompts]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return input_ids, attention_mask

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 pixel_values=None, images=None, prompt: str | list[str] | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, **generate_kwargs):
        """Greedy (or sampled) decoding with the KV cache.

        With ``prompt`` (a question, or a list of them, one image each), the Vicuna-v1 prompt is built,
        and decoded strings are returned; with ``input_ids`` (left-padded), the new token ids are.
        """
        strings = prompt is not None
        if strings:
            input_ids, attention_mask = self.prompt_inputs(prompt, images is not None or pixel_values is not None)
        if input_ids is None:
            raise ValueError("generate: pass prompt= or input_ids=")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = self.llm.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if images is not None and not isinstance(images, (list, tuple)) and not (
                isinstance(images, torch.Tensor) and images.dim() == 4):
            images = [images]
        features = self.image_features(pixel_values, images)
        input_ids, attention_mask, _, embeds = self._inputs_embeds(input_ids, attention_mask, features)
        eos = self.config.text.get("eos_token_id")
        pad = self.config.text.get("pad_token_id")
        # the image placeholder is never an answer: emitted, it would stand for an image nobody gave
        suppress = list(generate_kwargs.pop("suppress_tokens", None) or [])
        if self.config.image_token_id < self.config.text["vocab_size"]:
            suppress.append(self.config.image_token_id)
        new = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=do_sample, eos_token_id=eos, pad_token_id=pad if pad is not None else eos,
                                suppress_tokens=suppress or None, use_cache=True, **generate_kwargs)
        if not strings:
            return new
        texts = [self.tokenizer.decode([t for t in row.tolist() if t != eos and t != pad]).strip() for row in new]
        return texts[0] if isinstance(prompt, str) else texts

    # -- loading and saving ---------------------------------------------------------------------------
    def save_pretrained(self, directory, state_dict: dict | None = None) -> None:
        """config.json + model.safetensors (+ tokenizer), written to a temporary directory and renamed.

        ``state_dict``: the full weights when they are gathered elsewhere (FSDP)."""
        from comm_fast._io import atomic_directory, save_safetensors

        with atomic_directory(directory) as tmp:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config.to_dict(), f, indent=2)
            sd = dict(self.state_dict() if state_dict is None else state_dict)
            if self.config.text.get("tie_word_embeddings"):
                sd.pop("llm.lm_head.weight", None)  # shares storage with the embedding
            save_safetensors(sd, os.path.join(tmp, WEIGHTS_NAME))
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype | None = None) -> "COMMForCausalLM":
        from comm_fast.data.tokenizer import load_tokenizer
        from comm_fast.models import loading

        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"model: no such directory: {directory}")
        data = loading.read_json(os.path.join(directory, "config.json"))
        if data.get("config_type") != CONFIG_TYPE:
            raise ValueError(f"{directory}/config.json: not a saved COMMForCausalLM (config_type "
                             f"{data.get('config_type')!r}, expected {CONFIG_TYPE!r})")
        config = COMMConfig.from_dict(data)
        weights = os.path.join(directory, WEIGHTS_NAME)
        sd = loading._load_file(weights)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu")
        if config.text.get("tie_word_embeddings") and "llm.lm_head.weight" not in sd:
            sd["llm.lm_head.weight"] = sd["llm.model.embed_tokens.weight"]
        loading.load_strict(model, sd, weights)
        model.llm.tie_weights() if config.text.get("tie_word_embeddings") else None
        model._reset_buffers()
        model.tokenizer = load_tokenizer(directory, config.image_token_id)
        return model.to(dtype) if dtype is not None else model

    def _reset_buffers(self) -> None:
        """Non-persistent buffers (rotary inv_freq) are not in the state dict: recompute them after to_empty."""
        rotary = self.llm.model.rotary_emb
        self.llm.model.rotary_emb = type(rotary)(self.llm.config).to(self.llm.get_input_embeddings().weight.device)

    @classmethod
    def from_components(cls, llm_path, clip_path, dino_path, image_token_id: int | None = None,
                        max_length: int = 2048, **vision_overrides) -> "COMMForCausalLM":
        """A Llama/Vicuna checkpoint + a CLIP + a DINOv2 checkpoint (local directories); new merge heads."""
        from transformers import LlamaForCausalLM

        from comm_fast.data.tokenizer import load_tokenizer
        from comm_fast.tower import COMMVisionTower

        llm = LlamaForCausalLM.from_pretrained(os.fspath(llm_path), local_files_only=True,
                                               attn_implementation=attention_implementation(), dtype=torch.float32)
        tokenizer = load_tokenizer(llm_path, image_token_id)
        if image_token_id is None:
            image_token_id = tokenizer.image_token_id if tokenizer is not None else llm.config.vocab_size
        vision_overrides.setdefault("out_dim", llm.config.hidden_size)
        tower = COMMVisionTower.from_pretrained(clip_path, dino_path, **vision_overrides)
        return cls.assemble(tower, llm, image_token_id, tokenizer, max_length)

    @classmethod
    def assemble(cls, tower, llm, image_token_id: int, tokenizer=None, max_length: int = 2048) -> "COMMForCausalLM":
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
