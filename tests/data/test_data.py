"""Data: Shikra boxes, the synthetic set, the LLaVA loader's validation and bad inputs, the sample order."""
import json
import os

import numpy as np
import pytest

from comm_fast.cli import main as cli
from comm_fast.data import ByteTokenizer, format_box, parse_boxes
from comm_fast.data.dataset import ConversationDataset, DataOrder, collate, resolve_data
from comm_fast.data.synthetic import make_synthetic

N_TOKENS = 16


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "set", 12, seed=3)


def test_boxes_are_shikra_style():
    assert format_box((10, 20, 64, 128), 128, 128) == "[0.078,0.156,0.500,1.000]"
    assert parse_boxes("at [0.078,0.156,0.500,1.000] and [0.1, 0.2, 0.3, 0.4].") == [
        (0.078, 0.156, 0.5, 1.0), (0.1, 0.2, 0.3, 0.4)]


def test_make_data_cli_writes_boxes_and_captions(tmp_path):
    assert cli(["make-data", "synthetic", "--n", "6", "--out", str(tmp_path / "d")]) == 0
    assert len(os.listdir(tmp_path / "d" / "images")) == 6
    fin = json.load(open(tmp_path / "d" / "finetune.json"))
    pre = json.load(open(tmp_path / "d" / "pretrain.json"))
    assert len(fin) == len(pre) == 6
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in fin + pre)
    assert all(r["conversations"][1]["value"].endswith("background.") for r in pre)
    answers = [t["value"] for r in fin for t in r["conversations"] if t["from"] == "gpt"]
    boxes = [b for a in answers for b in parse_boxes(a)]
    assert boxes and all(0 <= v <= 1 for b in boxes for v in b)
    assert all(a.count(".") == 4 and len(a) == 25 for a in answers if a.startswith("["))  # three decimals
    assert cli(["make-data", "synthetic", "--n", "6", "--out", str(tmp_path / "d")]) == 2  # never overwrites


def test_dataset_tokenises_and_collates(synthetic):
    tok = ByteTokenizer()
    path, folder = resolve_data(synthetic, "finetune")
    ds = ConversationDataset(path, folder, tok, N_TOKENS, 512)
    assert len(ds) == 12 and ds.num_truncated == 0
    assert all((s.input_ids == tok.image_token_id).sum() == N_TOKENS for s in ds.samples)
    batch = collate([ds[0], ds[1]], tok.pad_id)
    assert batch["input_ids"].shape[0] == 2 and batch["num_images"] == 2
    packed = collate([ds[i] for i in range(5)], tok.pad_id, pack=True, capacity=700)
    assert packed["input_ids"].shape[1] <= 700 and packed["num_tokens"] == sum(len(ds[i].input_ids) for i in range(5))
    assert (packed["position_ids"] == 0).sum() >= 5


def _write(tmp_path, records, images=("a.png",)):
    from PIL import Image

    for name in images:
        Image.new("RGB", (20, 20), "red").save(tmp_path / name)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def _rec(image="a.png", text="<image>\nWhat?", answer="A red square."):
    rec = {"id": "r1", "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def load(path, **kw):
    return ConversationDataset(path, os.path.dirname(path), ByteTokenizer(), N_TOKENS, kw.pop("max_length", 512), **kw)


def test_missing_image_names_the_file(tmp_path):
    path = _write(tmp_path, [_rec(), _rec(image="gone.png")])
    with pytest.raises(ValueError, match=r"gone\.png: file not found \(record 1"):
        load(path)
    with pytest.warns(UserWarning, match="skipped 1 records"):
        ds = load(path, skip_bad_images=True)
    assert len(ds) == 1 and ds.bad_images == [str(tmp_path / "gone.png")]


def test_corrupt_image_names_the_file(tmp_path):
    path = _write(tmp_path, [_rec(), _rec(image="bad.png")])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"bad\.png: corrupt image"):
        load(path)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load(path, skip_bad_images=True)) == 1


def test_image_placeholder_count_must_match(tmp_path):
    with pytest.raises(ValueError, match=r"record 0 \(id 'r1'\): 0 <image> placeholders for 1 images"):
        load(_write(tmp_path, [_rec(text="What?")]))
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        load(_write(tmp_path, [_rec(text="<image><image>\nWhat?")]))
    with pytest.raises(ValueError, match="1 <image> placeholders for 0 images"):
        load(_write(tmp_path, [_rec(image=None)]))


def test_long_sequences_are_truncated_with_a_counted_warning(tmp_path):
    path = _write(tmp_path, [_rec(answer="x" * 400), _rec()])
    with pytest.warns(UserWarning, match="1 of 2 conversations were longer than max_length=300"):
        ds = load(path, max_length=300)
    assert ds.num_truncated == 1 and len(ds[0].input_ids) == 300
    with pytest.raises(ValueError, match="cuts through its image tokens"):
        load(path, max_length=165)  # the system prompt is ~160 tokens: the 16 image tokens do not fit


def test_malformed_records(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("[{")
    with pytest.raises(ValueError, match="broken.json: corrupt JSON"):
        load(str(bad_json))
    rec = _rec()
    rec["conversations"][0]["from"] = "gpt"
    with pytest.raises(ValueError, match="turn 0 is from 'gpt', expected 'human'"):
        load(_write(tmp_path, [rec]))
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load(_write(tmp_path, {"not": "a list"}))
    with pytest.raises(FileNotFoundError, match="neither finetune.json nor data.json"):
        resolve_data(str(tmp_path / "images-only"), "finetune") if os.makedirs(tmp_path / "images-only") is None else 0


def test_data_order_is_seeded_and_resumable():
    a = DataOrder(10, seed=1)
    first = a.take(7) + a.take(7)  # crosses into the second epoch
    assert sorted(first[:10]) == list(range(10))
    b = DataOrder(10, seed=1, position=7)
    assert b.take(7) == first[7:]
    assert DataOrder(10, seed=2).take(10) != first[:10]


def test_a_tokenizers_own_system_prompt_replaces_vicunas_and_is_saved(tmp_path):
    from comm_fast.data.conversation import SYSTEM, encode_prompt, tokenize_conversation
    from comm_fast.data.tokenizer import load_tokenizer

    conv = [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "[0.1,0.2,0.3,0.4]"}]
    vicuna, none, short = ByteTokenizer(), ByteTokenizer(system=""), ByteTokenizer(system="Boxes.")
    img = vicuna.image_token_id
    for tok, text in ((vicuna, SYSTEM + " "), (none, ""), (short, "Boxes. ")):
        ids, labels, _ = tokenize_conversation(conv, tok, 2)
        want = [tok.bos_id] + tok.encode(text + "USER: ") + [img, img] + tok.encode("\nWhere? ASSISTANT:")
        assert ids[:len(want)].tolist() == want
        assert tok.decode(ids[len(want):]) == " [0.1,0.2,0.3,0.4]" and ids[-1] == tok.eos_id
        assert (labels[:len(want)] == -100).all() and (labels[len(want):] == ids[len(want):]).all()
        assert encode_prompt(tok, "<image>\nWhere?", 2) == want  # generation and evaluation: the same prefix
        tok.save(str(tmp_path))
        assert load_tokenizer(tmp_path).system == tok.system
    with pytest.raises(ValueError, match="system: expected a string or None, got int"):
        ByteTokenizer(system=3)


def test_truncation_keeps_ids_and_labels_aligned_at_the_limit():
    from comm_fast.data.conversation import IGNORE_INDEX, tokenize_conversation

    tok = ByteTokenizer()
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."}]
    ids, labels, truncated = tokenize_conversation(conv, tok, N_TOKENS)
    n = len(ids)
    assert not truncated and len(labels) == n and labels[-1] == tok.eos_id  # the reply's </s> is a target
    same, same_labels, truncated = tokenize_conversation(conv, tok, N_TOKENS, max_length=n)  # exactly fits
    assert not truncated and np.array_equal(same, ids) and np.array_equal(same_labels, labels)
    cut, cut_labels, truncated = tokenize_conversation(conv, tok, N_TOKENS, max_length=n - 3)
    assert truncated and len(cut) == len(cut_labels) == n - 3
    assert np.array_equal(cut, ids[:n - 3]) and np.array_equal(cut_labels, labels[:n - 3])
    assert (labels[:n - 15] == IGNORE_INDEX).all()  # "A red circle." + </s> are the only targets: 15 tokens
    assert (labels[n - 15:] != IGNORE_INDEX).all()


def test_images_of_any_mode_load_as_rgb(tmp_path):
    """Grey, palette and RGBA PNGs come back as H x W x 3 uint8, as PIL's convert("RGB") gives them (grey g
    -> (g, g, g); alpha dropped, not composited)."""
    from PIL import Image

    from comm_fast.data.dataset import load_images

    grey = np.arange(200, dtype=np.uint8).reshape(10, 20)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey, "L").convert("P").save(tmp_path / "p.png")
    g, a, p = load_images([str(tmp_path / n) for n in ("l.png", "rgba.png", "p.png")])
    assert g.shape == a.shape == p.shape == (10, 20, 3) and g.dtype == np.uint8
    assert np.array_equal(g, np.repeat(grey[..., None], 3, axis=2)) and np.array_equal(p, g)
    assert (a == [200, 0, 0]).all()


def test_packing_fills_rows_to_their_capacity_exactly():
    from comm_fast.data.dataset import Sample

    def sample(n):
        return Sample(np.arange(1, n + 1), np.arange(1, n + 1), [])

    batch = collate([sample(6), sample(4)], pad_id=0, pack=True, capacity=10)  # 6 + 4 fit one row of 10
    assert batch["input_ids"].shape == (1, 10)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    batch = collate([sample(6), sample(3)], pad_id=0, pack=True, capacity=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]]  # the tail: its own segment
    assert batch["labels"][1].tolist() == [1, 2, 3, -100, -100, -100]


def test_an_image_folder_overrides_the_data_directory(tmp_path):
    (tmp_path / "finetune.json").write_text("[]")
    assert resolve_data(str(tmp_path), "finetune") == (str(tmp_path / "finetune.json"), str(tmp_path))
    assert resolve_data(str(tmp_path), "finetune", "/imgs") == (str(tmp_path / "finetune.json"), "/imgs")
    assert resolve_data(str(tmp_path / "finetune.json"), "pretrain", "/imgs")[1] == "/imgs"
    assert resolve_data(str(tmp_path / "finetune.json"), "pretrain")[1] == str(tmp_path)


def test_the_collator_refuses_bad_arguments_and_packs_to_its_length():
    from comm_fast import COMMConfig
    from comm_fast.data.collator import COMMDataCollator

    vision = COMMConfig.preset("tiny").vision
    with pytest.raises(TypeError, match="pad_id: expected the tokenizer's padding id"):
        COMMDataCollator(True, vision)
    with pytest.raises(ValueError, match="pack_length: expected a positive number of tokens or None, got 0"):
        COMMDataCollator(0, vision, pack=True, pack_length=0)
    with pytest.raises(ValueError, match=r"features\[0\]: input_ids and labels must be 1-D"):
        COMMDataCollator(0, vision)([{"input_ids": [[1, 2], [3, 4]], "labels": [[1, 2], [3, 4]]}])
    feats = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (6, 4, 5)]
    batch = COMMDataCollator(0, vision, pack=True, pack_length=10)(feats)
    assert batch["input_ids"].shape == (2, 10) and "attention_mask" not in batch
