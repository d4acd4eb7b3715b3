"""COMMProcessor: the Vicuna-v1 prompt and dialogues with N image tokens per <image>, the joint preprocessing,
saved with the model and loaded back (directly and through AutoProcessor after ``import comm_fast``)."""
import json
import os

import numpy as np
import pytest
import torch

from comm_fast import COMMConfig, COMMForCausalLM
from comm_fast.data import ByteTokenizer
from comm_fast.data.conversation import IGNORE_INDEX, SYSTEM
from comm_fast.models.processing import COMMProcessor


@pytest.fixture
def model(seed):
    return COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).eval()


def images(n, rng):
    return [rng.integers(0, 256, (40 + 7 * i, 64, 3), dtype=np.uint8) for i in range(n)]


def test_prompts_and_images_are_the_models_inputs(model, seed):
    processor = model.processor
    rng = np.random.default_rng(seed)
    ims = images(2, rng)
    questions = ["What is this?", "Where is the big red circle?"]
    inputs = processor(text=questions, images=ims)
    tok, n = model.tokenizer, model.num_image_tokens
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape[0] == 2 and (mask[0] == 0).any() and mask[1].all()  # left-padded
    for b, q in enumerate(questions):
        row = ids[b][mask[b].bool()].tolist()
        assert row[0] == tok.bos_id and row.count(tok.image_token_id) == n
        assert tok.decode(row) == f"{SYSTEM} USER: \n{q} ASSISTANT:"  # Vicuna v1, <image> in front
    with torch.no_grad():
        ours = model(**inputs).logits
        direct = model(input_ids=ids, attention_mask=mask, images=ims).logits  # the tower preprocesses itself
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    new = model.generate(**inputs, max_new_tokens=3)
    assert new.shape[0] == 2
    assert processor.decode(torch.tensor([*tok.encode("hi"), tok.eos_id]), skip_special_tokens=True) == "hi"


def test_conversations_give_labels_on_the_replies(model):
    conv = [{"from": "human", "value": "<image>\nCaption?"}, {"from": "gpt", "value": "A blue square."}]
    short = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]
    out = model.processor(conversations=[conv, short])
    tok = model.tokenizer
    labels = out["labels"]
    assert out["attention_mask"][1].sum() < out["attention_mask"][0].sum() and out["attention_mask"][:, 0].all()
    assert labels[0][labels[0] != IGNORE_INDEX].tolist() == tok.encode(" A blue square.") + [tok.eos_id]
    assert labels[1][labels[1] != IGNORE_INDEX].tolist() == tok.encode(" Hi.") + [tok.eos_id]
    with pytest.raises(ValueError, match="either text= .* or conversations="):
        model.processor()


def test_saved_with_the_model_and_loaded_by_auto_processor(model, tmp_path, seed):
    from transformers import AutoProcessor

    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "processor_config.json").read_text())
    assert data["processor_class"] == "COMMProcessor" and data["num_image_tokens"] == model.num_image_tokens
    auto = AutoProcessor.from_pretrained(tmp_path / "m")
    direct = COMMProcessor.from_pretrained(tmp_path / "m")
    assert type(auto) is type(direct) is COMMProcessor and auto.to_dict() == model.processor.to_dict()
    ims = images(1, np.random.default_rng(seed))
    a, b = auto(text="What?", images=ims), model.processor(text="What?", images=ims)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert all(torch.equal(x, y) for x, y in zip(a["pixel_values"], b["pixel_values"]))
    auto.save_pretrained(tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == ["processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert COMMProcessor.from_pretrained(tmp_path / "p").to_dict() == auto.to_dict()
