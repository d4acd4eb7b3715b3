"""What the merge and patch ops share: torch.library registration and the record of which
backend each op ran with, and why."""
from __future__ import annotations

import torch

from comm_fast import _backend

_REASONS: dict[tuple[str, str], str] = {}


def note(op: str, backend: str, why: str) -> None:
    """Remember why `backend` was chosen; the op records it when it runs (eager or compiled)."""
    if not torch.compiler.is_compiling():  # the recording lock would break a traced graph
        _REASONS[(op, backend)] = why


def ran(op: str, backend: str, detail: str = "") -> None:
    reason = _REASONS.get((op, backend), "chosen when the compiled graph was traced")
    _backend.record(op, backend, f"{reason}; {detail}" if detail else reason)


def register(name: str, impl, fake, mutates_args=()):
    """``comm_fast::<name>``, with ``impl`` as its CPU and CUDA kernel and ``fake`` for tracing."""
    op = torch.library.custom_op(f"comm_fast::{name}", impl, mutates_args=mutates_args, device_types="cpu")
    op.register_kernel("cuda")(impl)
    op.register_fake(fake)
    return op
