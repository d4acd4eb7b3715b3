"""The scorers against hand-computed cases (figures worked out in the comments), the padded-square box
geometry against a PIL composition, the annotation loaders, and rescoring saved predictions."""
import json

import numpy as np
import pytest

from comm_fast.data.boxes import box_from_square, box_iou, box_to_square, format_box, parse_box, square_frame
from comm_fast.eval import pope, rec, vqa
from comm_fast.eval.run import rescore, score_rows, shard, unshard


# -- boxes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, box", [
    ("[0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
    (" [0,0,1,1]\n", (0.0, 0.0, 1.0, 1.0)),               # ints and the edges are in [0, 1]
    ("[0.1, 0.2, 0.3]", None),                            # three numbers
    ("[0.1, 0.2, 0.3, 0.4, 0.5]", None),                  # five numbers
    ("[0.1, 0.2, 0.3, 1.2]", None),                       # outside [0, 1]
    ("[0.3, 0.2, 0.1, 0.4]", None),                       # x0 > x1
    ("[0.1, 0.4, 0.3, 0.4]", None),                       # y0 == y1
    ("[0.3, 0.2, 0.3, 0.4]", None),                       # x0 == x1
    ("(0.1, 0.2, 0.3, 0.4)", None),                       # a tuple, not a list
    ("The box is [0.1, 0.2, 0.3, 0.4].", None),           # the whole answer must be the list
    ("[0.1, 0.2, True, 0.4]", None),                      # a bool is no number
    ("[true, 0.2, 0.3, 0.4]", None), ("['a', 0.2, 0.3, 0.4]", None), ("", None), ("[[0.1], 0.2, 0.3, 0.4]", None),
])
def test_parse_box_is_prismatics_rule(text, box):
    assert parse_box(text) == box


def test_padded_square_geometry_by_hand():
    # 640 x 480: side 640, the 160 rows of padding split 80 / 80 -> (x, y + 80) / 640
    assert square_frame(640, 480) == (640, 0, 80)
    assert box_to_square((100, 40, 300, 240), 640, 480) == (100 / 640, 120 / 640, 300 / 640, 320 / 640)
    assert box_to_square((100, 40, 300, 240), 640, 480) == (0.15625, 0.1875, 0.46875, 0.5)
    # 101 x 200 (odd padding 99): PIL pastes at (99 // 2, 0) = (49, 0)
    assert square_frame(101, 200) == (200, 49, 0)
    assert box_to_square((0, 0, 101, 200), 101, 200) == (49 / 200, 0.0, 150 / 200, 1.0)
    assert box_to_square((3, 4, 5, 6), 50, 50) == (3 / 50, 4 / 50, 5 / 50, 6 / 50)  # square: no padding
    assert box_from_square(box_to_square((10, 7, 90, 33), 101, 40), 101, 40) == pytest.approx((10, 7, 90, 33))


def test_format_box_by_hand():
    # the 640 x 480 box above: (0.15625, 0.1875, 0.46875, 0.5), rounded half to even where it is a tie
    assert format_box((100, 40, 300, 240), 640, 480) == "[0.156,0.188,0.469,0.500]"
    assert format_box((100, 40, 300, 240), 640, 480, decimals=2) == "[0.16,0.19,0.47,0.50]"
    assert format_box((0.25, 0.5, 0.75, 1.0)) == "[0.250,0.500,0.750,1.000]"  # already normalised
    assert format_box((0, 0, 130, 128), 128, 128) == "[0.000,0.000,1.000,1.000]"  # 130 / 128 clamped to 1
    with pytest.raises(ValueError, match="decimals: expected a positive int, got 0"):
        format_box((0, 0, 1, 1), decimals=0)


@pytest.mark.parametrize("size", [(64, 48), (30, 61), (77, 77)])
def test_padded_square_geometry_matches_a_pil_expand2square(size, seed):
    """A filled rectangle drawn in the image lands, after LLaVA's expand2square (PIL new + paste at
    the centred offset), exactly where box_to_square says."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    x0, y0 = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
    x1, y1 = int(rng.integers(x0 + 2, w)), int(rng.integers(y0 + 2, h))
    img = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))  # pixels x0..x1-1
    side = max(w, h)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(img, ((side - w) // 2, (side - h) // 2))  # LLaVA's expand2square
    ys, xs = np.nonzero(np.asarray(square)[..., 0])
    found = (xs.min() / side, ys.min() / side, (xs.max() + 1) / side, (ys.max() + 1) / side)
    assert box_to_square((x0, y0, x1, y1), w, h) == pytest.approx(found, abs=1e-12)


def test_iou_by_hand():
    # overlap 0.25 x 0.25 = 0.0625; union 0.25 + 0.25 - 0.0625 = 0.4375; IoU = 1/7
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7, abs=1e-15)
    assert box_iou((0, 0, 1, 0.5), (0, 0, 1, 1)) == 0.5
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1)) == 0.0
    assert box_iou((0, 0, 1, 0.2), (0, 0.5, 1, 1)) == 0.0  # apart in y only (the y overlap -0.3 is 0)
    assert box_iou((0, 0, 0.2, 1), (0.5, 0, 1, 1)) == 0.0  # apart in x only
    assert box_iou((0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)) == 1.0


def test_rec_metrics_by_hand():
    rows = [{"id": 1, "split": "val", "answer": "[0.1,0.2,0.3,0.4]", "target": [0.1, 0.2, 0.3, 0.4]},  # IoU 1
            {"id": 2, "split": "val", "answer": "[0,0,1,0.5]", "target": [0, 0, 1, 1]},  # IoU 0.5 exactly: a hit
            {"id": 3, "split": "testA", "answer": "a red circle", "target": [0, 0, 1, 1]},  # parse failure: IoU 0
            {"id": 4, "split": "testA", "answer": "[0.25,0.25,0.75,0.75]", "target": [0, 0, 0.5, 0.5]}]  # IoU 1/7
    m = score_rows("rec", rows)
    # Acc@0.5 = 2/4; mean IoU = (1 + 0.5 + 0 + 1/7) / 4 = 0.41071428...; failures 1/4
    assert m["overall"] == pytest.approx({"n": 4, "acc@0.5": 0.5, "mean_iou": (1.5 + 1 / 7) / 4,
                                          "parse_failure_rate": 0.25})
    assert m["splits"]["val"] == {"n": 2, "acc@0.5": 1.0, "mean_iou": 0.75, "parse_failure_rate": 0.0}
    assert m["splits"]["testA"] == pytest.approx({"n": 2, "acc@0.5": 0.0, "mean_iou": 1 / 14,
                                                  "parse_failure_rate": 0.5})
    assert rows[2]["parsed"] is None and rows[1]["parsed"] == [0, 0, 1, 0.5] and rows[1]["score"] == 1.0
    # a row with the image's (width, height): its box in pixels. 64 x 48 pads 8 rows above:
    # (0.25, 0.25, 0.75, 0.75) * 64 = (16, 16, 48, 48), minus (0, 8) -> (16, 8, 48, 40)
    row = {"id": 5, "split": "val", "answer": "[0.25,0.25,0.75,0.75]", "target": [0, 0, 1, 1], "size": [64, 48]}
    rec.score(row)
    assert row["box_pixels"] == [16, 8, 48, 40] and row["iou"] == 0.25


# -- POPE -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No.", "no"), ("No, there is not.", "no"),
    ("Yes, there is a dog. No cat is visible.", "yes"),    # only the first sentence counts
    ("There is not a dog in the image", "no"), ("I see no dog", "no"),
    ("NO", "yes"), ("Not at all", "yes"),                   # LLaVA's words are exactly No / no / not
    ("no,", "no"),                                          # commas removed before splitting
    ("nothing", "yes"), ("", "yes"),
])
def test_llava_yes_no_rule(text, expected):
    assert pope.llava_yes_no(text) == expected


def test_pope_metrics_by_hand():
    # labels / answers: 3 TP, 1 FP, 2 TN, 2 FN (n = 8)
    pairs = [("yes", "Yes")] * 3 + [("no", "Yes")] + [("no", "No")] * 2 + [("yes", "No")] * 2
    rows = [{"id": i, "split": "popular", "answer": a, "target": t} for i, (t, a) in enumerate(pairs)]
    m = score_rows("pope", rows)["splits"]["popular"]
    # accuracy 5/8; precision 3/4; recall 3/5; F1 = 2 * 0.75 * 0.6 / 1.35 = 2/3; yes ratio 4/8
    assert m == pytest.approx({"n": 8, "accuracy": 0.625, "precision": 0.75, "recall": 0.6, "f1": 2 / 3,
                               "yes_ratio": 0.5, "tp": 3, "fp": 1, "tn": 2, "fn": 2})
    none_yes = [{"id": 0, "split": "s", "answer": "No", "target": "yes"}]
    assert score_rows("pope", none_yes)["overall"]["precision"] == 0.0  # no "yes" answered: 0, not a crash


def test_pope_prismatic_rule():
    rows = [{"id": 0, "split": "s", "answer": "No", "p_yes": 0.5, "target": "yes"},   # a tie is "yes" (argmax)
            {"id": 1, "split": "s", "answer": "Yes", "p_yes": 0.49, "target": "yes"}]  # the text is not read
    m = score_rows("pope", rows, "prismatic")["overall"]
    assert [r["parsed"] for r in rows] == ["yes", "no"] and m["accuracy"] == 0.5
    with pytest.raises(ValueError, match="p_yes"):
        score_rows("pope", [{"id": 0, "split": "s", "answer": "No", "target": "yes"}], "prismatic")


# -- VQA --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("the dog.", "dog"), ("A Dog!", "dog"), ("dont", "don't"), ("yes!", "yes"),
    ("1,000", "1000"),              # a digit comma: punctuation deleted, not spaced
    ("red/white", "red white"),     # "/" inside a word becomes a space
    ("red / white", "red white"),   # "/" next to a space is deleted
    ("3.5 inches", "3.5 inches"),   # a period before a digit stays
    ("none", "0"), ("  ten\tcats\n", "10 cats"), ("It's an apple", "it's apple"),
    ("yes?", "yes"),                # "?" is punctuation (replaced by a space, then split away)
    ("a-b -c", "ab c"),             # " -" somewhere: every "-" is deleted, not spaced ("a b c")
    ("a" + "." * 40, "a" + "." * 8),  # the official re.sub(..., re.UNICODE) removes at most 32 periods
])
def test_vqa_normalisation(text, expected):
    assert vqa.normalize_answer(text) == expected


def test_vqa_accuracy_by_hand():
    # 3 x "2", 7 x "3", answer "two" -> "2". Leaving out a "2": 2 matches -> 2/3 (3 subsets); leaving out
    # a "3": 3 matches -> 1 (7 subsets). Mean = (3 * 2/3 + 7) / 10 = 0.9
    assert vqa.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9, abs=1e-15)
    # 1 x "cat", 9 x "dog": leaving out the cat: 0; leaving out a dog: 1 match -> 1/3. Mean = 9/3/10 = 0.3
    assert vqa.vqa_accuracy("Cat.", ["cat"] + ["dog"] * 9) == pytest.approx(0.3, abs=1e-15)
    # 2 x "yes", 8 x "no": 2 subsets with 1 match (1/3), 8 with 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    assert vqa.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6, abs=1e-15)
    assert vqa.vqa_accuracy("Yes", ["yes"] * 10) == 1.0       # 9 matches in every subset
    assert vqa.vqa_accuracy("no", ["yes"] * 10) == 0.0
    # ten identical answers are compared as written (the official script normalises only differing ones)
    assert vqa.vqa_accuracy("yes", ["Yes."] * 10) == 0.0
    # a single reference: exact match of the normalised strings
    assert vqa.vqa_accuracy("red", ["Red."]) == 1.0 and vqa.vqa_accuracy("blue", ["Red."]) == 0.0
    m = score_rows("vqa", [{"id": 0, "split": "s", "answer": "two", "target": ["2"] * 3 + ["3"] * 7},
                           {"id": 1, "split": "s", "answer": "red", "target": ["red"]}])
    assert m["overall"] == pytest.approx({"n": 2, "accuracy": (0.9 + 1) / 2})


# -- loaders ----------------------------------------------------------------------------------------
def test_rec_loaders(tmp_path):
    shikra = {"img_path": "a.jpg", "expression": "the man on the left", "bbox": [100, 40, 300, 240],
              "height": 480, "width": 640}
    items, counts = rec.load([shikra], str(tmp_path / "REC_refcoco_unc_val.jsonl"), "/imgs", None)
    (it,) = items
    assert it.prompt == ("Please provide the bounding box coordinate of the region this sentence describes: the man "
                         "on the left")
    assert it.target == [0.15625, 0.1875, 0.46875, 0.5] and it.size == (640, 480)
    assert it.image == "/imgs/a.jpg" and it.split == "REC_refcoco_unc_val"
    conv = {"id": "c1", "image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nWhere is the red circle? Answer with a box."},
        {"from": "gpt", "value": "[0.102,0.320,0.453,0.602]"}]}
    caption = {"id": "c2", "image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red circle."}]}
    items, counts = rec.load([conv, caption], str(tmp_path / "val.json"), None, None)
    assert [i.id for i in items] == ["c1"] and counts == {"records_in_own_words": 1, "records_without_box": 1}
    assert items[0].prompt == conv["conversations"][0]["value"] and items[0].target == [0.102, 0.32, 0.453, 0.602]
    assert items[0].image == str(tmp_path / "b.png") and items[0].size is None
    # a box on the image's edges is inside it: 64 x 48 pads 8 rows above, (10, 0 + 8, 64, 48 + 8) / 64
    edge = dict(shikra, bbox=[10, 0, 64, 48], width=64, height=48)
    (it,), _ = rec.load([edge], str(tmp_path / "val.jsonl"), None, None)
    assert it.target == [0.15625, 0.125, 1.0, 0.875]
    with pytest.raises(ValueError, match=r"record 0 \(id 'c1'\): field 'conversations': expected a question and its"):
        rec.load([dict(conv, conversations=conv["conversations"][:1])], str(tmp_path / "val.json"), None, None)


def test_pope_and_vqa_loaders(tmp_path):
    recs = [{"question_id": 7, "image": "x.jpg", "text": "Is there a dog in the image?", "label": "Yes"}]
    (it,), _ = pope.load(recs, str(tmp_path / "coco_pope_popular.json"), None, None)
    assert it.split == "popular" and it.target == "yes"
    assert it.prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    recs[0]["category"] = "random"
    recs[0]["text"] += "\nAnswer the question using a single word or phrase."  # already there: not added twice
    (it,), _ = pope.load(recs, str(tmp_path / "coco_pope_popular.json"), None, None)
    assert it.split == "random" and it.prompt == recs[0]["text"]
    recs = [{"question_id": 1, "image": "x.jpg", "question": "How many?", "answers": [{"answer": "2"}] * 10},
            {"question_id": 2, "image": "x.jpg", "text": "Colour?", "answer": "red", "split": "testdev"}]
    a, b = vqa.load(recs, str(tmp_path / "vqav2_val.jsonl"), None, "Q: {question}")[0]
    assert a.target == ["2"] * 10 and a.prompt == "Q: How many?" and a.split == "vqav2_val"
    assert b.target == ["red"] and b.prompt == "Q: Colour?" and b.split == "testdev"


# -- ranks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_item_once_and_unshard_restores_the_order(world):
    for n in range(9):
        items = list(range(100, 100 + n))
        parts = [shard(items, r, world) for r in range(world)]
        assert sorted(x for p in parts for x in p) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert unshard(parts) == items


def test_a_failure_on_one_rank_is_raised_on_every_rank(monkeypatch):
    """Rank 0's view of two ranks where rank 1 failed: it raises rank 1's error instead of going on to
    write results (or, in a real run, waiting in a collective rank 1 never reaches)."""
    from comm_fast.eval import run

    monkeypatch.setattr(run, "rank_world", lambda: (0, 2))
    monkeypatch.setattr(run, "gather", lambda obj: [obj, ("error", "ValueError: x.png: file not found")])
    with pytest.raises(ValueError, match="rank 1: ValueError: x.png: file not found"):
        run._on_every_rank(lambda: ([], []))
    monkeypatch.setattr(run, "gather", lambda obj: [obj, ("ok", ["b"])])
    assert run._on_every_rank(lambda: ["a"]) == [["a"], ["b"]]


# -- rescoring --------------------------------------------------------------------------------------
def test_rescore_saved_predictions_without_a_model(tmp_path):
    rows = [{"task": "vqa", "id": 0, "split": "s", "prompt": "q", "answer": "two", "parsed": "stale", "score": 0.0,
             "target": ["2"] * 3 + ["3"] * 7},
            {"task": "vqa", "id": 1, "split": "t", "prompt": "q", "answer": "Cat.", "target": ["cat"] + ["dog"] * 9}]
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = rescore(str(pred), out=str(tmp_path / "again"))
    assert m["overall"]["accuracy"] == pytest.approx((0.9 + 0.3) / 2)  # the two hand-computed cases above
    assert m["splits"]["s"]["accuracy"] == pytest.approx(0.9) and m["splits"]["t"]["accuracy"] == pytest.approx(0.3)
    saved = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert saved["overall"] == pytest.approx(m["overall"]) and saved["task"] == "vqa"
    again = [json.loads(line) for line in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert [r["parsed"] for r in again] == ["2", "cat"] and again[0]["score"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="--task is 'pope'"):
        rescore(str(pred), task="pope", out=str(tmp_path / "x"))
    del rows[1]["answer"]
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"record 1: field 'answer' missing"):
        rescore(str(pred), out=str(tmp_path / "y"))
    rows[1]["answer"] = None
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"record 1: field 'answer': expected a string, got None"):
        rescore(str(pred), out=str(tmp_path / "z"))
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_rescoring_by_the_cli_takes_the_pope_rule(tmp_path, capsys):
    """The text says yes, the first token's probabilities say no (p_yes 0.3), the label is no."""
    from comm_fast.cli import main

    row = {"task": "pope", "id": 0, "split": "random", "answer": "Yes", "target": "no", "p_yes": 0.3}
    pred = tmp_path / "predictions.jsonl"
    pred.write_text(json.dumps(row) + "\n")
    assert main(["eval", "--predictions", str(pred)]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["accuracy"] == 0.0  # llava: "yes"
    assert main(["eval", "--predictions", str(pred), "--pope-rule", "prismatic"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rule"] == "prismatic" and metrics["overall"]["accuracy"] == 1.0
    capsys.readouterr()
