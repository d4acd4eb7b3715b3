"""A synthetic grounding and captioning set: coloured shapes on textured backgrounds.

``comm-fast make-data synthetic --n N --out DIR`` writes

    DIR/images/000000.png ...   square RGB images
    DIR/pretrain.json           captions (LLaVA format), for the pretrain stage
    DIR/finetune.json           box questions (Shikra-style answers, three decimals), follow-ups and captions

Everything is drawn from one seed, so the same command always writes the same set.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"stripes": "a striped", "checkers": "a checkered", "noise": "a noisy", "gradient": "a gradient"}
GROUNDING_QUESTIONS = ("Where is the {}? Answer with a box.", "Give the bounding box of the {}.",
                       "Locate the {} in the image.")
CAPTION_QUESTIONS = ("Describe the image briefly.", "What is in this picture?", "Write a short caption.")


def _background(rng: random.Random, nrng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    kind = rng.choice(sorted(BACKGROUNDS))
    c1, c2 = (np.array([rng.randint(90, 200) for _ in range(3)], dtype=np.float32) for _ in range(2))
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "stripes":
        period = rng.randint(6, 16)
        t = ((xx + yy if rng.random() < 0.5 else xx) // period % 2)[..., None]
    elif kind == "checkers":
        period = rng.randint(8, 20)
        t = ((xx // period + yy // period) % 2)[..., None]
    elif kind == "gradient":
        t = (xx / (size - 1))[..., None]
    else:
        t = nrng.random((size, size, 1))
    img = c1 * (1 - t) + c2 * t + nrng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), kind


def _overlaps(box, boxes, margin=2):
    return any(not (box[2] + margin <= b[0] or b[2] + margin <= box[0] or box[3] + margin <= b[1]
                    or b[3] + margin <= box[1]) for b in boxes)


def draw_image(rng: random.Random, nrng: np.random.Generator, size: int = 128):
    """(PIL image, [(colour, shape, (x0, y0, x1, y1))], background kind)."""
    from PIL import Image, ImageDraw

    pixels, kind = _background(rng, nrng, size)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    objects, boxes = [], []
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(1, 3))
    for colour, shape in pairs:
        for _ in range(20):  # place without overlap
            w = rng.randint(size // 6, size // 2.5)
            x0, y0 = rng.randint(0, size - w), rng.randint(0, size - w)
            box = (x0, y0, x0 + w, y0 + w)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        fill = COLORS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + w / 2, y0), (x0 + w, y0 + w), (x0, y0 + w)], fill=fill)
        boxes.append(box)
        objects.append((colour, shape, box))
    return img, objects, kind


def caption(objects, kind: str) -> str:
    names = [f"a {c} {s}" for c, s, _ in objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed[0].upper()}{listed[1:]} on {BACKGROUNDS[kind]} background."


def make_records(index: int, image: str, objects, kind: str, size: int, rng: random.Random):
    """(caption record, finetune record) for one image."""
    from comm_fast.data.conversation import format_box

    cap = caption(objects, kind)
    pre = {"id": f"synthetic-{index:06d}-cap", "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_QUESTIONS)}, {"from": "gpt", "value": cap}]}
    if rng.random() < 0.25:
        conv = pre["conversations"]
    else:
        colour, shape, box = rng.choice(objects)
        conv = [{"from": "human", "value": "<image>\n" + rng.choice(GROUNDING_QUESTIONS).format(f"{colour} {shape}")},
                {"from": "gpt", "value": format_box(box, size, size)}]
        others = [o for o in objects if o[2] != box]
        if others and rng.random() < 0.5:  # a follow-up turn: what is at this box?
            c2, s2, b2 = rng.choice(others)
            conv += [{"from": "human", "value": f"What is at {format_box(b2, size, size)}?"},
                     {"from": "gpt", "value": f"A {c2} {s2}."}]
    fin = {"id": f"synthetic-{index:06d}", "image": image, "conversations": conv}
    return pre, fin


def make_synthetic(out: str, n: int, seed: int = 0, size: int = 128) -> str:
    """Write the set to ``out`` (through a temporary directory renamed into place); returns ``out``."""
    if n <= 0:
        raise ValueError(f"--n: expected a positive number of images, got {n}")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out: {out} exists and is not empty; choose a new directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-data-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        rng, nrng = random.Random(seed), np.random.default_rng(seed)
        pretrain, finetune = [], []
        for i in range(n):
            img, objects, kind = draw_image(rng, nrng, size)
            name = f"images/{i:06d}.png"
            img.save(os.path.join(tmp, name))
            pre, fin = make_records(i, name, objects, kind, size, rng)
            pretrain.append(pre)
            finetune.append(fin)
        for fname, records in (("pretrain.json", pretrain), ("finetune.json", finetune)):
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
        if os.path.exists(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- CLI: comm-fast make-data synthetic --n N --out DIR ----------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("kind", choices=["synthetic"], help="which set to write")
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")


def run(args) -> int:
    try:
        out = make_synthetic(args.out, args.n, args.seed, args.size)
    except (ValueError, FileExistsError) as exc:
        print(f"comm-fast make-data: error: {exc}")
        return 2
    print(f"wrote {args.n} images, pretrain.json and finetune.json to {out}")
    return 0
