"""COMMVisionConfig: the visual branch's options (docs/architecture.md §1–§2), saved as config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from comm_fast.activations import ACTIVATIONS
from comm_fast.ops.patch import ASPECTS, POS_EMBED_MODES, RESAMPLE_MODES

CONFIG_TYPE = "comm_vision_tower"
MLP_ACTIVATIONS = tuple(ACTIVATIONS)
# what a saved config without the ``aspect`` field was trained with: joint_preprocess's center crop
SAVED_ASPECT = "crop"


@dataclasses.dataclass
class COMMVisionConfig:
    # HF hidden-state indices (1 = first block); an empty tuple turns that branch off (one encoder alone)
    clip_layers: tuple[int, ...] = tuple(range(1, 25))
    dino_layers: tuple[int, ...] = tuple(range(19, 25))
    mlp_ratio: int = 4                                    # DINOv2 MLP hidden width = mlp_ratio * D_clip
    mlp_activation: str = "gelu"                          # exact erf GELU, as LLaVA's projector
    combine: str = "concat"                               # "concat": P([v1; MLP(v2)]), "add": P(v1 + MLP(v2))
    layer_weights: str = "raw"                            # "raw" alpha as learned, or "softmax" over layers
    per_layer_linear: bool = True                         # LLN_i per layer, else one shared Linear per encoder
    grid_resample: str = "bilinear"                       # how v2 reaches CLIP's grid when the grids differ
    clip_image_size: int = 336
    dino_image_size: int = 336
    out_dim: int = 4096                                   # the LLM's hidden size
    clip_pos_interp: str | None = None                    # None: the checkpoint family's mode (docs/architecture.md §1)
    dino_pos_interp: str | None = None
    ln_eps: float = 1e-5                                  # eps of the merge LayerNorms
    clip: dict | None = None                              # encoder configs (comm_fast.models.ViTConfig fields)
    dino: dict | None = None
    # how an image becomes square: "pad" with each encoder's mean colour (LLaVA-1.5 / Shikra's
    # expand2square; normalised boxes then refer to the whole image) or "crop" (the processors' center crop)
    aspect: str = "pad"

    def __post_init__(self):
        self.clip_layers = self._layers("clip_layers", self.clip_layers)
        self.dino_layers = self._layers("dino_layers", self.dino_layers)
        if not self.clip_layers and not self.dino_layers:
            raise ValueError("clip_layers, dino_layers: both empty; at least one encoder's layers must be merged")
        choices = {"mlp_activation": MLP_ACTIVATIONS, "combine": ("concat", "add"), "aspect": ASPECTS,
                   "layer_weights": ("raw", "softmax"), "grid_resample": RESAMPLE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("clip_pos_interp", "dino_pos_interp"):
            if getattr(self, name) not in (None, *POS_EMBED_MODES):
                raise ValueError(f"{name}: expected None or one of {POS_EMBED_MODES}, got {getattr(self, name)!r}")
        for name in ("mlp_ratio", "clip_image_size", "dino_image_size", "out_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.per_layer_linear, bool):
            raise TypeError(f"per_layer_linear: expected a bool, got {self.per_layer_linear!r}")

    @staticmethod
    def _layers(name: str, value) -> tuple[int, ...]:
        try:
            layers = tuple(int(i) for i in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a sequence of hidden-state indices, got {value!r}") from None
        if len(set(layers)) != len(layers) or min(layers, default=0) < 0:
            raise ValueError(f"{name}: expected distinct non-negative indices, got {layers}")
        return layers

    @property
    def branches(self) -> tuple[str, ...]:
        """The encoders whose features are merged: ("clip", "dino"), or one of them alone."""
        return tuple(b for b, layers in (("clip", self.clip_layers), ("dino", self.dino_layers)) if layers)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["clip_layers"] = list(self.clip_layers)
        data["dino_layers"] = list(self.dino_layers)
        return {"config_type": CONFIG_TYPE, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides) -> "COMMVisionConfig":
        """A config from its fields. A saved one (``config_type`` set, as ``to_dict`` writes) that predates
        the ``aspect`` field gets SAVED_ASPECT, the preprocessing its model was trained with."""
        if data.get("config_type") == CONFIG_TYPE and "aspect" not in data:
            data = {**data, "aspect": SAVED_ASPECT}
        data = {k: v for k, v in data.items() if k != "config_type"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((set(data) | set(overrides)) - names)
        if unknown:
            raise ValueError(f"config: unknown COMMVisionConfig fields {unknown}; known: {sorted(names)}")
        return cls(**{**data, **overrides})

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
