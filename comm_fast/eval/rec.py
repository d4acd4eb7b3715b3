"""Referring expression comprehension: the model answers a box for a phrase; Acc@0.5 (IoU >= 0.5),
mean IoU (a failure counts 0) and the parse-failure rate.

Annotations: Shikra's REC JSON Lines (``img_path``, ``expression``, ``bbox`` = [x0, y0, x1, y1] in
pixels, ``height``, ``width``), or LLaVA conversation records whose first answer is a box (the
question asked as it is written, in the model's own template). Pixel boxes are normalised to the
image padded to a square (expand2square), the frame LLaVA-1.5 and Shikra train boxes in. Answers
are read as Prismatic's scorer reads them (``parse_box``).
"""
from __future__ import annotations

from comm_fast.data.boxes import REC_PROMPT, box_from_square, box_iou, box_to_square, parse_box, parse_boxes
from comm_fast.eval.records import Item, field, image_path, split_of, where

NAME = "rec"
DEFAULT_PROMPT = REC_PROMPT
MAX_NEW_TOKENS = 48  # "[0.123,0.456,0.789,0.987]" is 25 bytes, fewer tokens with a BPE tokenizer
SHIKRA = "img_path, expression, bbox [x0, y0, x1, y1] in pixels, height and width"
THRESHOLD = 0.5


def load(records: list[dict], path: str, image_folder: str | None, prompt: str | None):
    """(items, counts): the records' questions; how many are conversation records asked in their own words
    (the prompt template is not used for them), and how many conversation records had no box answer."""
    items, without_box, own = [], 0, 0
    for i, rec in enumerate(records):
        at = where(path, i, rec)
        if "conversations" in rec:
            item = _conversation(rec, at, path, image_folder, i)
            without_box += item is None
            own += item is not None
        else:
            item = _shikra(rec, at, path, image_folder, prompt or DEFAULT_PROMPT, i)
        if item is not None:
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no record has a box to find (expected records with {SHIKRA}, or conversations "
                         "whose first answer is a box)")
    return items, {"records_in_own_words": own, "records_without_box": without_box}


def _shikra(rec, at, path, image_folder, prompt, i) -> Item:
    expected = f"a REC record ({SHIKRA}) or a 'conversations' list"
    img = field(rec, "img_path", str, at, expected)
    expression = field(rec, "expression", str, at, "a string")
    bbox = field(rec, "bbox", list, at, "[x0, y0, x1, y1] in pixels")
    width = field(rec, "width", (int, float), at, "the image width in pixels")
    height = field(rec, "height", (int, float), at, "the image height in pixels")
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise ValueError(f"{at}: field 'bbox': expected [x0, y0, x1, y1] in pixels, got {bbox!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"{at}: fields 'width', 'height': expected a positive image size, got {width} x {height}")
    x0, y0, x1, y1 = bbox
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"{at}: field 'bbox' {bbox} lies outside its {width} x {height} image (expected "
                         "0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height)")
    return Item(id=rec.get("id", f"{split_of(rec, path)}/{i}"), split=split_of(rec, path),
                image=image_path(image_folder, path, img), prompt=prompt.format(expression=expression),
                target=list(box_to_square(bbox, width, height)), size=(width, height))


def _conversation(rec, at, path, image_folder, i) -> Item | None:
    turns = field(rec, "conversations", list, at, "a list of turns")
    if len(turns) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
        raise ValueError(f"{at}: field 'conversations': expected a question and its answer (objects with a string "
                         "'value')")
    answer = turns[1]["value"].strip()
    box = parse_box(answer)
    if box is None:
        if len(parse_boxes(answer)) == 1 and answer.startswith("[") and answer.endswith("]"):
            raise ValueError(f"{at}: the answer's box {answer} lies outside its image (expected four numbers in "
                             "[0, 1] with x0 < x1 and y0 < y1)")
        return None  # a caption or another question: not a REC record
    img = field(rec, "image", str, at, "the image path")
    return Item(id=rec.get("id", f"{split_of(rec, path)}/{i}"), split=split_of(rec, path),
                image=image_path(image_folder, path, img), prompt=turns[0]["value"], target=list(box))


def score(row: dict) -> None:
    """Parse and score one prediction row in place: ``parsed`` (the box or None), ``iou``, ``score``."""
    box = parse_box(row["answer"])
    row["parsed"] = None if box is None else list(box)
    row["iou"] = 0.0 if box is None else box_iou(box, row["target"])
    row["score"] = float(row["iou"] >= THRESHOLD)
    if box is not None and row.get("size"):
        row["box_pixels"] = [round(v, 2) for v in box_from_square(box, *row["size"])]


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    return {"n": n, "acc@0.5": sum(r["score"] for r in rows) / n, "mean_iou": sum(r["iou"] for r in rows) / n,
            "parse_failure_rate": sum(r["parsed"] is None for r in rows) / n}
