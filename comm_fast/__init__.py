"""comm_fast: a fast, exact runtime for COMM-style multimodal LLMs.

COMM ("From CLIP to DINO", arXiv 2310.08825) fuses multi-level CLIP and DINOv2 features into
visual tokens for a LLaMA-family decoder. See DESIGN.md for the contracts.
"""
from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# Installed, comm_fast.kernels maps to the top-level kernels/ folder (setup.py package_dir).
# Run from a source tree on PYTHONPATH (e.g. benchmarks/gpu_check.sh), find it there too.
_src_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_src_root, *f)) for f in (("setup.py",), ("kernels", "__init__.py"))):
    __path__.append(_src_root)  # noqa: F821 - the package's own __path__

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
