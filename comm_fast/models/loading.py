"""Reading local checkpoints: Hugging Face directories (safetensors, sharded, .bin) and bare state dicts.

Every failure names the file and says what was expected and what came.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def read_json(path: str, kind: type = dict):
    """A JSON file whose top level must be a ``kind`` (dict by default); errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(data, kind):
        expected = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise ValueError(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def _load_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: weight file not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # safetensors / pickle / zip errors of a truncated or corrupt file
        raise ValueError(f"{path}: corrupt or unreadable weight file ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # training checkpoints that wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return sd


def read_checkpoint(path: str) -> tuple[dict | None, dict[str, torch.Tensor], str]:
    """Return (config.json contents or None, state dict, the weight file(s) read).

    ``path`` is a Hugging Face model directory or a single state-dict file (.pth/.pt/.bin/.safetensors).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(STATE_DICT_SUFFIXES):
            raise ValueError(f"path: expected a model directory or a {'/'.join(STATE_DICT_SUFFIXES)} file, got {path}")
        return None, _load_file(path), path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: no such checkpoint directory or file: {path}")
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path) if os.path.exists(config_path) else None
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        if name.endswith(".index.json"):
            index = read_json(file).get("weight_map")
            if not isinstance(index, dict):
                raise ValueError(f"{file}: expected a 'weight_map' object")
            sd = {}
            for shard in sorted(set(index.values())):
                sd.update(_load_file(os.path.join(path, shard)))
            return config, sd, file
        return config, _load_file(file), file
    pths = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt")))
    if len(pths) == 1:
        return config, _load_file(os.path.join(path, pths[0])), os.path.join(path, pths[0])
    raise FileNotFoundError(f"path: no weights in {path}: expected one of {', '.join(WEIGHT_FILES)} "
                            f"or a single .pth file, found {sorted(os.listdir(path)) or 'nothing'}")


def strip_prefix(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the first of ``prefixes`` that some keys carry (e.g. 'vision_model.'), keeping the rest."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def remap(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]], ignore: tuple[str, ...],
          fuse: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
    """Drop ignored keys, rename with regex rules (applied in order), then fuse in place.

    Keys that no rule matches are kept as they are, so the final strict load names them.
    """
    out = {}
    for key, value in sd.items():
        if any(re.fullmatch(pattern, key) for pattern in ignore):
            continue
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if fuse is not None:
        fuse(out)
    return out


def fuse_linears(sd: dict[str, torch.Tensor], names: tuple[str, ...], into: str) -> None:
    """Concatenate per-block linear layers along the output axis (e.g. q, k, v into one qkv)."""
    pattern = re.compile(r"(blocks\.\d+\.)" + re.escape(names[0]) + r"\.(weight|bias)$")
    for key in [k_ for k_ in sd if pattern.match(k_)]:
        block, kind = pattern.match(key).groups()
        parts = [block + name + "." + kind for name in names]
        missing = [p for p in parts if p not in sd]
        if missing:
            raise ValueError(f"checkpoint: missing keys {missing} next to {key}")
        sd[f"{block}{into}.{kind}"] = torch.cat([sd.pop(p) for p in parts], dim=0)


def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load with every missing and unexpected key named, and shapes checked."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                        f"({len(unexpected)} in all)")
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
              for k in own if k in sd and own[k].shape != sd[k].shape]
    if shapes:
        problems.append("shape mismatches " + "; ".join(shapes[:8]))
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)
