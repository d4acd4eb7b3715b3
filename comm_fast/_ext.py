"""The compiled csrc extension ``comm_fast._C``, loaded lazily; a missing build never breaks import."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load():
    """Return (module or None, reason)."""
    try:
        from comm_fast import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # not built, or built against another torch
        return None, f"comm_fast._C is not built or failed to load ({exc}); run `make ext`"
    return _C, "compiled extension loaded"


def has_cuda() -> bool:
    mod, _ = load()
    return bool(mod is not None and getattr(mod, "with_cuda", lambda: False)())
