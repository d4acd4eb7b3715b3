"""A synthetic grounding and captioning set: coloured shapes on textured backgrounds.

``comm-fast make-data synthetic --n N --out DIR`` writes

    DIR/images/000000.png ...   square RGB images
    DIR/pretrain.json           captions (LLaVA format), for the pretrain stage
    DIR/finetune.json           a mix of lengths, as in LLaVA's instruction data: one-line captions, short
                                VQA-style answers, detailed grounded descriptions, and grounding dialogues of
                                one to five or six exchanges (Shikra-style boxes, three decimals); with the byte
                                tokenizer and 16 image tokens, samples run from about 220 to 475 tokens

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
DETAIL_QUESTIONS = ("Describe the image in detail, with a box for each object.",
                    "What do you see? Give the boxes of the objects.")
# a finetune record's text stays within this many characters (questions + answers + 20 per exchange, what
# the Vicuna template adds): with the byte tokenizer, its 192-token system prompt and 16 image tokens,
# every sample then fits the tiny preset's 512 tokens, so nothing is truncated
DIALOGUE_CHARS = 310
# exchanges a grounding dialogue has in all, most of them one, a tail up to six (its first one or two come
# from the main stream, see make_records; DIALOGUE_CHARS may end it sooner)
DIALOGUE_EXCHANGES = ((1, 2, 3, 4, 5, 6), (50, 18, 12, 9, 6, 5))


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


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(box, size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "in the centre" if (v, h) == ("middle", "centre") else f"at the {v} {h}" if v != "middle" else f"on the {h}"


def detailed_description(objects, kind: str, size: int, limit: int = DIALOGUE_CHARS) -> str:
    """A grounded description (Flickr30k-Entities / Shikra style): every object with its box, its place
    and a relation, the least needed parts left out to stay within ``limit`` characters."""
    from comm_fast.data.conversation import format_box

    def text(where: bool, relation: bool) -> str:
        parts = [f"{_a(c)} {c} {s} {format_box(b, size, size)}" + (f" {_where(b, size)}" if where else "")
                 for c, s, b in objects]
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        out = f"The image shows {listed}, on {BACKGROUNDS[kind]} background."
        if relation and len(objects) > 1:
            (c1, s1, b1), (c2, s2, b2) = objects[:2]
            side = "left" if b1[0] + b1[2] < b2[0] + b2[2] else "right"
            out += f" The {c1} {s1} is to the {side} of the {c2} {s2}."
        return out

    options = [text(True, True), text(True, False), text(False, False)]
    return next((t for t in options if len(t) <= limit), options[-1])


def _exchange(objects, size: int, rng: random.Random) -> tuple[str, str]:
    """One more (question, answer) about the image: grounding, referring, colour, count, presence, relation."""
    from comm_fast.data.conversation import format_box

    colour, shape, box = rng.choice(objects)
    kinds = ("box", "region", "colour", "count", "presence", "relation" if len(objects) > 1 else "box")
    kind = rng.choice(kinds)
    if kind == "box":
        return rng.choice(GROUNDING_QUESTIONS).format(f"{colour} {shape}"), format_box(box, size, size)
    if kind == "region":
        return f"What is at {format_box(box, size, size)}?", f"{_a(colour).capitalize()} {colour} {shape}."
    if kind == "colour":
        return f"What colour is the {shape} at {format_box(box, size, size)}?", f"{colour.capitalize()}."
    if kind == "count":
        n = len(objects)
        return "How many shapes are there?", ("One." if n == 1 else f"{('Two', 'Three')[n - 2]}.")
    if kind == "presence":
        c2, s2 = rng.choice([(c, s) for c in COLORS for s in SHAPES])
        there = any((c, s) == (c2, s2) for c, s, _ in objects)
        if not there:
            return f"Is there {_a(c2)} {c2} {s2}?", "No."
        b2 = next(b for c, s, b in objects if (c, s) == (c2, s2))
        return f"Is there {_a(c2)} {c2} {s2}?", f"Yes, at {format_box(b2, size, size)}."
    c2, s2, b2 = rng.choice([o for o in objects if o[2] != box])
    left = box[0] + box[2] < b2[0] + b2[2]
    return (f"Is the {colour} {shape} to the left of the {c2} {s2}?",
            f"{'Yes' if left else 'No'}, it is to the {'left' if left else 'right'} of it.")


def _chars(conv) -> int:
    return sum(len(t["value"]) + 10 for t in conv)


def make_records(index: int, image: str, objects, kind: str, size: int, rng: random.Random,
                 mix: random.Random | None = None):
    """(caption record, finetune record) for one image.

    ``rng`` draws the caption, and the finetune record's first exchange (a caption in a quarter of the
    records, else a box question, with a "what is at this box?" follow-up half the time). ``mix``, a
    second stream, draws the rest of the finetune mix: a caption record becomes a short caption, a few
    short VQA-style answers or a detailed grounded description; a grounding dialogue gets up to 6
    exchanges in all (DIALOGUE_EXCHANGES, within DIALOGUE_CHARS). Without ``mix`` the records are
    the first exchanges only.
    """
    from comm_fast.data.conversation import format_box

    cap = caption(objects, kind)
    pre = {"id": f"synthetic-{index:06d}-cap", "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_QUESTIONS)}, {"from": "gpt", "value": cap}]}
    grounding = rng.random() >= 0.25
    if not grounding:
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
    if mix is not None:
        conv = list(conv)
        if not grounding:  # captions: short (as drawn), short answers (VQA-style), or long and grounded
            style = mix.choices(("caption", "vqa", "detail"), (0.4, 0.3, 0.3))[0]
            if style == "detail":
                question = "<image>\n" + mix.choice(DETAIL_QUESTIONS)
                conv = [{"from": "human", "value": question},
                        {"from": "gpt", "value": detailed_description(objects, kind, size,
                                                                      DIALOGUE_CHARS - len(question) - 20)}]
            elif style == "vqa":
                conv = []
                for _ in range(mix.randint(1, 4)):
                    q, a = _exchange(objects, size, mix)
                    if conv and _chars(conv) + len(q) + len(a) + 20 > DIALOGUE_CHARS:
                        break
                    conv += [{"from": "human", "value": ("" if conv else "<image>\n") + q}, {"from": "gpt", "value": a}]
        else:
            want = mix.choices(*DIALOGUE_EXCHANGES)[0]
            while len(conv) // 2 < want:
                q, a = _exchange(objects, size, mix)
                if _chars(conv) + len(q) + len(a) + 20 > DIALOGUE_CHARS:
                    break
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
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
        mix = random.Random(f"finetune-mix-{seed}")  # a second stream: see make_records
        pretrain, finetune = [], []
        for i in range(n):
            img, objects, kind = draw_image(rng, nrng, size)
            name = f"images/{i:06d}.png"
            img.save(os.path.join(tmp, name))
            pre, fin = make_records(i, name, objects, kind, size, rng, mix)
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
    from comm_fast.cli import positive_int

    parser.add_argument("kind", choices=["synthetic"], help="which set to write")
    parser.add_argument("--n", type=positive_int, default=2000, help="number of images")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=positive_int, default=128, help="image side in pixels")


def run(args) -> int:
    try:
        out = make_synthetic(args.out, args.n, args.seed, args.size)
    except (ValueError, FileExistsError) as exc:
        print(f"comm-fast make-data: error: {exc}")
        return 2
    print(f"wrote {args.n} images, pretrain.json and finetune.json to {out}")
    return 0
