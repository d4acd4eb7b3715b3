"""comm_fast: a fast, exact runtime for COMM-style multimodal LLMs.

COMM ("From CLIP to DINO", arXiv 2310.08825) fuses multi-level CLIP and DINOv2 features into
visual tokens for a LLaMA-family decoder. docs/architecture.md describes the semantics and contracts.
"""
from __future__ import annotations

__version__ = "0.1.0"

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _SourceTreeKernels(_abc.MetaPathFinder):
    """comm_fast.kernels is the top-level kernels/ folder (setup.py's package_dir does this when
    installed). Run from a source tree on PYTHONPATH (e.g. benchmarks/gpu_check.sh), this finds it
    there; consulted last, and for that one name only."""

    def __init__(self, directory: str):
        self.directory = directory

    def find_spec(self, name, path=None, target=None):
        if name != "comm_fast.kernels":
            return None
        return _util.spec_from_file_location(name, _os.path.join(self.directory, "__init__.py"),
                                             submodule_search_locations=[self.directory])


_src_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (all(_os.path.isfile(_os.path.join(_src_root, *f)) for f in (("setup.py",), ("kernels", "__init__.py")))
        and not any(isinstance(f, _SourceTreeKernels) for f in _sys.meta_path)):
    _sys.meta_path.append(_SourceTreeKernels(_os.path.join(_src_root, "kernels")))

# Imported eagerly so that the name `comm_fast.info` is the function, not its module.
from comm_fast._info import info  # noqa: E402

# model_type "comm" for AutoConfig / AutoModelForCausalLM / AutoProcessor, as transformers' Auto modules load
from comm_fast import _auto  # noqa: E402

_auto.install()

_LAZY = {
    "COMMVisionConfig": ("comm_fast.config", "COMMVisionConfig"),
    "COMMVisionTower": ("comm_fast.tower", "COMMVisionTower"),
    "COMMConfig": ("comm_fast.mllm_config", "COMMConfig"),
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
