"""A synthetic grounding and captioning set: coloured shapes on textured backgrounds.

``comm-fast make-data synthetic --n N --out DIR [--split train|val] [--mix llava|rec] [--texture F]`` writes

    DIR/images/000000.png ...   RGB images, half of them square, the rest of width:height 3:4 to 16:9
    DIR/rec.jsonl               one referring expression per object (Shikra's REC JSON Lines: img_path,
                                expression, bbox in pixels, width, height, split), what ``comm-fast eval
                                --task rec`` reads
    DIR/pretrain.json           (train) captions (LLaVA format), for the pretrain stage
    DIR/finetune.json           (train) with ``--mix llava``, a mix of lengths as in LLaVA's instruction data:
                                one-line captions, short VQA-style answers, detailed grounded descriptions, and
                                grounding dialogues of one to five or six exchanges; with the byte tokenizer and
                                16 image tokens, samples run from about 220 to 475 tokens. With ``--mix rec``,
                                grounding only: every record asks for the box of each object of its image

Boxes in text are Shikra's (three decimals, or ``--box-decimals``) and, like the REC boxes' normalisation
in evaluation, refer to the image padded to a square (comm_fast.data.boxes). Everything is drawn from the
seed and the split (the val split from other streams than train's, so its images are other images), so the
same command always writes the same set.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile

import numpy as np

from comm_fast.data.boxes import DECIMALS, REC_PROMPT, box_to_square, format_box

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"stripes": "a striped", "checkers": "a checkered", "noise": "a noisy", "gradient": "a gradient"}
GROUNDING_QUESTIONS = ("Where is the {}? Answer with a box.", "Give the bounding box of the {}.",
                       "Locate the {} in the image.", REC_PROMPT.format(expression="the {}"))
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
NONSQUARE = 0.5                 # the fraction of images that are not square
TEXTURE = 1.0                   # the backgrounds' contrast (1: the set as it was always drawn)
RATIOS = (3 / 4, 16 / 9)        # their width / height, log-uniform in this range
SPLITS = ("train", "val")
MIXES = ("llava", "rec")


def _background(rng: random.Random, nrng: np.random.Generator, width: int, height: int,
                texture: float = TEXTURE) -> tuple[np.ndarray, str]:
    """A background of one of the BACKGROUNDS kinds between two random colours; ``texture`` scales its
    contrast (the second colour's distance from the first, and the pixel noise) and draws nothing else."""
    kind = rng.choice(sorted(BACKGROUNDS))
    c1, c2 = (np.array([rng.randint(90, 200) for _ in range(3)], dtype=np.float32) for _ in range(2))
    c2 = c1 + np.float32(texture) * (c2 - c1)
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "stripes":
        period = rng.randint(6, 16)
        t = ((xx + yy if rng.random() < 0.5 else xx) // period % 2)[..., None]
    elif kind == "checkers":
        period = rng.randint(8, 20)
        t = ((xx // period + yy // period) % 2)[..., None]
    elif kind == "gradient":
        t = (xx / (width - 1))[..., None]
    else:
        t = nrng.random((height, width, 1))
    img = c1 * (1 - t) + c2 * t + texture * nrng.normal(0, 8, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8), kind


def _overlaps(box, boxes, margin=2):
    return any(not (box[2] + margin <= b[0] or b[2] + margin <= box[0] or box[3] + margin <= b[1]
                    or b[3] + margin <= box[1]) for b in boxes)


def image_size(rng: random.Random, size: int, nonsquare: float = NONSQUARE) -> tuple[int, int]:
    """(width, height): square ``size`` x ``size``, or with probability ``nonsquare`` the longer side
    ``size`` and width / height drawn from RATIOS."""
    if rng.random() >= nonsquare:
        return size, size
    ratio = math.exp(rng.uniform(*(math.log(r) for r in RATIOS)))
    return (size, max(1, round(size / ratio))) if ratio >= 1 else (max(1, round(size * ratio)), size)


def draw_image(rng: random.Random, nrng: np.random.Generator, frame: tuple[int, int] = (128, 128),
               max_objects: int = 3, texture: float = TEXTURE):
    """(PIL image of ``frame`` = (width, height), [(colour, shape, (x0, y0, x1, y1))] with pixel boxes,
    background kind). One to ``max_objects`` objects, each 1/6 to 1/2.5 of the shorter side; ``texture``:
    the background's contrast (1: as always drawn)."""
    from PIL import Image, ImageDraw

    width, height = frame
    short = min(width, height)
    pixels, kind = _background(rng, nrng, width, height, texture)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    objects, boxes = [], []
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(1, max_objects))
    for colour, shape in pairs:
        for _ in range(20):  # place without overlap
            w = rng.randint(short // 6, int(short // 2.5))
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - w)
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


def _where(box, frame) -> str:
    x0, y0, x1, y1 = box_to_square(box, *frame)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "in the centre" if (v, h) == ("middle", "centre") else f"at the {v} {h}" if v != "middle" else f"on the {h}"


def detailed_description(objects, kind: str, frame, limit: int = DIALOGUE_CHARS, decimals: int = DECIMALS) -> str:
    """A grounded description (Flickr30k-Entities / Shikra style): every object with its box, its place
    and a relation, the least needed parts left out to stay within ``limit`` characters. ``frame``: the
    image's (width, height)."""
    def text(where: bool, relation: bool) -> str:
        parts = [f"{_a(c)} {c} {s} {format_box(b, *frame, decimals)}" + (f" {_where(b, frame)}" if where else "")
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


def _exchange(objects, frame, rng: random.Random, decimals: int = DECIMALS) -> tuple[str, str]:
    """One more (question, answer) about the image: grounding, referring, colour, count, presence, relation."""
    colour, shape, box = rng.choice(objects)
    kinds = ("box", "region", "colour", "count", "presence", "relation" if len(objects) > 1 else "box")
    kind = rng.choice(kinds)
    if kind == "box":
        return rng.choice(GROUNDING_QUESTIONS).format(f"{colour} {shape}"), format_box(box, *frame, decimals)
    if kind == "region":
        return f"What is at {format_box(box, *frame, decimals)}?", f"{_a(colour).capitalize()} {colour} {shape}."
    if kind == "colour":
        return f"What colour is the {shape} at {format_box(box, *frame, decimals)}?", f"{colour.capitalize()}."
    if kind == "count":
        n = len(objects)
        return "How many shapes are there?", ("One." if n == 1 else f"{('Two', 'Three')[n - 2]}.")
    if kind == "presence":
        c2, s2 = rng.choice([(c, s) for c in COLORS for s in SHAPES])
        there = any((c, s) == (c2, s2) for c, s, _ in objects)
        if not there:
            return f"Is there {_a(c2)} {c2} {s2}?", "No."
        b2 = next(b for c, s, b in objects if (c, s) == (c2, s2))
        return f"Is there {_a(c2)} {c2} {s2}?", f"Yes, at {format_box(b2, *frame, decimals)}."
    c2, s2, b2 = rng.choice([o for o in objects if o[2] != box])
    left = box[0] + box[2] < b2[0] + b2[2]
    return (f"Is the {colour} {shape} to the left of the {c2} {s2}?",
            f"{'Yes' if left else 'No'}, it is to the {'left' if left else 'right'} of it.")


def _chars(conv) -> int:
    return sum(len(t["value"]) + 10 for t in conv)


def make_records(index: int, image: str, objects, kind: str, frame, rng: random.Random,
                 mix: random.Random | None = None, decimals: int = DECIMALS):
    """(caption record, finetune record) for one image.

    ``rng`` draws the caption, and the finetune record's first exchange (a caption in a quarter of the
    records, else a box question, with a "what is at this box?" follow-up half the time). ``mix``, a
    second stream, draws the rest of the finetune mix: a caption record becomes a short caption, a few
    short VQA-style answers or a detailed grounded description; a grounding dialogue gets up to 6
    exchanges in all (DIALOGUE_EXCHANGES, within DIALOGUE_CHARS). Without ``mix`` the records are
    the first exchanges only. ``frame``: the image's (width, height).
    """
    cap = caption(objects, kind)
    pre = {"id": f"synthetic-{index:06d}-cap", "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_QUESTIONS)}, {"from": "gpt", "value": cap}]}
    grounding = rng.random() >= 0.25
    if not grounding:
        conv = pre["conversations"]
    else:
        colour, shape, box = rng.choice(objects)
        conv = [{"from": "human", "value": "<image>\n" + rng.choice(GROUNDING_QUESTIONS).format(f"{colour} {shape}")},
                {"from": "gpt", "value": format_box(box, *frame, decimals)}]
        others = [o for o in objects if o[2] != box]
        if others and rng.random() < 0.5:  # a follow-up turn: what is at this box?
            c2, s2, b2 = rng.choice(others)
            conv += [{"from": "human", "value": f"What is at {format_box(b2, *frame, decimals)}?"},
                     {"from": "gpt", "value": f"{_a(c2).capitalize()} {c2} {s2}."}]
    if mix is not None:
        conv = list(conv)
        if not grounding:  # captions: short (as drawn), short answers (VQA-style), or long and grounded
            style = mix.choices(("caption", "vqa", "detail"), (0.4, 0.3, 0.3))[0]
            if style == "detail":
                question = "<image>\n" + mix.choice(DETAIL_QUESTIONS)
                conv = [{"from": "human", "value": question},
                        {"from": "gpt", "value": detailed_description(objects, kind, frame,
                                                                      DIALOGUE_CHARS - len(question) - 20, decimals)}]
            elif style == "vqa":
                conv = []
                for _ in range(mix.randint(1, 4)):
                    q, a = _exchange(objects, frame, mix, decimals)
                    if conv and _chars(conv) + len(q) + len(a) + 20 > DIALOGUE_CHARS:
                        break
                    conv += [{"from": "human", "value": ("" if conv else "<image>\n") + q}, {"from": "gpt", "value": a}]
        else:
            want = mix.choices(*DIALOGUE_EXCHANGES)[0]
            while len(conv) // 2 < want:
                q, a = _exchange(objects, frame, mix, decimals)
                if _chars(conv) + len(q) + len(a) + 20 > DIALOGUE_CHARS:
                    break
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    fin = {"id": f"synthetic-{index:06d}", "image": image, "conversations": conv}
    return pre, fin


def rec_records(index: int, image: str, objects, frame, split: str) -> list[dict]:
    """Shikra's REC records of one image: each object's phrase and pixel box."""
    width, height = frame
    return [{"id": f"synthetic-{split}-{index:06d}-{k}", "img_path": image, "expression": f"the {c} {s}",
             "bbox": list(box), "width": width, "height": height, "split": split}
            for k, (c, s, box) in enumerate(objects)]


def rec_dialogue(index: int, image: str, objects, frame, mix: random.Random, decimals: int = DECIMALS) -> dict:
    """A grounding-only finetune record: the box of each object of the image, in a random order."""
    conv = []
    for c, s, box in mix.sample(objects, len(objects)):
        question = mix.choice(GROUNDING_QUESTIONS).format(f"{c} {s}")
        conv += [{"from": "human", "value": ("" if conv else "<image>\n") + question},
                 {"from": "gpt", "value": format_box(box, *frame, decimals)}]
    return {"id": f"synthetic-{index:06d}", "image": image, "conversations": conv}


def _streams(seed: int, split: str):
    """(rng, nrng, mix) of a split: train's are those of ``seed`` itself (the set as it always was), the
    other splits' are seeded by their name as well, so they draw other images."""
    if split == "train":
        return random.Random(seed), np.random.default_rng(seed), random.Random(f"finetune-mix-{seed}")
    tag = SPLITS.index(split)
    return (random.Random(f"{split}-{seed}"), np.random.default_rng([seed, tag]),
            random.Random(f"finetune-mix-{split}-{seed}"))


def make_synthetic(out: str, n: int, seed: int = 0, size: int = 128, split: str = "train", mix: str = "llava",
                   nonsquare: float = NONSQUARE, max_objects: int = 3, box_decimals: int = DECIMALS,
                   texture: float = TEXTURE) -> str:
    """Write the set to ``out`` (through a temporary directory renamed into place); returns ``out``.
    ``split`` "val" writes other images than "train" for the same seed, and only their REC records."""
    if n <= 0:
        raise ValueError(f"--n: expected a positive number of images, got {n}")
    if split not in SPLITS:
        raise ValueError(f"--split: expected one of {SPLITS}, got {split!r}")
    if mix not in MIXES:
        raise ValueError(f"--mix: expected one of {MIXES}, got {mix!r}")
    if not 0.0 <= nonsquare <= 1.0:
        raise ValueError(f"--nonsquare: expected a fraction in [0, 1], got {nonsquare}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"--max-objects: expected 1, 2 or 3, got {max_objects}")
    if not 0.0 <= texture <= 1.0:
        raise ValueError(f"--texture: expected a background contrast in [0, 1], got {texture}")
    if not 1 <= box_decimals <= 6:
        raise ValueError(f"--box-decimals: expected 1 to 6 decimals, got {box_decimals}")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out: {out} exists and is not empty; choose a new directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-data-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        rng, nrng, mixer = _streams(seed, split)
        pretrain, finetune, rec = [], [], []
        for i in range(n):
            frame = image_size(rng, size, nonsquare)
            img, objects, kind = draw_image(rng, nrng, frame, max_objects, texture)
            name = f"images/{i:06d}.png"
            img.save(os.path.join(tmp, name))
            llava = mix == "llava"
            pre, fin = make_records(i, name, objects, kind, frame, rng, mixer if llava else None, box_decimals)
            pretrain.append(pre)
            finetune.append(fin if llava else rec_dialogue(i, name, objects, frame, mixer, box_decimals))
            rec += rec_records(i, name, objects, frame, split)
        files = {"rec.jsonl": rec} if split != "train" else {
            "pretrain.json": pretrain, "finetune.json": finetune, "rec.jsonl": rec}
        for fname, records in files.items():
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                if fname.endswith(".jsonl"):
                    f.writelines(json.dumps(r) + "\n" for r in records)
                else:
                    json.dump(records, f, indent=1)
        if os.path.exists(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- CLI: comm-fast make-data synthetic --n N --out DIR [--split S] [--mix M] ------------------------
def add_arguments(parser) -> None:
    from comm_fast.cli import positive_int

    parser.add_argument("kind", choices=["synthetic"], help="which set to write")
    parser.add_argument("--n", type=positive_int, default=2000, help="number of images")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=positive_int, default=128, help="longer image side in pixels")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="train: images, REC records, pretrain.json and finetune.json; val: other images "
                             "(other random streams of the same seed) and their REC records (rec.jsonl) only")
    parser.add_argument("--mix", choices=MIXES, default="llava",
                        help="finetune.json: llava (captions, VQA, grounded descriptions, dialogues) or rec "
                             "(grounding only: the box of every object)")
    parser.add_argument("--nonsquare", type=float, default=NONSQUARE, help="fraction of non-square images")
    parser.add_argument("--max-objects", type=positive_int, default=3, help="objects per image, at most (1-3)")
    parser.add_argument("--box-decimals", type=positive_int, default=DECIMALS,
                        help="decimals of the boxes in the training text (Shikra's 3; evaluation reads any)")
    parser.add_argument("--texture", type=float, default=TEXTURE,
                        help="background contrast, 0-1 (1: the set as always drawn; lower: calmer backgrounds, on "
                             "which random-initialised encoders' tokens single the objects out more)")


def run(args) -> int:
    try:
        out = make_synthetic(args.out, args.n, args.seed, args.size, args.split, args.mix, args.nonsquare,
                             args.max_objects, args.box_decimals, args.texture)
    except (ValueError, FileExistsError) as exc:
        print(f"comm-fast make-data: error: {exc}", file=sys.stderr)
        return 2
    files = "rec.jsonl" if args.split != "train" else "rec.jsonl, pretrain.json and finetune.json"
    print(f"wrote {args.n} {args.split} images, {files} to {out}")
    return 0
