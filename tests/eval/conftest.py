"""A tiny random COMM model saved to a temporary directory, images of several shapes, and writers of
annotation files, shared by the evaluation tests."""
import json
import os
import secrets

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer

    torch.manual_seed(int(os.environ.get("COMM_FAST_TEST_SEED", secrets.randbelow(2**31))))
    model = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer())
    with torch.no_grad():
        for name in model.vision.HEADS:  # random merge heads: answers that depend on the image
            for p in getattr(model.vision, name).parameters():
                p.add_(0.1 * torch.randn_like(p))
        for layer in model.llm.model.layers:  # sharp attention: at random init it averages the whole prompt
            layer.self_attn.q_proj.weight.mul_(8)  # (192 tokens of system prompt) and every answer is the same
            layer.self_attn.k_proj.weight.mul_(8)
        model.llm.lm_head.weight[128:] = 0  # ASCII answers: every other byte decodes to the same "\ufffd"
    path = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """{name: (width, height)} of PNGs in one folder (landscape, square, portrait), and the folder."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    sizes = {"wide.png": (64, 48), "square.png": (40, 40), "tall.png": (30, 60)}
    rng = np.random.default_rng(secrets.randbelow(2**31))
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return str(folder), sizes


def _write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture
def jsonl():
    """write(path, records) -> path: a JSON Lines file."""
    return _write_jsonl


@pytest.fixture
def pope_file(tmp_path, images):
    """A POPE question file of 6 questions over the three images (its name gives the split)."""
    names = sorted(images[1])
    records = [{"question_id": i, "image": names[i % 3], "text": f"Is there a {('cat', 'dog', 'bird')[i % 3]} in the "
                "image?", "label": "yes" if i % 2 else "no"} for i in range(6)]
    return _write_jsonl(tmp_path / "coco_pope_adversarial.json", records)
