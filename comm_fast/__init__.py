"""comm_fast: a fast, exact runtime for COMM-style multimodal LLMs.

COMM ("From CLIP to DINO", arXiv 2310.08825) fuses multi-level CLIP and DINOv2 features into
visual tokens for a LLaMA-family decoder. See DESIGN.md for the contracts.
"""
from __future__ import annotations

__version__ = "0.1.0"

# Imported eagerly so that the name `comm_fast.info` is the function, not its module.
from comm_fast._info import info  # noqa: E402

_LAZY = {
    "COMMVisionConfig": ("comm_fast.config", "COMMVisionConfig"),
    "COMMVisionTower": ("comm_fast.tower", "COMMVisionTower"),
    "COMMConfig": ("comm_fast.mllm", "COMMConfig"),
    "COMMForCausalLM": ("comm_fast.mllm", "COMMForCausalLM"),
}

__all__ = list(_LAZY) + ["info", "ops", "models", "reference"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in ("ops", "models", "reference", "kernels"):
        import importlib

        return importlib.import_module(f"comm_fast.{name}")
    raise AttributeError(f"module 'comm_fast' has no attribute {name!r}")
