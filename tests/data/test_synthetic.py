"""The synthetic set's non-square images, boxes in the padded square, the held-out val split and the REC
records that evaluation reads."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from comm_fast.cli import main as cli
from comm_fast.data.boxes import parse_box, parse_boxes
from comm_fast.data.synthetic import COLORS, RATIOS, make_synthetic

N = 24


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "train", N, seed=5)


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "val", N, seed=5, split="val")


def _rec(path):
    with open(os.path.join(path, "rec.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _image(path, name):
    from PIL import Image

    return Image.open(os.path.join(path, name)).convert("RGB")


def _expand2square(img):
    """LLaVA-1.5's expand2square (PIL new + paste at the centred offset), black padding."""
    from PIL import Image

    side = max(img.size)
    out = Image.new("RGB", (side, side), (0, 0, 0))
    out.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return out


def _centre(box, side):
    """The pixel at the centre of a normalised box of a side x side image (inside circle, square and triangle)."""
    x0, y0, x1, y1 = box
    return min(side - 1, int((x0 + x1) / 2 * side)), min(side - 1, int((y0 + y1) / 2 * side))


def test_images_are_square_or_within_the_aspect_ratios(train_set):
    sizes = {r["img_path"]: (r["width"], r["height"]) for r in _rec(train_set)}
    for name, (w, h) in sizes.items():
        assert _image(train_set, name).size == (w, h)
        assert max(w, h) == 128 and RATIOS[0] - 0.01 <= w / h <= RATIOS[1] + 0.01
    square = sum(w == h for w, h in sizes.values())
    assert 0 < square < len(sizes)  # both kinds (about half each)
    only_square = make_synthetic(os.path.join(os.path.dirname(train_set), "sq"), 6, seed=5, nonsquare=0.0)
    assert all(r["width"] == r["height"] == 128 for r in _rec(only_square))


def test_rec_boxes_hold_their_objects(train_set):
    """Each REC record's pixel box has the named object's colour at its centre, in the image itself."""
    for r in _rec(train_set):
        img = np.asarray(_image(train_set, r["img_path"])).astype(int)
        x0, y0, x1, y1 = r["bbox"]
        colour = r["expression"].split()[1]
        assert np.abs(img[(y0 + y1) // 2, (x0 + x1) // 2] - COLORS[colour]).max() <= 1, r


def test_box_answers_refer_to_the_padded_square(train_set):
    """Every box in the finetune text, read in the image padded to a square by PIL, has an object's colour at
    its centre; read in the unpadded image (x / width, y / height) it misses on some non-square image."""
    records = json.load(open(os.path.join(train_set, "finetune.json")))
    hit_padded, hit_plain, n_nonsquare = [], [], 0
    for rec in records:
        img = _image(train_set, rec["image"])
        square = np.asarray(_expand2square(img)).astype(int)
        plain = np.asarray(img).astype(int)
        colours = np.array(list(COLORS.values()))
        for turn in rec["conversations"]:
            for box in parse_boxes(turn["value"]):
                x, y = _centre(box, square.shape[0])
                hit_padded.append(np.abs(colours - square[y, x]).max(axis=1).min() <= 1)
                if img.width != img.height:
                    n_nonsquare += 1
                    xp = min(img.width - 1, int((box[0] + box[2]) / 2 * img.width))
                    yp = min(img.height - 1, int((box[1] + box[3]) / 2 * img.height))
                    hit_plain.append(np.abs(colours - plain[yp, xp]).max(axis=1).min() <= 1)
    assert hit_padded and all(hit_padded)
    assert n_nonsquare > 0 and not all(hit_plain)


def test_center_crop_cuts_objects_and_padding_keeps_them(val_set):
    """Through joint_preprocess at 112 px: with aspect='pad' every object's normalised box centre shows its
    colour; with 'crop' some boxes of the non-square images point elsewhere (objects cut off or shifted)."""
    from comm_fast import ops
    from comm_fast.constants import CLIP_MEAN, CLIP_STD

    recs = [r for r in _rec(val_set) if r["width"] != r["height"]]
    assert recs
    names = sorted({r["img_path"] for r in recs})
    images = [np.asarray(_image(val_set, n)) for n in names]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    found = {}
    for aspect in ("pad", "crop"):
        clip_px, _ = ops.joint_preprocess(images, 112, 112, aspect=aspect)
        rgb = ((clip_px * std + mean) * 255).round()  # back to 0-255
        found[aspect] = []
        for r in recs:
            from comm_fast.data.boxes import box_to_square

            x, y = _centre(box_to_square(r["bbox"], r["width"], r["height"]), 112)
            pixel = rgb[names.index(r["img_path"]), :, y, x].numpy()
            found[aspect].append(np.abs(pixel - COLORS[r["expression"].split()[1]]).max() <= 12)
    assert all(found["pad"])
    assert sum(not f for f in found["crop"]) >= len(recs) // 4


def _hashes(path):
    return {hashlib.sha256(open(os.path.join(path, "images", n), "rb").read()).hexdigest()
            for n in os.listdir(os.path.join(path, "images"))}


def test_val_split_is_held_out(train_set, val_set, tmp_path):
    assert sorted(os.listdir(val_set)) == ["images", "rec.jsonl"]
    assert not _hashes(train_set) & _hashes(val_set)  # other images
    train_recs, val_recs = _rec(train_set), _rec(val_set)
    assert {r["split"] for r in val_recs} == {"val"} and {r["split"] for r in train_recs} == {"train"}
    assert not {r["id"] for r in train_recs} & {r["id"] for r in val_recs}
    layout = lambda r: (tuple(r["bbox"]), r["expression"], r["width"], r["height"])  # noqa: E731
    assert not {layout(r) for r in train_recs} & {layout(r) for r in val_recs}  # other objects, not just other noise
    # nor the train set of the seeds next to it, nor val sets of other seeds
    others = [make_synthetic(tmp_path / f"t{s}", N, seed=s) for s in (4, 6)]
    others.append(make_synthetic(tmp_path / "v6", N, seed=6, split="val"))
    for o in others:
        assert not _hashes(o) & _hashes(val_set)
    # and the same command writes the same split
    again = make_synthetic(tmp_path / "again", N, seed=5, split="val")
    assert _hashes(again) == _hashes(val_set) and _rec(again) == val_recs


def test_eval_reads_the_val_split(val_set):
    from comm_fast.data.boxes import box_to_square
    from comm_fast.eval.run import check_images, load_items

    items, _ = load_items("rec", os.path.join(val_set, "rec.jsonl"))
    recs = _rec(val_set)
    assert len(items) == len(recs) and {it.split for it in items} == {"val"}
    for it, r in zip(items, recs):
        assert it.target == list(box_to_square(r["bbox"], r["width"], r["height"]))
        assert it.prompt.endswith(": " + r["expression"])
    good, bad, _ = check_images(items, skip_bad_images=False)
    assert len(good) == len(items) and not bad


def test_rec_mix_asks_every_object(tmp_path):
    path = make_synthetic(tmp_path / "rec", 8, seed=1, mix="rec")
    recs = _rec(path)
    fin = json.load(open(os.path.join(path, "finetune.json")))
    for rec in fin:
        answers = [t["value"] for t in rec["conversations"][1::2]]
        assert all(parse_box(a) is not None and len(a) == 25 for a in answers)
        assert len(answers) == sum(r["img_path"] == rec["image"] for r in recs)


def test_make_data_split_and_bad_arguments(tmp_path, capsys):
    assert cli(["make-data", "synthetic", "--n", "3", "--split", "val", "--out", str(tmp_path / "v")]) == 0
    assert "3 val images" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "v")) == ["images", "rec.jsonl"]
    assert cli(["make-data", "synthetic", "--n", "3", "--nonsquare", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--nonsquare: expected a fraction in [0, 1], got 1.5" in capsys.readouterr().err
    assert cli(["make-data", "synthetic", "--n", "3", "--max-objects", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--max-objects: expected 1, 2 or 3, got 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["make-data", "synthetic", "--n", "3", "--split", "test", "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")


def test_box_decimals_flag_writes_shorter_boxes_that_eval_reads(tmp_path):
    assert cli(["make-data", "synthetic", "--n", "4", "--mix", "rec", "--seed", "1", "--box-decimals", "2",
                "--out", str(tmp_path / "d2")]) == 0
    recs = _rec(tmp_path / "d2")
    for rec in json.load(open(tmp_path / "d2" / "finetune.json")):
        for answer in (t["value"] for t in rec["conversations"][1::2]):
            box = parse_box(answer)  # eval's own parser
            assert box is not None and len(answer) == 21, answer  # [0.dd,0.dd,0.dd,0.dd]
            # the rounded box is within half a hundredth of one REC box of its image
            assert any(np.allclose(box, _square(r), atol=0.005 + 1e-9) for r in recs if r["img_path"] == rec["image"])
    # the images and REC records are the same as with three decimals: only the text differs
    make_synthetic(tmp_path / "d3", 4, seed=1, mix="rec")
    assert _rec(tmp_path / "d3") == recs
    assert cli(["make-data", "synthetic", "--n", "3", "--box-decimals", "7", "--out", str(tmp_path / "x")]) == 2


def _square(rec):
    from comm_fast.data.boxes import box_to_square

    return box_to_square(rec["bbox"], rec["width"], rec["height"])


def test_texture_calms_the_background_and_keeps_everything_else(tmp_path, capsys):
    full = make_synthetic(tmp_path / "t1", 8, seed=2, mix="rec")
    calm = make_synthetic(tmp_path / "t025", 8, seed=2, mix="rec", texture=0.25)
    assert _rec(calm) == _rec(full)  # the same draws: images' sizes, objects, boxes and text
    assert json.load(open(os.path.join(calm, "finetune.json"))) == json.load(open(os.path.join(full, "finetune.json")))
    ratios = []
    for name in sorted({r["img_path"] for r in _rec(full)}):
        a, b = (np.asarray(_image(p, name), dtype=np.float64) for p in (full, calm))
        background = np.ones(a.shape[:2], dtype=bool)
        for r in _rec(full):
            if r["img_path"] == name:
                x0, y0, x1, y1 = r["bbox"]
                background[y0:y1 + 1, x0:x1 + 1] = False
                colour = COLORS[r["expression"].split()[1]]  # "the red circle": each object's fill is unchanged
                cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
                assert tuple(a[cy, cx]) == tuple(b[cy, cx]) == colour
        ratios.append(b[background].std(0).mean() / a[background].std(0).mean())
    # a quarter of the contrast; the uint8 rounding of the calmer image adds a little
    assert 0.2 < np.median(ratios) < 0.3, ratios
    assert cli(["make-data", "synthetic", "--n", "3", "--texture", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--texture: expected a background contrast in [0, 1], got 1.5" in capsys.readouterr().err


def test_where_by_hand():
    # thirds of the padded square: a 32 px box at x 0-32 of 128 is left (centre 0.125), y 48-80 middle
    from comm_fast.data.synthetic import _where

    assert _where((0, 48, 32, 80), (128, 128)) == "on the left"
    assert _where((96, 0, 128, 32), (128, 128)) == "at the top right"
    assert _where((0, 100, 20, 120), (128, 128)) == "at the bottom left"
    # 128 x 72 pads 28 rows above: (54, 26 + 28, 74, 46 + 28) / 128, centre (0.5, 0.5)
    assert _where((54, 26, 74, 46), (128, 72)) == "in the centre"


def _check_llava_text(path, decimals=3):
    """Every question the llava mix asks of an image answered as the image's objects (its REC records) say;
    returns how many of each kind were checked."""
    import re

    from comm_fast.data.boxes import format_box
    from comm_fast.data.synthetic import GROUNDING_QUESTIONS

    objects = {}
    for r in _rec(path):
        objects.setdefault(r["img_path"], []).append(r)
    box_re = r"\[[\d.,]+\]"
    grounding = [re.compile(re.escape(q).replace(r"\{\}", "(\\w+) (\\w+)") + "$") for q in GROUNDING_QUESTIONS]
    seen = dict.fromkeys(("box", "region", "colour", "count", "presence", "relation", "description"), 0)
    for rec in json.load(open(os.path.join(path, "finetune.json"))):
        objs = objects[rec["image"]]
        by_box = {format_box(o["bbox"], o["width"], o["height"], decimals): o["expression"][4:] for o in objs}
        by_name = {o["expression"][4:]: o for o in objs}
        centre_x = {name: o["bbox"][0] + o["bbox"][2] for name, o in by_name.items()}
        turns = rec["conversations"]
        for q, a in zip((t["value"].removeprefix("<image>\n") for t in turns[::2]), (t["value"] for t in turns[1::2])):
            for text in (q, a):
                assert all(re.fullmatch(rf"\[(?:[01]\.\d{{{decimals}}},){{3}}[01]\.\d{{{decimals}}}\]", b)
                           for b in re.findall(box_re, text)), text
            if m := next((g.match(q) for g in grounding if g.match(q)), None):
                name = f"{m[1]} {m[2]}"
                assert by_box.get(a) == name, (q, a)
                seen["box"] += 1
            elif m := re.fullmatch(rf"What is at ({box_re})\?", q):
                assert a == f"{'An' if by_box[m[1]][0] in 'aeiou' else 'A'} {by_box[m[1]]}.", (q, a)
                seen["region"] += 1
            elif m := re.fullmatch(rf"What colour is the (\w+) at ({box_re})\?", q):
                colour, shape = by_box[m[2]].split()
                assert shape == m[1] and a == f"{colour.capitalize()}.", (q, a)
                seen["colour"] += 1
            elif q == "How many shapes are there?":
                assert a == ("One.", "Two.", "Three.")[len(objs) - 1], (q, a, len(objs))
                seen["count"] += 1
            elif m := re.fullmatch(r"Is there an? (\w+ \w+)\?", q):
                assert a == (f"Yes, at {format_box(by_name[m[1]]['bbox'], objs[0]['width'], objs[0]['height'], decimals)}."
                             if m[1] in by_name else "No."), (q, a)
                seen["presence"] += 1
            elif m := re.fullmatch(r"Is the (\w+ \w+) to the left of the (\w+ \w+)\?", q):
                left = centre_x[m[1]] < centre_x[m[2]]
                assert a == ("Yes, it is to the left of it." if left else "No, it is to the right of it."), (q, a)
                seen["relation"] += 1
            elif m := re.search(r"The (\w+ \w+) is to the (left|right) of the (\w+ \w+)\.$", a):
                assert m[2] == ("left" if centre_x[m[1]] < centre_x[m[3]] else "right"), a
                seen["description"] += 1
    return seen


def test_llava_mix_answers_what_the_image_holds(tmp_path):
    """The finetune mix's questions answered by hand from the REC records of the same images: boxes, the
    object at a box, colours, counts, presence, left/right relations (also in grounded descriptions); and
    every box written with the decimals asked for."""
    seen = _check_llava_text(make_synthetic(tmp_path / "d3", 60, seed=3))
    assert min(seen.values()) > 0, seen  # every kind was asked
    seen = _check_llava_text(make_synthetic(tmp_path / "d2", 30, seed=4, box_decimals=2), decimals=2)
    assert seen["box"] and seen["region"], seen


def test_first_exchanges_and_object_counts(tmp_path):
    """A quarter of the finetune records open with a caption, the rest with a box question (the seeded
    draw of 60: within 0.6-0.9); --max-objects 1 draws one object per image."""
    from comm_fast.data.synthetic import GROUNDING_QUESTIONS

    path = make_synthetic(tmp_path / "mix", 60, seed=2)
    firsts = [rec["conversations"][0]["value"] for rec in json.load(open(os.path.join(path, "finetune.json")))]
    grounding = sum(any(q.split("{}")[0] in f for q in GROUNDING_QUESTIONS) for f in firsts) / len(firsts)
    assert 0.6 <= grounding <= 0.9, grounding
    one = _rec(make_synthetic(tmp_path / "one", 12, seed=1, max_objects=1))
    assert sorted(r["img_path"] for r in one) == [f"images/{i:06d}.png" for i in range(12)]


def test_the_bounds_of_the_flags_are_accepted(tmp_path):
    """The ends of each documented range: 6 decimals, texture 0 (flat backgrounds), every image non-square."""
    from PIL import Image

    path = make_synthetic(tmp_path / "a", 4, seed=1, box_decimals=6, texture=0.0, nonsquare=1.0, mix="rec")
    assert all(len(parse_box(t["value"]) or ()) == 4 and len(t["value"]) == 37
               for rec in json.load(open(os.path.join(path, "finetune.json"))) for t in rec["conversations"][1::2])
    for r in _rec(path):
        with Image.open(os.path.join(path, r["img_path"])) as im:
            assert im.width != im.height
