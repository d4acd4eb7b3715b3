"""Which multilevel_merge forward variant runs (comm_fast.kernels.multilevel_merge.VARIANTS).

Per (device, versions, dtype, shape, layout): on CUDA the first call times every eligible variant and
keeps the fastest, in memory and in a JSON file under $COMM_FAST_CACHE_DIR (default ~/.cache/comm_fast),
written atomically, so later processes skip the measurement as Triton's autotune cache does.
COMM_FAST_MERGE_VARIANT forces one variant. Under torch.distributed every rank takes rank 0's choice,
so that no rank computes differently from another. Where nothing is measured (the Triton interpreter)
the first eligible variant runs, and the reason says so. ``chosen()`` feeds comm_fast.info().
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from typing import Callable

import torch

VARIANTS = ("folded", "materialised")  # preference order where nothing is measured
ENV = "COMM_FAST_MERGE_VARIANT"
_FILE = "merge_variants.json"

_lock = threading.Lock()
_CHOSEN: dict[str, dict] = {}


def cache_path() -> str:
    root = os.environ.get("COMM_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "comm_fast")
    return os.path.join(root, _FILE)


def forced() -> str | None:
    """The variant COMM_FAST_MERGE_VARIANT names, or None when it is unset or empty."""
    name = os.environ.get(ENV, "").strip().lower()
    if not name:
        return None
    if name not in VARIANTS:
        raise ValueError(f"{ENV}: expected one of {VARIANTS} (or unset), got {name!r}")
    return name


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of 5 calls after 2 warm-ups (the first compiles and builds cached weights)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent or unreadable: measure again
        return {}


def _save(key: str, entry: dict) -> None:
    """Merge one entry into the file: write a temporary file beside it, then rename (atomic)."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _load()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".merge_variants.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only home: the in-memory cache still holds
        pass


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _agree(entry: dict) -> dict:
    """Rank 0's entry on every rank (a no-op outside torch.distributed)."""
    if not _distributed():
        return entry
    box = [entry]
    torch.distributed.broadcast_object_list(box, src=0)
    return dict(box[0], reason=box[0]["reason"] + (" (rank 0's choice)" if torch.distributed.get_rank() else ""))


def choose(key: str, runners: dict[str, Callable[[], object]], skipped: dict[str, str], device: torch.device,
           measure: bool) -> tuple[str, str]:
    """(variant, why) for ``key``. runners: the eligible variants, each a call that runs it once;
    skipped: the others, with the reason they are not eligible."""
    name = forced()
    if name is not None:
        if name not in runners:
            raise ValueError(f"{ENV}={name}: that variant cannot run this call: {skipped.get(name, 'unknown')}")
        return name, f"forced by {ENV}"
    with _lock:
        hit = _CHOSEN.get(key)
    if hit is not None and hit["variant"] in runners:
        return hit["variant"], hit["reason"]
    why_not = "".join(f"; {n} not eligible: {w}" for n, w in skipped.items())
    if len(runners) == 1:
        entry = {"variant": next(iter(runners)), "reason": "the only eligible variant" + why_not}
    elif not measure or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        why = "Triton interpreter" if not measure else "first seen inside a CUDA graph capture"
        entry = {"variant": next(v for v in VARIANTS if v in runners),
                 "reason": f"not measured ({why}): the first eligible of " + ", ".join(VARIANTS)}
    else:
        disk = _load().get(key)
        if isinstance(disk, dict) and disk.get("variant") in runners:
            entry = {"variant": disk["variant"], "times_ms": disk.get("times_ms", {}),
                     "reason": f"cached in {cache_path()} (measured {_fmt(disk.get('times_ms', {}))})"}
        else:
            times = {n: time_ms(fn, device) for n, fn in runners.items()}
            best = min(times, key=times.get)
            entry = {"variant": best, "times_ms": {n: round(t, 4) for n, t in times.items()},
                     "reason": f"measured fastest ({_fmt(times)})"}
            if not _distributed() or torch.distributed.get_rank() == 0:
                _save(key, {"variant": best, "times_ms": entry["times_ms"]})
        entry = _agree(entry)
        entry["reason"] += why_not
    with _lock:
        _CHOSEN[key] = entry
    return entry["variant"], entry["reason"]


def _fmt(times: dict) -> str:
    return ", ".join(f"{n} {t:.3f} ms" for n, t in times.items())


def chosen() -> dict[str, dict]:
    """Every (key -> variant, reason) decided in this process."""
    with _lock:
        return {k: {"variant": v["variant"], "reason": v["reason"]} for k, v in _CHOSEN.items()}


def clear() -> None:
    """Forget the in-memory choices (the disk cache stays)."""
    with _lock:
        _CHOSEN.clear()
