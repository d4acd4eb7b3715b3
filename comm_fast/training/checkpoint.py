"""Training checkpoints: DIR/checkpoint-STEP, complete or absent.

A checkpoint holds the trainable weights (safetensors), the optimizer and scheduler states, each
rank's RNG states (Python, NumPy, torch CPU and CUDA: dropout continues as it would have) and
trainer_state.json (step, data position, world size, the run's fingerprint). It is written into
DIR/.tmp-checkpoint-STEP and renamed into place once every file is there, so a directory named
checkpoint-STEP is complete; one cut off mid-write is a .tmp- directory and is never loaded, and one
that lacks any file (an RNG file of any rank included) is not complete.

A LoRA run's checkpoint is also an adapter directory (comm_fast.training.lora): trainable.safetensors holds the
heads, adapter_model.safetensors and adapter_config.json PEFT's adapter, lora.json its base; no frozen weight.

State dicts go through torch.distributed.checkpoint's get/set_state_dict with full (unsharded)
tensors, so one format serves a single process, DDP and FSDP2.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from comm_fast.training import lora

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", STATE_FILE)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=torch.distributed.is_initialized(), **kw)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def read_state(path: str) -> dict | None:
    """trainer_state.json of a checkpoint directory, or None when it is not complete."""
    if not all(os.path.isfile(os.path.join(path, f)) for f in FILES):
        return None
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(state, dict) or "step" not in state or not isinstance(state.get("world_size"), int):
        return None
    if not all(os.path.isfile(os.path.join(path, rng_file(r))) for r in range(state["world_size"])):
        return None
    if state.get("lora") and not all(os.path.isfile(os.path.join(path, f)) for f in lora.FILES):
        return None
    return state


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    if not os.path.isdir(out):
        return []
    found = [(int(m.group(1)), os.path.join(out, name)) for name in os.listdir(out)
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(out, name))]
    return sorted(found)


def latest_complete(out: str) -> tuple[str, dict] | None:
    for _, path in reversed(list_checkpoints(out)):
        state = read_state(path)
        if state is not None:
            return path, state
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: str, step: int, model, optimizer, scheduler, trainable: set[str], state: dict,
         rank: int = 0, barrier=lambda: None, world: int = 1) -> str:
    """Write DIR/checkpoint-STEP atomically; every rank calls this (state dicts gather collectively)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from comm_fast._io import save_safetensors

    final = os.path.join(out, f"checkpoint-{step}")
    tmp = os.path.join(out, f".tmp-checkpoint-{step}")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt cut off mid-write
        os.makedirs(tmp)
    barrier()
    try:
        torch.save(rng_state(), os.path.join(tmp, rng_file(rank)))
        if rank == 0:
            weights = {k: v for k, v in model_sd.items() if k in trainable}
            if state.get("lora"):  # the adapter in PEFT's files, the heads in trainable.safetensors
                weights = lora.save(tmp, model, weights, state["lora"])
            save_safetensors(weights, os.path.join(tmp, "trainable.safetensors"))
            torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        barrier()
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump({**state, "step": step, "world_size": world}, f, indent=2)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    barrier()
    return final


def load(path: str, model, optimizer, scheduler, trainable: set[str], rank: int = 0) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    weights = load_file(os.path.join(path, "trainable.safetensors"))
    if lora.adapted(model) is not None:
        weights.update(lora.read(path, model))
    if set(weights) != trainable:
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise ValueError(f"{path}: its trainable weights do not match this run's (missing {missing[:5]}, "
                         f"unexpected {extra[:5]}); was it written by another --stage or config?")
    optim_sd = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_sd,
                   options=_options(strict=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    set_rng_state(torch.load(os.path.join(path, rng_file(rank)), weights_only=False))
