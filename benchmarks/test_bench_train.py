"""pytest-benchmark: one training step of COMMForCausalLM (``pytest benchmarks/ --benchmark-only``).

The same step as ``comm-fast profile-train`` (collate, joint_preprocess, forward, backward, AdamW) on the
same batches for each variant: ours packed, ours padded, and ours packed with the naive transformers
visual branch (``COMMReference.from_tower``). Preset: COMM_FAST_TRAIN_PRESET (default tiny on CPU,
1b on a GPU); compare the rows of one group side by side, from the same run.
"""
import os

import pytest
import torch

from comm_fast.profile import Session

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("COMM_FAST_TRAIN_PRESET", "1b" if DEVICE.type == "cuda" else "tiny")
ROUNDS = 5


@pytest.fixture(scope="module")
def session():
    threads = torch.get_num_threads()
    if PRESET == "tiny" and DEVICE.type == "cpu":
        torch.set_num_threads(1)  # as comm-fast train and profile-train on the tiny preset
    s = Session(PRESET, batch_size=8 if PRESET != "comm-7b" else 4, num_batches=ROUNDS + 1, baseline=True,
                device=DEVICE)
    yield s
    s.close()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["ours_packed", "ours_padded", "baseline_packed"])
def test_train_step(benchmark, session, variant):
    v = session.variant(variant)
    batches = iter(range(ROUNDS + 1))
    session.step(v, 0)  # warm-up
    benchmark.group = f"train step ({PRESET}, batch {session.batch_size})"
    benchmark.extra_info["tokens_per_step"] = sum(session.lengths[i] for b in session.batches[:ROUNDS] for i in b) / ROUNDS
    benchmark.pedantic(lambda: session.step(v, next(batches) % len(session.batches)), rounds=ROUNDS,
                       warmup_rounds=0)
