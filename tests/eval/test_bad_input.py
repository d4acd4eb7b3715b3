"""Bad input to ``comm-fast eval``: each case a clear error (exit status 2) naming the file, the record and
the field, and no metrics.json (nor predictions.jsonl) written."""
import json
import os
import shutil

import pytest

from comm_fast.cli import main


def run_eval(capsys, out, *args):
    rc = main(["eval", "--out", str(out), "--no-progress", "--max-new-tokens", "2", *args])
    err = capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not os.path.exists(os.path.join(out, "predictions.jsonl"))
    return rc, err


def test_missing_and_corrupt_annotation_files(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_eval(capsys, out, "--model", model_dir, "--task", "pope", "--data", str(tmp_path / "nope.jsonl"))
    assert rc == 2 and f"{tmp_path / 'nope.jsonl'}: file not found" in err
    broken = tmp_path / "coco_pope_random.json"
    broken.write_text('{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "no"}\n'
                      '{"question_id": 2,')
    rc, err = run_eval(capsys, out, "--model", model_dir, "--task", "pope", "--data", str(broken))
    assert rc == 2 and f"{broken}: line 2: corrupt JSON Lines record" in err
    broken.write_text('[{"question_id": 1, "image": "a.png"')
    rc, err = run_eval(capsys, out, "--model", model_dir, "--task", "pope", "--data", str(broken))
    assert rc == 2 and f"{broken}: corrupt JSON" in err
    broken.write_text('[1, 2]')
    rc, err = run_eval(capsys, out, "--model", model_dir, "--task", "pope", "--data", str(broken))
    assert rc == 2 and f"{broken}: record 0: expected a JSON object, got int" in err
    for empty in ("", "\n  \n", "[]"):
        broken.write_text(empty)
        rc, err = run_eval(capsys, out, "--model", model_dir, "--task", "pope", "--data", str(broken))
        assert rc == 2 and f"{broken}: no records" in err, (empty, err)


@pytest.mark.parametrize("task, record, message", [
    ("pope", {"question_id": 5, "image": "wide.png", "text": "Is there a cat?"},
     "record 1 (id 5): field 'label' missing"),
    ("pope", {"question_id": True, "image": "wide.png", "text": "Is there a cat?", "label": "no"},
     "record 1 (id True): field 'question_id': expected a POPE record (question_id, image, text, label), got True"),
    ("pope", {"question_id": 5, "image": "wide.png", "text": "Is there a cat?", "label": "maybe"},
     "record 1 (id 5): field 'label': expected \"yes\" or \"no\", got 'maybe'"),
    ("vqa", {"question_id": 5, "image": "wide.png", "question": "What?"}, "record 1 (id 5): field 'answer' missing"),
    ("vqa", {"question_id": 5, "image": "wide.png", "question": "What?", "answers": []},
     "record 1 (id 5): field 'answers': expected a non-empty list"),
    ("rec", {"img_path": "wide.png", "expression": "the cat", "height": 48, "width": 64},
     "record 1: field 'bbox' missing"),
    ("rec", {"img_path": "wide.png", "bbox": [1, 2, 3, 4], "height": 48, "width": 64},
     "record 1: field 'expression' missing"),
    ("rec", {"img_path": "wide.png", "expression": "the cat", "bbox": [1, 2, 3], "height": 48, "width": 64},
     "record 1: field 'bbox': expected [x0, y0, x1, y1] in pixels, got [1, 2, 3]"),
    ("rec", {"img_path": "wide.png", "expression": "the cat", "bbox": [1, 2, 30, 40], "height": "48", "width": 64},
     "record 1: field 'height': expected the image height in pixels, got '48'"),
])
def test_a_record_without_its_tasks_fields(model_dir, images, tmp_path, jsonl, capsys, task, record, message):
    good = {"pope": {"question_id": 0, "image": "wide.png", "text": "Is there a cat?", "label": "no"},
            "vqa": {"question_id": 0, "image": "wide.png", "question": "What?", "answers": ["a"] * 10},
            "rec": {"img_path": "wide.png", "expression": "the cat", "bbox": [1, 2, 30, 40], "height": 48,
                    "width": 64}}[task]
    data = jsonl(tmp_path / "ann.jsonl", [good, record])
    rc, err = run_eval(capsys, tmp_path / "out", "--model", model_dir, "--task", task, "--data", data,
                       "--image-folder", images[0])
    assert rc == 2 and f"{data}: {message}" in err, err


@pytest.mark.parametrize("bbox", [[10, 5, 65, 40], [-1, 5, 20, 40], [10, 5, 20, 48.5], [30, 5, 20, 40],
                                  [10, 5, 10, 40], [10, 40, 20, 40], [10, -0.5, 20, 40]])
def test_a_box_outside_its_image(model_dir, images, tmp_path, jsonl, capsys, bbox):
    rec = {"img_path": "wide.png", "expression": "the cat", "bbox": bbox, "height": 48, "width": 64}
    data = jsonl(tmp_path / "ann.jsonl", [rec])
    rc, err = run_eval(capsys, tmp_path / "out", "--model", model_dir, "--task", "rec", "--data", data,
                       "--image-folder", images[0])
    assert rc == 2 and f"{data}: record 0: field 'bbox' {bbox} lies outside its 64 x 48 image" in err, err
    conv = {"id": "c", "image": "wide.png", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                                              {"from": "gpt", "value": "[0.1,0.2,1.3,0.4]"}]}
    data = jsonl(tmp_path / "conv.jsonl", [conv])
    rc, err = run_eval(capsys, tmp_path / "out", "--model", model_dir, "--task", "rec", "--data", data,
                       "--image-folder", images[0])
    assert rc == 2 and f"{data}: record 0 (id 'c'): the answer's box [0.1,0.2,1.3,0.4] lies outside its image" in err


def test_an_image_whose_size_is_not_the_annotations(model_dir, images, tmp_path, jsonl, capsys):
    rec = {"id": "r", "img_path": "wide.png", "expression": "the cat", "bbox": [1, 2, 30, 40], "height": 64,
           "width": 64}
    data = jsonl(tmp_path / "ann.jsonl", [rec])
    rc, err = run_eval(capsys, tmp_path / "out", "--model", model_dir, "--task", "rec", "--data", data,
                       "--image-folder", images[0])
    assert rc == 2 and "item 'r': fields 'width', 'height' say 64 x 64, but" in err and "wide.png is 64 x 48" in err


def test_missing_and_corrupt_images_are_named_and_skipped_on_request(model_dir, images, pope_file, tmp_path,
                                                                    jsonl, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(images[0], folder)
    records = [json.loads(line) for line in open(pope_file)]
    records[1]["image"] = "gone.png"
    (folder / "junk.png").write_bytes(b"not an image at all")
    records[2]["image"] = "junk.png"
    data = jsonl(tmp_path / "coco_pope_random.json", records)
    out = tmp_path / "out"
    rc, err = run_eval(capsys, out, "--model", model_dir, "--task", "pope", "--data", data, "--image-folder",
                       str(folder))
    assert rc == 2 and f"{folder / 'gone.png'}: file not found (item 1); pass --skip-bad-images" in err
    assert main(["eval", "--model", model_dir, "--task", "pope", "--data", data, "--image-folder", str(folder),
                 "--out", str(out), "--no-progress", "--max-new-tokens", "2", "--skip-bad-images"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_bad_images"] == 2 and metrics["num_items"] == 4 and metrics["overall"]["n"] == 4
    assert [b["id"] for b in metrics["bad_images"]] == [1, 2] and "not an image" in metrics["bad_images"][1]["reason"]


def test_an_image_that_fails_to_decode_mid_run_leaves_no_files(model_dir, images, pope_file, tmp_path, jsonl,
                                                             capsys):
    """Its header reads (so the check before the run passes), its pixels do not: the run stops at its
    batch, and nothing is written."""
    folder = tmp_path / "imgs"
    shutil.copytree(images[0], folder)
    whole = (folder / "wide.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[:len(whole) // 2])
    records = [json.loads(line) for line in open(pope_file)][:3]
    records[2]["image"] = "cut.png"
    data = jsonl(tmp_path / "coco_pope_random.json", records)
    rc, err = run_eval(capsys, tmp_path / "out", "--model", model_dir, "--task", "pope", "--data", data,
                       "--image-folder", str(folder), "--batch-size", "2")
    assert rc == 2 and f"{folder / 'cut.png'}: cannot decode image" in err and "(item 2)" in err, err
    out = tmp_path / "skipped"  # on request it is skipped and counted like the ones found before the run
    assert main(["eval", "--model", model_dir, "--task", "pope", "--data", data, "--image-folder", str(folder),
                 "--out", str(out), "--no-progress", "--max-new-tokens", "2", "--batch-size", "2",
                 "--skip-bad-images"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_bad_images"] == 1 and metrics["num_items"] == 2 and metrics["overall"]["n"] == 2
    assert [b["id"] for b in metrics["bad_images"]] == [2] and "cannot decode image" in metrics["bad_images"][0]["reason"]


def test_nothing_left_to_score_writes_nothing(model_dir, pope_file, tmp_path, capsys):
    """Every image missing and skipped on request: an error, not a metrics.json of zero items."""
    rc, err = run_eval(capsys, tmp_path / "out", "--model", model_dir, "--task", "pope", "--data", pope_file,
                       "--image-folder", str(tmp_path / "no-images"), "--skip-bad-images")
    assert rc == 2 and "nothing to score: no items left (all skipped?)" in err, err


def test_an_id_in_two_annotation_files(model_dir, images, pope_file, tmp_path, capsys):
    other = tmp_path / "more" / "coco_pope_random.json"
    other.parent.mkdir()
    shutil.copy(pope_file, other)
    rc, err = run_eval(capsys, tmp_path / "out", "--model", model_dir, "--task", "pope", "--data", pope_file,
                       str(other), "--image-folder", images[0])
    assert rc == 2 and f"{other}: id 0 appears twice (also in {pope_file}); ids must be unique" in err, err


def test_a_model_directory_that_is_not_a_comm_model(pope_file, images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--task", "pope", "--data", pope_file, "--image-folder", images[0]]
    rc, err = run_eval(capsys, tmp_path / "out", "--model", str(empty), *args)
    assert rc == 2 and f"--model {empty}: not a saved COMM model" in err and "config.json: file not found" in err
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, err = run_eval(capsys, tmp_path / "out", "--model", str(empty), *args)
    assert rc == 2 and "not a saved COMMForCausalLM (config_type None" in err
    rc, err = run_eval(capsys, tmp_path / "out", "--model", str(tmp_path / "nowhere"), *args)
    assert rc == 2 and f"--model {tmp_path / 'nowhere'}: not a saved COMM model (model: no such directory" in err


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-2"), ("--limit", "0"),
                                         ("--max-new-tokens", "0")])
def test_non_positive_sizes(model_dir, pope_file, images, tmp_path, capsys, flag, value):
    rc = main(["eval", "--out", str(tmp_path / "out"), "--model", model_dir, "--task", "pope", "--data", pope_file,
               "--image-folder", images[0], flag, value])
    assert rc == 2 and f"{flag}: expected a positive integer, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_usage_errors(tmp_path, capsys):
    assert main(["eval", "--task", "pope"]) == 2
    assert "--model, --data required (or --predictions FILE)" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(tmp_path / "p.jsonl"), "--model", "m"]) == 2
    assert "takes no --model or --data" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(tmp_path / "p.jsonl")]) == 2
    assert "p.jsonl: file not found" in capsys.readouterr().err
