"""Boxes in text, one definition for training data and evaluation.

A box is ``(x0, y0, x1, y1)``. In text it is written Shikra's way, ``[x0,y0,x1,y1]`` normalised to
0-1 with three decimals. Normalised boxes refer to the image padded to a square (LLaVA-1.5 and
Shikra's expand2square: the shorter side padded equally on both sides), so that a box means the
same place whatever the image's aspect ratio.
"""
from __future__ import annotations

import ast
import re

Box = tuple[float, float, float, float]


# LLaVA-1.5's REC instruction (Prismatic's evaluation quotes the sentence: '... describes: "{expression}"')
REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}"
DECIMALS = 3


def format_box(box, width: float = 1.0, height: float = 1.0, decimals: int = DECIMALS) -> str:
    """Shikra style: [x0,y0,x1,y1], a pixel box of a ``width`` x ``height`` image normalised to 0-1 in
    that image padded to a square (box_to_square), ``decimals`` decimals (an already normalised box:
    the default 1 x 1)."""
    if not isinstance(decimals, int) or isinstance(decimals, bool) or decimals <= 0:
        raise ValueError(f"decimals: expected a positive int, got {decimals!r}")
    vals = box_to_square(box, width, height)
    return "[" + ",".join(f"{min(max(v, 0.0), 1.0):.{decimals}f}" for v in vals) + "]"


_BOX = re.compile(r"\[\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*\]")


def parse_boxes(text: str) -> list[Box]:
    """Every ``[a,b,c,d]`` of four numbers in ``text``, in order (lenient: for reading training text)."""
    return [tuple(float(v) for v in m.groups()) for m in _BOX.finditer(text)]


def parse_box(text: str) -> Box | None:
    """The answer read as one normalised box, Prismatic's REC rule: the whole (stripped) answer is a
    list literal of four numbers in [0, 1] with x0 < x1 and y0 < y1; anything else is None (a failure)."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, list) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    x0, y0, x1, y1 = (float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or not (x0 < x1 and y0 < y1):
        return None
    return x0, y0, x1, y1


def square_frame(width: float, height: float) -> tuple[float, float, float]:
    """(side, dx, dy): expand2square pastes a width x height image at (dx, dy) of a side x side
    square, the offsets rounded down as PIL's paste position is."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def box_to_square(box, width: float, height: float) -> Box:
    """A pixel box of a width x height image, normalised to 0-1 in the image padded to a square."""
    side, dx, dy = square_frame(width, height)
    x0, y0, x1, y1 = box
    return (x0 + dx) / side, (y0 + dy) / side, (x1 + dx) / side, (y1 + dy) / side


def box_from_square(box, width: float, height: float) -> Box:
    """The inverse of box_to_square: a normalised box of the padded square, in the image's pixels."""
    side, dx, dy = square_frame(width, height)
    x0, y0, x1, y1 = box
    return x0 * side - dx, y0 * side - dy, x1 * side - dx, y1 * side - dy


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when they do not overlap)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
