"""Backend selection shared by every op: ``backend=`` argument > COMM_FAST_BACKEND > auto.

Each op records the backend that actually ran (and why), so ``comm_fast.info()`` reports what
happened rather than what was hoped for.
"""
from __future__ import annotations

import os
import threading
import warnings

BACKENDS = ("auto", "triton", "torch", "cpp", "cuda")

_lock = threading.Lock()
_last_used: dict[str, dict] = {}
_warned: set[str] = set()


def requested(backend: str | None) -> str:
    """The backend asked for: the argument, else COMM_FAST_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get("COMM_FAST_BACKEND", "auto")
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else "COMM_FAST_BACKEND"
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


def record(op: str, backend: str, reason: str) -> None:
    # Skipped while torch.compile traces (a lock is not traceable); custom ops record when they run.
    if _compiling():
        return
    with _lock:
        _last_used[op] = {"backend": backend, "reason": reason}


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def last_used() -> dict[str, dict]:
    with _lock:
        return {k: dict(v) for k, v in _last_used.items()}


def warn_once(key: str, message: str) -> None:
    if _compiling():
        return
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
