"""The pre-LN ViT shared by CLIP and DINOv2: embeddings, blocks, and hidden-state extraction.

Hidden states use Hugging Face indexing: index 0 is the embedding output (for CLIP after its
pre-layernorm), index i the output of block i, before any final norm. Only the requested
states are returned, and no block past the deepest requested one is computed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from comm_fast import ops
from comm_fast.activations import QUICK_GELU_SCALE, quick_gelu
from comm_fast.models import loading
from comm_fast.models.attention import attention
from comm_fast.ops.patch import POS_EMBED_MODES


@dataclasses.dataclass
class ViTConfig:
    family: str                    # "clip" | "dinov2"
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_hidden: int                # fc1 width, or the SwiGLU hidden width
    patch_size: int
    image_size: int                # trained resolution; the position grid is image_size // patch_size
    layer_norm_eps: float
    activation: str = "gelu"       # "gelu" (erf) | "quick_gelu" | "swiglu"
    layerscale: bool = False       # DINOv2's per-channel residual scales
    num_register_tokens: int = 0
    pre_norm: bool = False         # CLIP's pre_layrnorm
    patch_bias: bool = True
    pos_interp: str = "hf"         # position-embedding interpolation mode (docs/architecture.md §1)
    num_channels: int = 3

    def __post_init__(self):
        if self.pos_interp not in POS_EMBED_MODES:
            raise ValueError(f"pos_interp: expected one of {POS_EMBED_MODES}, got {self.pos_interp!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ViTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"encoder config: unknown fields {sorted(unknown)}")
        return cls(**data)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k, v fused: one GEMM instead of three
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        return self.proj(attention(q, k, v).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":  # DINOv2 giant: w12 holds [gate; up], silu(gate) * up
            self.w12 = nn.Linear(dim, 2 * hidden)
            self.w3 = nn.Linear(hidden, dim)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.activation == "swiglu":
            gate, up = self.w12(x).chunk(2, dim=-1)
            return self.w3(F.silu(gate) * up)
        h = self.fc1(x)
        if self.activation != "quick_gelu":
            h = F.gelu(h)
        elif torch.is_grad_enabled():
            h = quick_gelu(h)
        else:  # the same products, one [B, T, H] temporary instead of two
            h = (QUICK_GELU_SCALE * h).sigmoid_().mul_(h)
        return self.fc2(h)


class Block(nn.Module):
    """Pre-LN transformer block; DINOv2 scales each residual branch by LayerScale."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.mlp_hidden, cfg.activation)
        if cfg.layerscale:
            self.ls1 = nn.Parameter(torch.ones(d))
            self.ls2 = nn.Parameter(torch.ones(d))
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x, out=None):
        """x + attn, then + mlp. ``out`` (inference): a buffer shaped like x that receives the output, the
        second residual added in place, so no block output is allocated (attention/MLP temporaries aside)."""
        a = self.attn(self.norm1(x))
        if out is None:
            x = x + (a * self.ls1 if self.ls1 is not None else a)
            m = self.mlp(self.norm2(x))
            return x + (m * self.ls2 if self.ls2 is not None else m)
        torch.add(x, _scaled(a, self.ls1), out=out)
        return torch.add(out, _scaled(self.mlp(self.norm2(out)), self.ls2), out=out)


def _scaled(branch, scale):
    """branch · scale (LayerScale), in place where that keeps the dtype the plain product would have:
    the same rounding as ``branch * scale`` without another tensor."""
    if scale is None:
        return branch
    return branch.mul_(scale) if torch.promote_types(branch.dtype, scale.dtype) == branch.dtype else branch * scale


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position embedding, ``[grid * grid, dim]`` in row-major patch order: the first
    half of the channels encode the column, the second the row, each as sin then cos of dim / 4 frequencies."""
    if dim % 4:
        raise ValueError(f"hidden_size: a 2D sin-cos position embedding needs a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (cols, rows) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class ViTEncoder(nn.Module):
    """Base of CLIPVisionEncoder and DINOv2Encoder. Subclasses add checkpoint loading.

    Built from a config (random init), the position embedding starts as MAE's 2D sin-cos (CLS's row zero),
    so that a random-initialised encoder's tokens still say where their patch is; a checkpoint's replaces it.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid * config.grid, d))
        if d % 4 == 0:
            with torch.no_grad():
                self.pos_embed[0, 1:] = sincos_pos_embed(config.grid, d)
        self.register_tokens = (nn.Parameter(torch.zeros(1, config.num_register_tokens, d))
                                if config.num_register_tokens else None)
        self.pre_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.pre_norm else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self._pos_cache: dict = {}

    # -- checkpoints: subclasses provide config_from_hf, convert_state_dict and _infer_config --------
    @classmethod
    def from_pretrained(cls, path, pos_interp: str | None = None, dtype: torch.dtype | None = None):
        """Load a local Hugging Face directory (config.json + weights) or a bare state-dict file.

        ``pos_interp`` overrides the family's position-embedding interpolation mode.
        """
        config, sd, source = loading.read_checkpoint(path)
        sd = cls.convert_state_dict(sd)
        cfg = cls.config_from_hf(config, pos_interp) if config is not None else cls._infer_config(sd, pos_interp)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        loading.load_strict(model, sd, source)
        return model.to(dtype) if dtype is not None else model

    @staticmethod
    def _read_shapes(sd: dict[str, torch.Tensor], family: str) -> tuple[int, int, int, int, int]:
        """(hidden, channels, patch, trained grid side, blocks) of a bare state dict in this module's names."""
        try:
            d, c, p, _ = sd["patch_embed.weight"].shape
            grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
            layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"path: not a {family} state dict (no {exc})") from None
        return d, c, p, grid, layers

    # -- position embeddings -------------------------------------------------------------
    def position_embedding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a patch grid, interpolated in the checkpoint's mode and cached."""
        pos = self.pos_embed
        src = (self.config.grid, self.config.grid)
        if tuple(grid_hw) == src:
            return pos
        if torch.compiler.is_compiling():  # traced once into the graph; data_ptr/_version are not traceable
            return ops.interpolate_pos_embed(pos, src, grid_hw, mode=self.config.pos_interp, num_prefix_tokens=1)
        cacheable = not (torch.is_grad_enabled() and pos.requires_grad)
        key = (tuple(grid_hw), self.config.pos_interp, pos.dtype, pos.device, pos.data_ptr(), pos._version)
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        out = ops.interpolate_pos_embed(pos, src, grid_hw, mode=self.config.pos_interp, num_prefix_tokens=1)
        if cacheable:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[4:] == key[4:]}  # drop stale
            self._pos_cache[key] = out
        return out

    # -- forward ---------------------------------------------------------------------------
    def check_pixels(self, pixels, name: str = "pixels") -> tuple[int, int]:
        """The patch grid of ``pixels``, or a clear error naming the argument ``name``."""
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [B, 3, H, W], got {type(pixels).__name__}")
        if not pixels.is_floating_point():
            raise TypeError(f"{name}: expected normalised floating-point pixels, got dtype {pixels.dtype} "
                            "(use comm_fast.ops.joint_preprocess for uint8 images)")
        c = self.config.num_channels
        if pixels.dim() != 4 or pixels.shape[1] != c:
            raise ValueError(f"{name}: expected shape [B, {c}, H, W], got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        p = self.config.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"{name}: image size {h}x{w} is not a positive multiple of the patch size {p}")
        return h // p, w // p

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """hidden_states[0]: patch embedding + CLS (+ registers) + position embedding (+ pre-norm)."""
        grid = self.check_pixels(pixels)
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(grid)
        if self.register_tokens is not None:  # registers go after CLS, without position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return x

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        try:
            layers = [int(i) for i in layers]
        except TypeError:
            raise TypeError(f"layers: expected a sequence of ints, got {type(layers).__name__}") from None
        n = self.config.num_layers
        if not layers:
            raise ValueError("layers: expected at least one hidden-state index")
        bad = [i for i in layers if not 0 <= i <= n]
        if bad:
            raise ValueError(f"layers: indices must lie in 0..{n} (0 = embeddings, i = block i), got {bad}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers: duplicate indices in {layers}")
        return layers

    def iter_hidden_states(self, pixels: torch.Tensor, layers: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index, hidden_state) for the requested indices in ascending order, as computed.

        Without autograd (no_grad / inference_mode) the blocks write their outputs into two reused
        buffers in turn (ping-pong: the embedding output and one more), so the memory is two hidden
        states whatever the depth or the allocator: a yielded state stays valid until the next one has
        been yielded and the generator resumed, so consume (or copy) it before that.
        """
        wanted = set(self._check_layers(layers))
        x = self.embed(pixels)  # a fresh tensor of ours: it becomes the first buffer
        if 0 in wanted:
            yield 0, x
        buffers = None if torch.is_grad_enabled() else (x, torch.empty_like(x))
        for i, block in enumerate(self.blocks[: max(wanted)], start=1):
            x = block(x) if buffers is None else block(x, out=buffers[i % 2])
            if i in wanted:
                yield i, x

    def forward(self, pixels: torch.Tensor, layers: Sequence[int] | None = None,
                out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The requested hidden states stacked ``[len(layers), B, T, D]`` in the order asked.

        ``out``: an optional preallocated buffer of that shape to write into; ``dtype``: the dtype of
        the buffer allocated otherwise (default: the hidden states').
        """
        layers = self._check_layers(range(1, self.config.num_layers + 1) if layers is None else layers)
        slot = {idx: k for k, idx in enumerate(layers)}
        for idx, h in self.iter_hidden_states(pixels, layers):
            if out is None:
                out = h.new_empty((len(layers), *h.shape), dtype=dtype or h.dtype)
            elif out.shape != (len(layers), *h.shape):
                raise ValueError(f"out: expected shape {(len(layers), *h.shape)}, got {tuple(out.shape)}")
            out[slot[idx]] = h
        return out

    def num_tokens(self, image_hw: tuple[int, int]) -> int:
        p = self.config.patch_size
        return self.config.num_prefix_tokens + (image_hw[0] // p) * (image_hw[1] // p)
