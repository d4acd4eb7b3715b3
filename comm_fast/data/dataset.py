"""LLaVA conversation JSON over an image folder: validation, tokenisation, batching with or without packing.

Everything that can be checked before training starts is checked here, when the dataset is built:
the JSON, each record's turns, the ``<image>`` count against the record's images, that every image
file exists and opens. Problems raise a ValueError naming the file and the record (or, for images
with ``skip_bad_images``, drop the record and count it). Images are decoded per batch.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch

from comm_fast.data.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, tokenize_conversation
from comm_fast.models import loading


@dataclasses.dataclass
class Sample:
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[str]


def resolve_data(path: str, stage: str, image_folder: str | None = None) -> tuple[str, str]:
    """(json file, image folder) for ``--data``: a JSON file, or a directory holding ``<stage>.json``
    (or ``data.json``); images are relative to ``image_folder`` or else to the JSON's directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        for name in (f"{stage}.json", "data.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name), image_folder or path
        raise FileNotFoundError(f"--data: {path} holds neither {stage}.json nor data.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file or directory: {path}")
    return path, image_folder or os.path.dirname(path)


def check_image(path: str) -> str | None:
    """None when the file exists and opens as an image, else why not."""
    from PIL import Image

    if not os.path.isfile(path):
        return "file not found"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:
        return f"corrupt image ({type(exc).__name__}: {exc})"
    return None


def load_images(paths: list[str]) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB")))
        except Exception as exc:
            raise ValueError(f"{p}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return out


class ConversationDataset:
    def __init__(self, json_path: str, image_folder: str, tokenizer, num_image_tokens: int, max_length: int,
                 skip_bad_images: bool = False):
        self.json_path, self.image_folder = json_path, image_folder
        records = loading.read_json(json_path, kind=object)
        if not isinstance(records, list) or not records:
            raise ValueError(f"{json_path}: expected a non-empty JSON list of conversation records")
        self.samples: list[Sample] = []
        self.num_truncated = 0
        self.bad_images: list[str] = []
        for i, rec in enumerate(records):
            images = self._check_record(i, rec)
            bad = [(p, why) for p in images if (why := check_image(p)) is not None]
            if bad:
                if not skip_bad_images:
                    p, why = bad[0]
                    raise ValueError(f"{p}: {why} (record {i} of {json_path}); pass --skip-bad-images to skip "
                                     "such records")
                self.bad_images += [p for p, _ in bad]
                continue
            ids, labels, truncated = tokenize_conversation(rec["conversations"], tokenizer, num_image_tokens,
                                                           max_length)
            if truncated:
                self.num_truncated += 1
                if (ids == tokenizer.image_token_id).sum() != len(images) * num_image_tokens:
                    raise ValueError(f"{json_path}: record {i}: max_length {max_length} cuts through its image "
                                     f"tokens ({len(images)} x {num_image_tokens}); raise max_length")
            self.samples.append(Sample(ids, labels, images))
        if self.num_truncated:
            warnings.warn(f"{json_path}: {self.num_truncated} of {len(records)} conversations were longer than "
                          f"max_length={max_length} tokens and were truncated", stacklevel=2)
        if self.bad_images:
            warnings.warn(f"{json_path}: skipped {len(self.bad_images)} records with missing or corrupt images "
                          f"(first: {self.bad_images[0]})", stacklevel=2)
        if not self.samples:
            raise ValueError(f"{json_path}: no usable records left")

    def _check_record(self, i: int, rec) -> list[str]:
        where = f"{self.json_path}: record {i}"
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
            raise ValueError(f"{where}: expected an object with a non-empty 'conversations' list")
        where += f" (id {rec['id']!r})" if "id" in rec else ""
        for k, turn in enumerate(rec["conversations"]):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: turn {k} is not an object with a string 'value'")
            expected = "human" if k % 2 == 0 else "gpt"
            if turn.get("from") != expected:
                raise ValueError(f"{where}: turn {k} is from {turn.get('from')!r}, expected {expected!r} "
                                 "(turns alternate human, gpt, starting with human)")
        image = rec.get("image")
        images = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{where}: 'image' must be a path or a list of paths")
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in rec["conversations"])
        if placeholders != len(images):
            raise ValueError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
        return [os.path.join(self.image_folder, p) for p in images]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def num_label_tokens(self, indices) -> int:
        """Target tokens of these samples after the model's shift (the first token is never a target)."""
        return int(sum((self.samples[i].labels[1:] != IGNORE_INDEX).sum() for i in indices))


def collate(samples: list[Sample], pad_id: int, pack: bool = False, capacity: int | None = None) -> dict:
    """A batch dict for COMMForCausalLM.

    Padded: ``input_ids``, ``labels``, ``attention_mask`` [B, T]. Packed: samples go, in order, into
    the first row with room (rows of ``capacity`` tokens; None: one row for all); ``position_ids``
    restart at 0 per sample and a row's padding tail is its own segment with no targets.
    ``image_paths`` follows the order of the image tokens in the flattened rows.
    """
    if pack:
        capacity = capacity or sum(len(s.input_ids) for s in samples)
        rows: list[list[Sample]] = []
        used: list[int] = []
        for s in samples:
            n = len(s.input_ids)
            k = next((r for r, u in enumerate(used) if u + n <= capacity), None)
            if k is None:
                rows.append([]), used.append(0)
                k = len(rows) - 1
            rows[k].append(s)
            used[k] += n
        width = max(used)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        paths = []
        for r, row in enumerate(rows):
            t = 0
            for s in row:
                n = len(s.input_ids)
                ids[r, t:t + n], labels[r, t:t + n] = torch.from_numpy(s.input_ids), torch.from_numpy(s.labels)
                pos[r, t:t + n] = torch.arange(n)
                paths += s.images
                t += n
            pos[r, t:] = torch.arange(width - t)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "image_paths": paths,
                "num_tokens": sum(used), "num_images": len(paths)}
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    paths = []
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n], labels[r, :n], mask[r, :n] = torch.from_numpy(s.input_ids), torch.from_numpy(s.labels), 1
        paths += s.images
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "image_paths": paths,
            "num_tokens": int(mask.sum()), "num_images": len(paths)}


class DataOrder:
    """The sample order: a fresh seeded permutation per epoch; a position (samples consumed) is all
    that resuming needs. ``take(n)`` returns the next n indices, crossing epochs as needed."""

    def __init__(self, size: int, seed: int, position: int = 0):
        self.size, self.seed, self.position = size, seed, position
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g).tolist()
        return self._perm

    def take(self, n: int) -> list[int]:
        out = []
        for p in range(self.position, self.position + n):
            out.append(self._permutation(p // self.size)[p % self.size])
        self.position += n
        return out
