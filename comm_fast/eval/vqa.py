"""VQA accuracy, as the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py) computes it.

An answer is normalised (punctuation, number words to digits, articles dropped, contractions
restored: the official tables below), and scored against the human answers by leave-one-out:
for each of the n answers, min(#matches among the other n - 1 / 3, 1); the score is the mean of
the n. As in the official script, the human answers are normalised only when they disagree; the
prediction is always normalised, as LLaVA normalises its predictions before submitting them. A
question with a single reference answer is scored by exact match of the two normalised strings.

Annotations: a JSON list or JSON Lines of ``question_id``, ``image``, ``question`` (or LLaVA's
``text``) and ``answers``: the human answers, as strings or as VQAv2's ``{"answer": ...}`` objects
(or one ``answer`` string); the split from a ``split`` field, else the file name.
"""
from __future__ import annotations

import re

from comm_fast.eval.records import SHORT_ANSWER, Item, field, image_path, split_of, where, with_suffix

NAME = "vqa"
DEFAULT_PROMPT = SHORT_ANSWER
MAX_NEW_TOKENS = 24

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# the official patterns as written: "(?!<=\d)" is a lookahead (not a lookbehind), so a period is dropped
# unless a digit follows it; "1,000"-style commas switch punctuation to deletion instead of a space
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)  # the official call passes re.UNICODE (32) as the count


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official VQA normalisation of one answer."""
    return _digits_articles(_punctuation(_clean(text)))


def vqa_accuracy(answer: str, references: list[str]) -> float:
    """The VQA score of ``answer`` against the human ``references`` (module docstring)."""
    if not references:
        raise ValueError("references: expected at least one human answer")
    pred = normalize_answer(answer)
    refs = [_clean(r) for r in references]
    if len(refs) == 1:
        return float(pred == normalize_answer(refs[0]))
    if len(set(refs)) > 1:
        refs = [normalize_answer(r) for r in refs]
    per_subset = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(per_subset) / len(per_subset)


def load(records: list[dict], path: str, image_folder: str | None, prompt: str | None):
    items = []
    for i, rec in enumerate(records):
        at = where(path, i, rec, "question_id")
        qid = field(rec, "question_id", (int, str), at, "a VQA record (question_id, image, question, answers)")
        img = field(rec, "image", str, at, "the image file name")
        question = field(rec, "question" if "question" in rec or "text" not in rec else "text", str, at,
                         "the question")
        if "answers" in rec:
            answers = field(rec, "answers", list, at, "the human answers")
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
            if not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{at}: field 'answers': expected a non-empty list of strings or of "
                                 f"{{\"answer\": string}} objects, got {rec['answers']!r}")
        else:
            answers = [field(rec, "answer", str, at, "the reference answer (or an 'answers' list)")]
        items.append(Item(id=qid, split=split_of(rec, path), image=image_path(image_folder, path, img),
                          prompt=with_suffix(question, prompt or DEFAULT_PROMPT), target=answers))
    return items, {}


def score(row: dict) -> None:
    row["parsed"] = normalize_answer(row["answer"])
    row["score"] = vqa_accuracy(row["answer"], row["target"])


def summarize(rows: list[dict]) -> dict:
    return {"n": len(rows), "accuracy": sum(r["score"] for r in rows) / len(rows)}
