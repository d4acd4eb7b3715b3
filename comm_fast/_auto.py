"""Registering COMM with transformers' Auto classes, without importing transformers at ``import comm_fast``.

``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoProcessor`` learn model_type "comm" when the transformers
module defining each is first imported (a finder on ``sys.meta_path`` runs the registration right after the
module's own code), or at once when it already was. The model's and the processor's registrations import
their classes, so that cost falls on a program that uses those Auto classes, and only then.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def _config(module) -> None:
    from comm_fast.mllm_config import MODEL_TYPE, COMMConfig

    module.AutoConfig.register(MODEL_TYPE, COMMConfig, exist_ok=True)


def _model(module) -> None:
    from comm_fast.mllm import COMMConfig, COMMForCausalLM

    module.AutoModelForCausalLM.register(COMMConfig, COMMForCausalLM, exist_ok=True)


def _processor(module) -> None:
    from comm_fast.mllm_config import COMMConfig
    from comm_fast.models.processing import COMMProcessor

    module.AutoProcessor.register(COMMConfig, COMMProcessor, exist_ok=True)


REGISTRATIONS = {
    "transformers.models.auto.configuration_auto": _config,
    "transformers.models.auto.modeling_auto": _model,
    "transformers.models.auto.processing_auto": _processor,
}


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the registration."""

    def __init__(self, loader, register):
        self.loader, self.register = loader, register

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.register(module)

    def __getattr__(self, name):  # get_source, get_filename, ...: the original loader's
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        register = REGISTRATIONS.get(name)
        if register is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, register)
        return spec


def install() -> None:
    """Register now with the Auto modules already imported, and on import for the others (once per process)."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for name, register in REGISTRATIONS.items():
        if name in sys.modules:
            register(sys.modules[name])
    sys.meta_path.insert(0, _Finder())
