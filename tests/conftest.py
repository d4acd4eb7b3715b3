"""Test configuration. Environment first: Triton must see TRITON_INTERPRET before any @triton.jit."""
import os
import secrets
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

# Shared test helpers (tests/hf_models.py) import as top-level modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    # No GPU: the Triton kernels run through the interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test (COMM_FAST_TEST_SEED reproduces one); reported on failure."""
    value = int(os.environ.get("COMM_FAST_TEST_SEED", secrets.randbelow(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


def _nan_empty(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**31))


@pytest.fixture
def poison(monkeypatch):
    """Buffers the Triton launchers allocate start as NaN (integers as INT32_MIN): unwritten output
    elements show up instead of passing by luck. Returns the allocator, to poison a buffer by hand."""
    from comm_fast.kernels import _utils

    monkeypatch.setattr(_utils, "_empty", _nan_empty)
    return _nan_empty


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"COMM_FAST_TEST_SEED={value} reproduces this run"))
