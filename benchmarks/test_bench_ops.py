"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (not part of ``make test``).

Each subject of ``comm-fast bench`` twice: the fused path and its eager reference, at the
preset's shapes (COMM_FAST_BENCH_PRESET; by default h200 on a GPU, cpu-small otherwise).
"""
import functools
import os

import pytest
import torch

from comm_fast import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("COMM_FAST_BENCH_PRESET") or bench.default_preset(DEVICE)


@functools.lru_cache(maxsize=None)
def case(name):
    (c,) = bench.build_cases(bench.PRESETS[PRESET], DEVICE, [name], cache_bytes=64 * 2**20)
    return c


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("variant", ["fused", "ref"])
@pytest.mark.parametrize("subject", bench.SUBJECTS)
def test_subject(benchmark, subject, variant):
    fn = getattr(case(subject), variant)
    benchmark.group = subject
    benchmark.extra_info["shape"] = case(subject).shape
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=3, warmup_rounds=1)
