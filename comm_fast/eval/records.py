"""Annotation files: JSON lists or JSON Lines of records, read with errors that name the file, the
record and the field."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

# LLaVA-1.5's instruction for short answers (VQAv2, GQA, POPE, ...)
SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."


@dataclasses.dataclass
class Item:
    """One question to ask: ``prompt`` about ``image``; ``target`` is what its scorer compares with."""
    id: Any
    split: str
    image: str
    prompt: str
    target: Any
    size: tuple[int, int] | None = None  # (width, height) the annotation states, checked against the image


def read_records(path: str) -> list[dict]:
    """The records of a JSON list (``[{...}, ...]``) or JSON Lines file (one object per line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt JSON ({exc})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {n}: corrupt JSON Lines record ({exc})") from None
    if not records:
        raise ValueError(f"{path}: no records (expected a JSON list or JSON Lines of objects)")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i}: expected a JSON object, got {type(rec).__name__}")
    return records


def where(path: str, i: int, rec: dict, id_field: str = "id") -> str:
    """How an error names a record: the file, its position and its id when it has one."""
    ident = rec.get(id_field, rec.get("id"))
    return f"{path}: record {i}" + (f" (id {ident!r})" if ident is not None else "")


def field(rec: dict, name: str, kind, at: str, expected: str):
    """``rec[name]``, which must be a ``kind``; else a ValueError naming the record and the field."""
    if name not in rec:
        raise ValueError(f"{at}: field {name!r} missing (expected {expected})")
    value = rec[name]
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is no number (nor string)
        raise ValueError(f"{at}: field {name!r}: expected {expected}, got {value!r}")
    return value


def split_of(rec: dict, path: str, fields=("split",), names=()) -> str:
    """A record's split: its first present field of ``fields``, else a name of ``names`` found in the
    file name, else the file name without its extension."""
    for f in fields:
        if isinstance(rec.get(f), str) and rec[f]:
            return rec[f]
    stem = os.path.splitext(os.path.basename(path))[0]
    for name in names:
        if re.search(rf"(^|[^a-z]){name}([^a-z]|$)", stem.lower()):
            return name
    return stem


def image_path(image_folder: str | None, path: str, name: str) -> str:
    """An image named in an annotation file: relative to ``image_folder``, else to the file's folder."""
    return os.path.join(image_folder or os.path.dirname(os.path.abspath(path)), name)


def with_suffix(question: str, template: str) -> str:
    """``template`` filled with the question, unless the question already carries the template's
    text after ``{question}`` (LLaVA's question files include the short-answer instruction)."""
    tail = template.split("{question}", 1)[-1].strip()
    if tail and question.rstrip().endswith(tail):
        return question
    return template.format(question=question)
