"""Running an evaluation: annotations -> batched greedy answers -> scores -> predictions.jsonl and
metrics.json (each written whole, by rename, and only when everything before succeeded).

Under torchrun every rank answers the items ``rank::world`` and the rows are gathered to every rank
(rank 0 writes). A failure on one rank is gathered too, so that every rank raises it instead of
waiting for the others.
"""
from __future__ import annotations

import datetime
import json
import os
import warnings

import torch

from comm_fast.eval import pope, rec, vqa
from comm_fast.eval.records import Item, read_records

TASKS = {"rec": rec, "pope": pope, "vqa": vqa}
PREDICTIONS, METRICS = "predictions.jsonl", "metrics.json"
ROW_FIELDS = ("id", "split", "answer", "target")  # what a saved prediction needs to be scored again


def _task(name: str):
    if name not in TASKS:
        raise ValueError(f"--task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


# -- annotations and images ---------------------------------------------------------------------------
def _paths(data) -> list[str]:
    return [os.fspath(data)] if isinstance(data, (str, os.PathLike)) else [os.fspath(d) for d in data]


def load_items(task: str, data, image_folder: str | None = None, prompt: str | None = None):
    """(items, counts) of one or more annotation files; ids must be unique across them."""
    module = _task(task)
    items, counts, seen = [], {}, {}
    for path in _paths(data):
        got, more = module.load(read_records(path), path, image_folder, prompt)
        for it in got:
            if it.id in seen:
                raise ValueError(f"{path}: id {it.id!r} appears twice (also in {seen[it.id]}); ids must be unique")
            seen[it.id] = path
        items += got
        for k, v in more.items():
            counts[k] = counts.get(k, 0) + v
    return items, counts


def image_problem(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """(why the image cannot be used or None, its (width, height)), from its header only."""
    from PIL import Image

    if not os.path.isfile(path):
        return "file not found", None
    try:
        with Image.open(path) as im:
            return None, im.size
    except Exception as exc:
        return f"not an image ({type(exc).__name__}: {exc})", None


def check_images(items: list[Item], skip_bad_images: bool):
    """(usable items, [{"id", "image", "reason"}] of the skipped ones). A missing or unreadable image is
    an error naming it unless ``skip_bad_images``; an image whose size differs from its annotation's
    is always one (its box would be normalised wrongly)."""
    known: dict[str, tuple] = {}
    good, bad = [], []
    for it in items:
        if it.image not in known:
            known[it.image] = image_problem(it.image)
        why, size = known[it.image]
        if why is not None:
            if not skip_bad_images:
                raise ValueError(f"{it.image}: {why} (item {it.id!r}); pass --skip-bad-images to skip such items")
            bad.append({"id": it.id, "image": it.image, "reason": why})
            continue
        if it.size is not None and tuple(size) != tuple(it.size):
            raise ValueError(f"item {it.id!r}: fields 'width', 'height' say {it.size[0]} x {it.size[1]}, but "
                             f"{it.image} is {size[0]} x {size[1]}")
        good.append(it)
    return good, bad, {p: s for p, (why, s) in known.items() if why is None}


# -- generation ---------------------------------------------------------------------------------------
def _decode(tokenizer, row: list[int]) -> str:
    if tokenizer.eos_id in row:
        row = row[:row.index(tokenizer.eos_id)]
    return tokenizer.decode([t for t in row if t != tokenizer.pad_id]).strip()


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """The first token of "Yes" and of "No" (Prismatic's POPE rule compares their probabilities)."""
    yes, no = tokenizer.encode("Yes")[0], tokenizer.encode("No")[0]
    if yes == no:
        raise ValueError("--pope-rule prismatic: 'Yes' and 'No' begin with the same token in this tokenizer")
    return yes, no


def answer(model, items: list[Item], batch_size: int = 8, max_new_tokens: int = 32, yes_no: tuple | None = None,
           skip_bad_images: bool = False, progress: bool = True, desc: str = "eval"):
    """(rows, bad): greedy answers to ``items``, ``batch_size`` prompts at a time (left-padded, KV cache);
    with ``yes_no`` token ids, each row also gets ``p_yes`` = p(yes) / (p(yes) + p(no)) of its first token.
    An image that fails to decode raises, or with ``skip_bad_images`` is skipped and listed in ``bad``."""
    from tqdm import tqdm

    from comm_fast.data.dataset import load_images

    _positive("--batch-size", batch_size)
    rows, bad = [], []
    bar = tqdm(total=len(items), desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        batch, images = [], []
        for it in items[start:start + batch_size]:
            try:
                images += load_images([it.image])
                batch.append(it)
            except ValueError as exc:
                if not skip_bad_images:
                    raise ValueError(f"{exc} (item {it.id!r}); pass --skip-bad-images to skip such items") from None
                bad.append({"id": it.id, "image": it.image, "reason": str(exc)})
        if batch:
            ids, mask = model.prompt_inputs([it.prompt for it in batch])
            out = model.generate(input_ids=ids, attention_mask=mask, images=images, max_new_tokens=max_new_tokens,
                                 return_dict_in_generate=True, output_scores=yes_no is not None)
            p_yes = None
            if yes_no is not None:
                first = out.scores[0].float()
                p_yes = torch.sigmoid(first[:, yes_no[0]] - first[:, yes_no[1]]).tolist()
            for b, it in enumerate(batch):
                row = {"id": it.id, "split": it.split, "prompt": it.prompt,
                       "answer": _decode(model.tokenizer, out.sequences[b].tolist()), "target": it.target,
                       "image": it.image}
                if it.size is not None:
                    row["size"] = list(it.size)
                if p_yes is not None:
                    row["p_yes"] = p_yes[b]
                rows.append(row)
        bar.update(len(items[start:start + batch_size]))
    bar.close()
    return rows, bad


# -- ranks ----------------------------------------------------------------------------------------------
def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(items: list, rank: int, world: int) -> list:
    """The items rank ``rank`` of ``world`` answers: every world-th from its rank (balanced to one item)."""
    return items[rank::world]


def unshard(parts: list[list]) -> list:
    """The inverse of shard: the ranks' lists (in rank order) interleaved back into the original order."""
    out, longest = [], max((len(p) for p in parts), default=0)
    for i in range(longest):
        out += [p[i] for p in parts if i < len(p)]
    return out


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (just [obj] in a single process)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    parts = [None] * world
    torch.distributed.all_gather_object(parts, obj)
    return parts


def _on_every_rank(fn):
    """fn()'s result from every rank; if any rank failed, every rank raises its error."""
    _, world = rank_world()
    if world == 1:
        return [fn()]
    try:
        result = ("ok", fn())
    except Exception as exc:  # any failure: the other ranks must not wait for this one forever
        result = ("error", f"{type(exc).__name__}: {exc}")
    parts = gather(result)
    errors = [f"rank {r}: {msg}" for r, (kind, msg) in enumerate(parts) if kind == "error"]
    if errors:
        raise ValueError("; ".join(errors))
    return [value for _, value in parts]


# -- scoring and writing ------------------------------------------------------------------------------
def score_rows(task: str, rows: list[dict], pope_rule: str = "llava") -> dict:
    """Score ``rows`` in place; the metrics over all rows and per split."""
    module = _task(task)
    for row in rows:
        row["task"] = task
        module.score(row, pope_rule) if module is pope else module.score(row)
    if not rows:
        raise ValueError("nothing to score: no items left (all skipped?)")
    splits = {}
    for row in rows:
        splits.setdefault(row["split"], []).append(row)
    return {"overall": module.summarize(rows), "splits": {s: module.summarize(r) for s, r in sorted(splits.items())}}


def _row_text(row: dict) -> str:
    first = ("task", "id", "split", "prompt", "answer", "parsed", "score", "target")
    ordered = {k: row[k] for k in first if k in row} | {k: v for k, v in row.items() if k not in first}
    return json.dumps(ordered, ensure_ascii=False)


def write_results(out: str, rows: list[dict], metrics: dict) -> None:
    """predictions.jsonl then metrics.json in ``out``, each by rename (never a partial file)."""
    from comm_fast._io import atomic_write_text

    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, PREDICTIONS), "".join(_row_text(r) + "\n" for r in rows))
    atomic_write_text(os.path.join(out, METRICS), json.dumps(metrics, indent=2) + "\n")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- the two entry points -----------------------------------------------------------------------------
def evaluate(model, task: str, data, image_folder: str | None = None, batch_size: int = 8, out: str | None = None,
             limit: int | None = None, skip_bad_images: bool = False, prompt: str | None = None,
             max_new_tokens: int | None = None, pope_rule: str = "llava", progress: bool = True,
             device=None) -> dict:
    """Evaluate ``model`` (a COMMForCausalLM or the directory of a saved one) on ``task`` ("rec", "pope",
    "vqa") with the annotation file(s) ``data``; returns the metrics and, with ``out``, writes
    ``predictions.jsonl`` and ``metrics.json`` there (rank 0). Everything that can be checked before
    the model runs (arguments, annotations, images) is checked first."""
    module = _task(task)
    max_new_tokens = module.MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    _positive("--batch-size", batch_size)
    _positive("--limit", limit, allow_none=True)
    _positive("--max-new-tokens", max_new_tokens)
    if task == "pope" and pope_rule not in pope.RULES:
        raise ValueError(f"--pope-rule: expected one of {pope.RULES}, got {pope_rule!r}")
    items, counts = load_items(task, data, image_folder, prompt)
    items = items[:limit] if limit else items
    items, bad, sizes = check_images(items, skip_bad_images)
    model_dir = None
    if isinstance(model, (str, os.PathLike)):
        model_dir = os.fspath(model)
        model = load_model(model_dir, device)
    aspect = model.config.vision.aspect
    if task == "rec" and aspect != "pad" and any(w != h for w, h in sizes.values()):
        warnings.warn(f"the model's images are made square with aspect={aspect!r}, not 'pad': its boxes of non-square "
                      "images do not refer to the padded square the targets are normalised to", stacklevel=2)
    yes_no = yes_no_ids(model.tokenizer) if task == "pope" and pope_rule == "prismatic" else None
    rank, world = rank_world()
    mine = shard(items, rank, world)
    was_training = model.training
    model.eval()
    try:
        parts = _on_every_rank(lambda: answer(
            model, mine, batch_size, max_new_tokens, yes_no, skip_bad_images,
            progress and rank == 0, desc=f"eval {task}"))
    finally:
        model.train(was_training)
    rows = unshard([p[0] for p in parts])
    bad += [b for p in parts for b in p[1]]
    metrics = {"task": task, "model": model_dir, "data": _paths(data), "date": _now(), "num_items": len(rows),
               "skipped_bad_images": len(bad), "bad_images": bad[:20], **counts,
               "prompt": prompt or module.DEFAULT_PROMPT, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
               "world_size": world, "image_aspect": aspect}
    if task == "pope":
        metrics["rule"] = pope_rule
    metrics |= score_rows(task, rows, pope_rule)
    if out is not None and rank == 0:
        write_results(out, rows, metrics)
    return metrics


def rescore(predictions: str, task: str | None = None, out: str | None = None, pope_rule: str = "llava") -> dict:
    """Score a saved predictions.jsonl again, without a model (the answers are kept; parsing, scores and
    metrics are recomputed); writes both files to ``out`` (default: the predictions file's folder)."""
    predictions = os.fspath(predictions)
    rows = read_records(predictions)
    for i, row in enumerate(rows):
        for name in ROW_FIELDS:
            if name not in row:
                raise ValueError(f"{predictions}: record {i}: field {name!r} missing (a prediction row has "
                                 f"{', '.join(ROW_FIELDS)})")
        if not isinstance(row["answer"], str):
            raise ValueError(f"{predictions}: record {i}: field 'answer': expected a string, got {row['answer']!r}")
    tasks = {row.get("task", task) for row in rows}
    if task is None and len(tasks) == 1 and None not in tasks:
        task = tasks.pop()
    elif task is None or tasks - {task}:
        raise ValueError(f"{predictions}: rows of task(s) {sorted(map(str, tasks))}, but --task is {task!r}")
    _task(task)
    metrics = {"task": task, "predictions": predictions, "date": _now(), "num_items": len(rows)}
    if task == "pope":
        metrics["rule"] = pope_rule
    metrics |= score_rows(task, rows, pope_rule)
    write_results(out or os.path.dirname(os.path.abspath(predictions)), rows, metrics)
    return metrics


def load_model(directory: str, device=None):
    """A saved COMMForCausalLM with its tokenizer, on ``device`` (default: this rank's GPU in bf16 when
    there is one, else the CPU in fp32); errors name the directory."""
    from comm_fast.mllm import COMMForCausalLM

    try:
        model = COMMForCausalLM.from_pretrained(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"--model {directory}: not a saved COMM model ({exc})") from None
    if model.tokenizer is None:
        raise ValueError(f"--model {directory}: no tokenizer saved with the model (prompts cannot be encoded)")
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(device or "cpu")
    return model.to(device, torch.bfloat16) if device.type == "cuda" else model.to(device)
