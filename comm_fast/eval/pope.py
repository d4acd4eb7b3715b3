"""POPE (object hallucination): yes/no questions "Is there a <object> in the image?".

Annotations: LLaVA's POPE files, JSON Lines of ``question_id``, ``image``, ``text``, ``label``
("yes"/"no"); the split (random / popular / adversarial) from a ``category`` or ``split`` field, else
from the file name (coco_pope_adversarial.json). Two rules turn an answer into yes/no:

- ``llava`` (LLaVA's eval_pope.py): the text before the first ".", commas removed, split on spaces;
  "no" if a word is "No", "no" or "not", else "yes".
- ``prismatic`` (Prismatic's POPE scorer): the probabilities of the first generated token being the
  first token of "Yes" or of "No"; "yes" when p(Yes) >= p(No).

Per split: accuracy, precision, recall, F1 (positive class "yes") and the ratio of "yes" answers.
"""
from __future__ import annotations

from comm_fast.eval.records import SHORT_ANSWER, Item, field, image_path, split_of, where, with_suffix

NAME = "pope"
DEFAULT_PROMPT = SHORT_ANSWER
MAX_NEW_TOKENS = 16
RULES = ("llava", "prismatic")
SPLITS = ("random", "popular", "adversarial")


def load(records: list[dict], path: str, image_folder: str | None, prompt: str | None):
    items = []
    for i, rec in enumerate(records):
        at = where(path, i, rec, "question_id")
        expected = "a POPE record (question_id, image, text, label)"
        qid = field(rec, "question_id", (int, str), at, expected)
        img = field(rec, "image", str, at, "the image file name")
        text = field(rec, "text", str, at, "the question")
        label = field(rec, "label", str, at, '"yes" or "no"').strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{at}: field 'label': expected \"yes\" or \"no\", got {rec['label']!r}")
        items.append(Item(id=qid, split=split_of(rec, path, ("category", "split"), SPLITS),
                          image=image_path(image_folder, path, img), prompt=with_suffix(text, prompt or DEFAULT_PROMPT),
                          target=label))
    return items, {}


def llava_yes_no(text: str) -> str:
    """LLaVA's eval_pope rule (module docstring)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def score(row: dict, rule: str = "llava") -> None:
    """``parsed`` ("yes"/"no") and ``score`` (1 when it is the label) of one row, in place."""
    if rule == "llava":
        row["parsed"] = llava_yes_no(row["answer"])
    elif rule == "prismatic":
        if row.get("p_yes") is None:
            raise ValueError(f"prediction {row['id']!r}: the prismatic rule needs 'p_yes' (the first token's "
                             "probabilities), which these predictions lack: generate them with --pope-rule prismatic")
        row["parsed"] = "yes" if row["p_yes"] >= 0.5 else "no"
    else:
        raise ValueError(f"--pope-rule: expected one of {RULES}, got {rule!r}")
    row["score"] = float(row["parsed"] == row["target"])


def summarize(rows: list[dict]) -> dict:
    tp = sum(r["parsed"] == "yes" and r["target"] == "yes" for r in rows)
    fp = sum(r["parsed"] == "yes" and r["target"] == "no" for r in rows)
    tn = sum(r["parsed"] == "no" and r["target"] == "no" for r in rows)
    fn = sum(r["parsed"] == "no" and r["target"] == "yes" for r in rows)
    n = len(rows)
    # LLaVA's script divides by zero when nothing is answered "yes" (or no label is "yes"): 0 here
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
