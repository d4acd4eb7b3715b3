"""COMMVisionTower: CLIP + DINOv2 multi-level features merged into LLM-ready visual tokens.

    v1  = Σ_i α_i · LLN_i(h_i^clip)             clip_merge  (one GEMM over K = L·D)
    v2  = Σ_j β_j · LLN_j(h_j^dino)             dino_merge
    v2  → CLIP's grid when the grids differ      resample_tokens
    m   = MLP(v2)                                dino_mlp    (fused_mlp)
    out = Projector([v1 ; m])                    projector   (v1·P_aᵀ + m·P_bᵀ, no concat)

Under torch.no_grad() the merges are accumulated layer by layer as the encoders run, the GEMM adding
each layer's term into the output itself, and the encoders write their blocks into two reused
buffers: memory independent of the number of merged layers by construction (COMMVisionTower.
inference_merge states the rule and the alternative). With autograd the requested hidden states go
into one preallocated buffer that the merge reads in place.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from comm_fast import _backend, ops
from comm_fast.ops.merge import autocast_dtype
from comm_fast._io import atomic_directory, save_safetensors
from comm_fast.config import CONFIG_TYPE, COMMVisionConfig
from comm_fast.models import CLIPVisionEncoder, DINOv2Encoder, ViTConfig, loading
from comm_fast.models.vit import ViTEncoder


INFERENCE_RULE = ("auto: stream (the merge accumulated into its output by the op as each hidden state is made, "
                  "two reused hidden-state buffers per encoder), on every device")


class MultiLevelMerge(nn.Module):
    """Σ_l w_l · LLN_l(h_l) with parameters stacked over layers (the layout the fused ops read).

    With ``per_layer_linear=False`` the Linear is shared: Linear(Σ_l w_l · LN_l(h_l)).
    """

    def __init__(self, num_layers: int, dim: int, out_dim: int, per_layer_linear: bool = True,
                 layer_weights: str = "raw", eps: float = 1e-5):
        super().__init__()
        self.per_layer_linear, self.layer_weights, self.eps = per_layer_linear, layer_weights, eps
        self.ln_weight = nn.Parameter(torch.ones(num_layers, dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_layers, dim))
        lead = (num_layers,) if per_layer_linear else ()
        self.weight = nn.Parameter(torch.empty(*lead, out_dim, dim))
        self.bias = nn.Parameter(torch.empty(*lead, out_dim))
        self.alpha = nn.Parameter(torch.empty(num_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """LayerNorms as identity, α = 1/L, each Linear as nn.Linear initialises it."""
        self.ln_weight.fill_(1.0)
        self.ln_bias.zero_()
        self.alpha.fill_(1.0 / self.alpha.shape[0])
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        self.weight.uniform_(-bound, bound)
        self.bias.uniform_(-bound, bound)

    @property
    def num_layers(self) -> int:
        return self.alpha.shape[0]

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=0) if self.layer_weights == "softmax" else self.alpha

    def forward(self, h) -> torch.Tensor:
        """h: stacked ``[L, ..., D]`` (any token stride) or a list of L ``[..., D]`` tensors."""
        w = self.weights()
        if self.per_layer_linear:
            return ops.multilevel_merge(h, self.ln_weight, self.ln_bias, self.weight, self.bias, w, self.eps)
        return F.linear(ops.layernorm_weighted_sum(h, self.ln_weight, self.ln_bias, w, self.eps),
                        self.weight, self.bias)

    def accumulate(self, out: torch.Tensor | None, l: int, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Streaming (no autograd): add layer l's term into ``out`` (None before the first layer), the
        op writing into it itself — for the per-layer Linear the GEMM accumulates into out (C += A·Wᵀ),
        which starts at the bias sum Σ_l w_l b_l, so no pass over out but the GEMMs'."""
        sl = slice(l, l + 1)
        if not self.per_layer_linear:
            first = out is None
            out = h.new_empty(h.shape) if first else out
            return ops.layernorm_weighted_sum([h], self.ln_weight[sl], self.ln_bias[sl], w[sl], self.eps,
                                              out=out, accumulate=not first)
        if out is None:
            dtype = autocast_dtype(h.device.type) if h.dtype != torch.float64 else None
            out = h.new_empty((*h.shape[:-1], self.weight.shape[1]), dtype=dtype or h.dtype)
            out.copy_((w @ self.bias).expand(out.shape))
        return ops.multilevel_merge([h], self.ln_weight[sl], self.ln_bias[sl], self.weight[sl], None, w[sl],
                                    self.eps, out=out, accumulate=True)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The streamed sum as the merge's output (the shared Linear applied once, when there is one)."""
        return acc if self.per_layer_linear else F.linear(acc, self.weight, self.bias)


class DinoMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return ops.fused_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.activation)


@contextlib.contextmanager
def _naming(argument: str):
    """The encoder loaders name their argument ``path``; through the tower it is ``argument``."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if not str(exc).startswith("path: "):
            raise
        raise type(exc)(f"{argument}: {str(exc)[len('path: '):]}") from exc


class COMMVisionTower(nn.Module):
    HEADS = ("clip_merge", "dino_merge", "dino_mlp", "projector")  # everything but the encoders

    def __init__(self, config: COMMVisionConfig):
        super().__init__()
        if config.clip is None or config.dino is None:
            raise ValueError("config: COMMVisionTower needs the encoder configs (config.clip and config.dino); "
                             "use COMMVisionTower.from_pretrained(clip_path, dino_path) to read them from checkpoints")
        self.config = config
        self.clip = CLIPVisionEncoder(self._encoder_config(config.clip, config.clip_pos_interp))
        self.dino = DINOv2Encoder(self._encoder_config(config.dino, config.dino_pos_interp))
        for name, enc, layers in (("clip_layers", self.clip, config.clip_layers),
                                  ("dino_layers", self.dino, config.dino_layers)):
            if layers and max(layers) > enc.config.num_layers:
                raise ValueError(f"{name}: index {max(layers)} past the encoder's {enc.config.num_layers} blocks")
        # a branch turned off (its layers empty) has no heads; its encoder stays, frozen and never run, so
        # the model's layout (and the token grid, CLIP's) is the same whichever branches are merged
        dc, dd = self.clip.config.hidden_size, self.dino.config.hidden_size
        kw = dict(per_layer_linear=config.per_layer_linear, layer_weights=config.layer_weights, eps=config.ln_eps)
        branches = config.branches
        if "clip" in branches:
            self.clip_merge = MultiLevelMerge(len(config.clip_layers), dc, dc, **kw)
        if "dino" in branches:
            self.dino_merge = MultiLevelMerge(len(config.dino_layers), dd, dd, **kw)
            self.dino_mlp = DinoMLP(dd, config.mlp_ratio * dc, dc, config.mlp_activation)
        self.projector = nn.Linear((2 if config.combine == "concat" and len(branches) == 2 else 1) * dc,
                                   config.out_dim)
        self.HEADS = tuple(n for n in COMMVisionTower.HEADS if hasattr(self, n))  # the heads this tower has

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Initialise the merge modules, MLP and projector (docs/architecture.md §1: LN identity, α = 1/L, Linear default)."""
        for name in self.HEADS:
            for m in getattr(self, name).modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    @staticmethod
    def _encoder_config(data: dict, pos_interp: str | None) -> ViTConfig:
        cfg = ViTConfig.from_dict(data)
        if pos_interp is not None:
            cfg.pos_interp = pos_interp
        return cfg

    # -- loading and saving ----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, clip_path, dino_path=None, **config_overrides) -> "COMMVisionTower":
        """Build from a CLIP and a DINOv2 checkpoint (merge modules freshly initialised), or, with one
        argument, load a directory written by ``save_pretrained``."""
        if dino_path is None:
            return cls._load_saved(clip_path, **config_overrides)
        with _naming("clip_path"):
            clip = CLIPVisionEncoder.from_pretrained(clip_path, pos_interp=config_overrides.get("clip_pos_interp"))
        with _naming("dino_path"):
            dino = DINOv2Encoder.from_pretrained(dino_path, pos_interp=config_overrides.get("dino_pos_interp"))
        config = COMMVisionConfig.from_dict({}, **config_overrides)
        config.clip, config.dino = clip.config.to_dict(), dino.config.to_dict()
        with torch.device("meta"):  # the encoders come loaded; only the merge heads are allocated
            tower = cls(config)
        tower.clip, tower.dino = clip, dino
        for name in tower.HEADS:
            getattr(tower, name).to_empty(device="cpu")
        tower.reset_heads()
        return tower

    @classmethod
    def _load_saved(cls, directory, **config_overrides) -> "COMMVisionTower":
        data, sd, source = loading.read_checkpoint(directory)
        if data is None or data.get("config_type") != CONFIG_TYPE:
            raise ValueError(f"clip_path: {directory} is not a saved COMMVisionTower (config.json with "
                             f"config_type {CONFIG_TYPE!r}); to build one from encoder checkpoints pass "
                             "both clip_path and dino_path")
        config = COMMVisionConfig.from_dict(data, **config_overrides)
        with torch.device("meta"):
            tower = cls(config)
        tower = tower.to_empty(device="cpu")
        loading.load_strict(tower, cls.convert_state_dict(sd), source)
        return tower

    @staticmethod
    def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept Hugging Face key names under ``clip.`` / ``dino.``."""
        out = {k: v for k, v in sd.items() if not k.startswith(("clip.", "dino."))}
        for prefix, enc in (("clip.", CLIPVisionEncoder), ("dino.", DINOv2Encoder)):
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            out.update({prefix + k: v for k, v in enc.convert_state_dict(sub).items()})
        return out

    def save_pretrained(self, directory) -> None:
        """config.json + model.safetensors, written to a temporary directory and renamed into place."""
        with atomic_directory(directory) as tmp:
            self.config.save(tmp)
            save_safetensors(self.state_dict(), os.path.join(tmp, "model.safetensors"))

    # -- forward ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        g = self.config.clip_image_size // self.clip.config.patch_size
        return g * g

    def _encoders_frozen(self) -> bool:
        return not any(p.requires_grad for p in (*self.clip.parameters(), *self.dino.parameters()))

    # Inference (no autograd) merges in one of two ways; ``inference_merge`` picks ("auto" by the rule):
    #   "stream":   each hidden state's term is accumulated into the merge output by the op itself as the
    #               encoder produces it (the encoder's two ping-pong buffers): memory independent of L.
    #   "buffered": the L hidden states go into one [L, B, T, D] buffer and the one-GEMM merge (K = L·D)
    #               reads it: one GEMM instead of L, at the cost of L hidden states.
    # Rule for "auto": "stream" everywhere, the bounded memory being the point of inference here. On the
    # torch path (CPU) the one-GEMM merge is itself L rank-D updates of one output, the same GEMMs as
    # streaming, plus L copies into the buffer (measured on 2 shared CPU cores, ViT-B x 2 at 224 px, fp32,
    # alternated, fastest of 6: batch 4 stream 2430 ms, buffered 2428 ms; the medians drift with the
    # machine's load either way); on CUDA the Triton one-GEMM kernel would spare L - 1
    # reads/writes of the output (a prediction: a few per cent of the tower at ViT-L sizes, not measured
    # on a GPU yet), while the buffer costs as much as the naive composition's hidden states.
    inference_merge = "auto"
    INFERENCE_MERGES = ("auto", "stream", "buffered")

    def inference_variant(self) -> tuple[str, str]:
        """(variant, why) the no-autograd forward uses: see ``inference_merge``."""
        if self.inference_merge not in self.INFERENCE_MERGES:
            raise ValueError(f"inference_merge: expected one of {self.INFERENCE_MERGES}, got {self.inference_merge!r}")
        if self.inference_merge != "auto":
            return self.inference_merge, "requested (inference_merge)"
        return "stream", INFERENCE_RULE

    def _merged(self, encoder: ViTEncoder, merge: MultiLevelMerge, pixels, layers) -> torch.Tensor:
        """Σ_l w_l · LLN_l over the requested layers' patch tokens."""
        skip = encoder.config.num_prefix_tokens  # CLS (+ registers) are not merged
        if not torch.is_grad_enabled():
            variant, why = self.inference_variant()
            _backend.record("tower", variant, why)
            if variant == "stream":
                w, slot, out = merge.weights(), {idx: k for k, idx in enumerate(layers)}, None
                for idx, h in encoder.iter_hidden_states(pixels, layers):
                    out = merge.accumulate(out, slot[idx], h[:, skip:], w)
                return merge.finish(out)
        # under autocast the merge GEMM reads the buffer in autocast's dtype: store it so, no cast copy
        dtype = autocast_dtype(pixels.device.type) if merge.per_layer_linear else None
        if self._encoders_frozen() and not pixels.requires_grad:
            with torch.no_grad():  # frozen encoders keep no autograd graph, only the hidden states
                hidden = encoder(pixels, layers, dtype=dtype)
        else:
            hidden = encoder(pixels, layers, dtype=dtype)
        return merge(hidden[:, :, skip:])  # strided token view of the one buffer, no copy

    def forward(self, clip_pixels: torch.Tensor, dino_pixels: torch.Tensor) -> torch.Tensor:
        """[B, N, out_dim] visual tokens (N = CLIP's patch grid)."""
        clip_grid = self.clip.check_pixels(clip_pixels, "clip_pixels")
        dino_grid = self.dino.check_pixels(dino_pixels, "dino_pixels")
        if clip_pixels.shape[0] != dino_pixels.shape[0]:
            raise ValueError(f"dino_pixels: batch {dino_pixels.shape[0]} differs from clip_pixels' "
                             f"{clip_pixels.shape[0]}")
        cfg = self.config
        branches = cfg.branches
        if "clip" in branches:
            v1 = self._merged(self.clip, self.clip_merge, clip_pixels, cfg.clip_layers)
        if "dino" in branches:
            v2 = self._merged(self.dino, self.dino_merge, dino_pixels, cfg.dino_layers)
            if dino_grid != clip_grid:
                v2 = ops.resample_tokens(v2, dino_grid, clip_grid, mode=cfg.grid_resample)
            m = self.dino_mlp(v2)
        if branches == ("clip",):
            return self.projector(v1)
        if branches == ("dino",):
            return self.projector(m)
        if cfg.combine == "add":
            return self.projector(v1 + m)
        # P([v1; m]) = v1·P_aᵀ + m·P_bᵀ + b: both GEMMs accumulate into one output, no concat
        dc = v1.shape[-1]
        w = self.projector.weight
        lead = v1.shape[:-1]
        out = torch.addmm(self.projector.bias, v1.reshape(-1, dc), w[:, :dc].t())
        # in place, so autocast leaves it alone: its operands follow the output's (autocast) dtype
        out = out.addmm_(m.reshape(-1, dc).to(out.dtype), w[:, dc:].t().to(out.dtype))
        return out.reshape(*lead, -1)

    def encode(self, images, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Visual tokens straight from uint8 images (joint preprocessing included, squared by config.aspect)."""
        clip_pixels, dino_pixels = ops.joint_preprocess(images, self.config.clip_image_size,
                                                        self.config.dino_image_size, aspect=self.config.aspect)
        param = self.projector.weight
        dtype = dtype or param.dtype
        return self(clip_pixels.to(param.device, dtype), dino_pixels.to(param.device, dtype))
