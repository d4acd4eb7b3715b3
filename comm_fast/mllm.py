"""COMMForCausalLM: the COMM visual branch feeding a LLaMA-family decoder (LLaVA-style composition).

    text with <image>           prompt_inputs / expand_image_tokens: N image tokens per image
    images -> visual tokens     image_features: COMMVisionTower (CLIP + DINOv2 multi-level merge, projector)
    embeddings                  embed: the visual tokens written over the image-token positions, in order
    LLM                         _forward_llm: the LLaMA decoder (padded, or packed rows)
    loss                        _loss: cross-entropy over the label tokens (comm_fast.models.llm_kernels)
    generation                  generate: transformers' decoding (GenerationConfig, streamers) on the embeddings

Each image is turned into N visual tokens by ``COMMVisionTower``; in the text every image occupies N copies
of ``image_token_id`` (one ``<image>`` per image is also accepted and expanded here).

Packed rows (several samples in one row) are described as in flash-attn varlen: ``position_ids`` restart at 0
at each sample and ``attention_mask`` is None; comm_fast.models.packing attends within each sample (with
flash-attn the rows are flattened into one varlen row).

A transformers ``PreTrainedModel``: ``save_pretrained`` / ``from_pretrained`` write and read the Hugging Face
layout, and ``AutoModelForCausalLM`` loads it once comm_fast is imported. Building from parts and reading
directories of the earlier layout are in comm_fast.models.assembly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from comm_fast.data.conversation import IGNORE_INDEX
from comm_fast.mllm_config import COMMConfig
from comm_fast.models.llm_kernels import lm_loss
from comm_fast.models.packing import VARLEN_SDPA, attention_implementation, block_causal_mask, sample_lengths

__all__ = ["COMMConfig", "COMMForCausalLM", "COMMOutput"]

DEFAULT_MAX_NEW_TOKENS = 64


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


class COMMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = COMMConfig
    base_model_prefix = "comm"  # no state-dict key starts with it: transformers renames none when loading
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = True  # transformers.Trainer passes num_items_in_batch: exact gradient accumulation

    def __init__(self, config: COMMConfig, tokenizer=None):
        super().__init__(config)
        from transformers import LlamaForCausalLM

        from comm_fast.tower import COMMVisionTower

        self.tokenizer = tokenizer
        self.vision = COMMVisionTower(config.vision)
        self.llm = LlamaForCausalLM._from_config(config.llama_config(), attn_implementation=attention_implementation())
        self.llm_kernels = "eager"  # how the loss is computed: set_llm_kernels
        self.generation_config = self.default_generation_config(config)
        self.post_init()
        self.freeze_encoders()

    @staticmethod
    def default_generation_config(config: COMMConfig) -> GenerationConfig:
        """Greedy decoding of up to 64 new tokens, stopping at the decoder's </s>."""
        text = config.text
        eos, pad = text.get("eos_token_id"), text.get("pad_token_id")
        return GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, do_sample=False,
                                bos_token_id=text.get("bos_token_id"), eos_token_id=eos,
                                pad_token_id=pad if pad is not None else eos)

    def _init_weights(self, module) -> None:
        """Nothing to do: the tower initialises itself as docs/architecture.md §1 says, and the LLM as transformers'
        Llama does, both when they are built (transformers would otherwise redraw the merge heads)."""

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.llm.set_output_embeddings(value)

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

    # -- 1. text with image tokens ----------------------------------------------------------------------
    @property
    def processor(self):
        """A COMMProcessor of this model's tokenizer and image sizes (comm_fast.models.processing)."""
        from comm_fast.models.processing import COMMProcessor

        if self.tokenizer is None:
            raise ValueError("processor: this model has no tokenizer")
        return COMMProcessor.of(self)

    def prompt_inputs(self, prompt: str | list[str], with_images: bool = True):
        """Left-padded ``(input_ids, attention_mask)`` of the Vicuna-v1 prompt of a question or a list of
        them; with images, a question without ``<image>`` gets one in front."""
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; pass input_ids instead")
        return self.processor.prompt_inputs(prompt, with_images)

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

    # -- 2. the visual branch -----------------------------------------------------------------------------
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

    # -- 3. the LLM, 4. the loss ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None,
                images=None, labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_logits: bool = True, num_items_in_batch: int | torch.Tensor | None = None) -> COMMOutput:
        """Loss (mean over label tokens) and logits.

        ``labels`` are aligned with ``input_ids`` (shifted here); -100 is ignored, and image tokens and
        the first token of every packed sample are never targets. ``position_ids`` with no
        ``attention_mask`` marks packed rows. ``return_logits=False`` projects only the label positions
        through the LM head (what training needs). ``num_items_in_batch`` (transformers.Trainer passes the
        label tokens of all its accumulated micro-batches) divides the summed loss instead of this batch's
        count, so that accumulation gives the global token mean, as comm-fast train does.
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
        if num_items_in_batch is not None and out.loss_sum is not None:
            out.loss = out.loss_sum / num_items_in_batch
        return out

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
            out.loss_sum, out.num_label_tokens = self._loss(hidden, input_ids, attention_mask, labels, position_ids)
            out.loss = out.loss_sum / max(out.num_label_tokens, 1)
        if return_logits:
            out.logits = self.llm.lm_head(hidden)
        return out

    def _loss(self, hidden, input_ids, attention_mask, labels, position_ids):
        """(summed cross-entropy, label tokens) of next-token prediction; image tokens, padding and the first
        token of each packed sample are not targets."""
        labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
        if position_ids is not None:  # a sample's first token is not predicted from the previous sample
            labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        with _range("lm_loss"):
            loss_sum = lm_loss(self.llm_kernels, hidden[:, :-1][valid], target[valid], self.llm.lm_head)
        return loss_sum, int(valid.sum())

    # -- 5. generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 pixel_values=None, images=None, prompt: str | list[str] | None = None,
                 max_new_tokens: int | None = None, do_sample: bool | None = None,
                 generation_config: GenerationConfig | None = None, streamer=None, **generate_kwargs):
        """Decoding with the KV cache, by transformers' ``generate`` on the embeddings (visual tokens written in).

        With ``prompt`` (a question, or a list of them, one image each), the Vicuna-v1 prompt is built,
        and decoded strings are returned; with ``input_ids`` (left-padded), the new token ids are (or, with
        ``return_dict_in_generate=True``, transformers' output, its ``sequences`` the new tokens).
        ``generation_config`` (default ``self.generation_config``: greedy, 64 new tokens) picks greedy,
        sampling or beam search; keyword arguments (``max_new_tokens``, ``do_sample``, ``num_beams``,
        ``temperature``, ...) override its fields. ``streamer`` (e.g. ``transformers.TextStreamer(model.processor)``)
        receives the new tokens as they are made. The image token is never generated.
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

        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        defaults = self.default_generation_config(self.config)
        for name in ("eos_token_id", "pad_token_id"):  # a bare GenerationConfig() still stops at </s>
            if getattr(config, name) is None:
                setattr(config, name, getattr(defaults, name))
        if config.max_new_tokens is None and "max_length" not in generate_kwargs:
            config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        # the image placeholder is never an answer: emitted, it would stand for an image nobody gave
        suppress = list(generate_kwargs.pop("suppress_tokens", None) or config.suppress_tokens or [])
        if self.config.image_token_id < self.config.text["vocab_size"] and self.config.image_token_id not in suppress:
            suppress.append(self.config.image_token_id)
        overrides = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("do_sample", do_sample)) if v is not None}
        rest = config.update(**overrides, **generate_kwargs, suppress_tokens=suppress or None, use_cache=True)
        new = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config,
                                streamer=streamer, **rest)
        if not strings:
            return new
        eos, pad = config.eos_token_id, config.pad_token_id
        stop = set(eos if isinstance(eos, list) else [eos]) | {pad}
        texts = [self.tokenizer.decode([t for t in row.tolist() if t not in stop]).strip() for row in new]
        return texts[0] if isinstance(prompt, str) else texts

    # -- saving and loading (comm_fast.models.assembly) -------------------------------------------------------
    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs) -> None:
        """The Hugging Face layout (config.json with model_type "comm", generation_config.json, safetensors,
        sharded with an index past ``max_shard_size``) and the tokenizer and processor files, written to a
        temporary directory and renamed over ``save_directory``.

        ``state_dict``: the full weights when they are gathered elsewhere (FSDP)."""
        from comm_fast.models import assembly

        assembly.save(self, save_directory, state_dict, super().save_pretrained, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, dtype: torch.dtype | None = None,
                        **kwargs) -> "COMMForCausalLM":
        """A saved model directory (the Hugging Face layout, or the earlier config_type comm_causal_lm one) with
        its tokenizer; ``dtype`` None is float32. Missing, unexpected or misshapen weights are an error."""
        from comm_fast.models import assembly

        return assembly.load(cls, pretrained_model_name_or_path, dtype, super().from_pretrained, *model_args, **kwargs)

    @classmethod
    def from_components(cls, llm_path, clip_path, dino_path, image_token_id: int | None = None,
                        max_length: int = 2048, **vision_overrides) -> "COMMForCausalLM":
        """A Llama/Vicuna checkpoint + a CLIP + a DINOv2 checkpoint (local directories); new merge heads."""
        from comm_fast.models import assembly

        return assembly.from_components(cls, llm_path, clip_path, dino_path, image_token_id, max_length,
                                        **vision_overrides)

    @classmethod
    def assemble(cls, tower, llm, image_token_id: int, tokenizer=None, max_length: int = 2048) -> "COMMForCausalLM":
        """Wrap an existing tower and LlamaForCausalLM without copying weights."""
        from comm_fast.models import assembly

        return assembly.assemble(cls, tower, llm, image_token_id, tokenizer, max_length)
