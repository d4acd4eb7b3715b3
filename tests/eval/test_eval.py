"""Evaluation end to end on a tiny random model saved to a temporary directory: batched answers equal
one-at-a-time answers, the files written, rescoring them, and two gloo ranks."""
import json
import os
import warnings

import pytest
import torch

from comm_fast import COMMForCausalLM
from comm_fast.cli import main
from comm_fast.eval import evaluate
from comm_fast.eval.run import PREDICTIONS, answer, load_items, yes_no_ids


def test_a_batch_answers_as_one_prompt_at_a_time(model_dir, images, pope_file):
    """Left-padded batches with the KV cache give each prompt the answer it gets alone. float64, so that
    the padded and unpadded paths' rounding (~1e-7 in fp32) cannot flip a greedy pick on a near-tie."""
    folder, _ = images
    model = COMMForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    items = load_items("pope", pope_file, folder)[0][:4]
    assert len({len(it.prompt) for it in items}) > 1  # prompts of different lengths: the batch is padded
    yes_no = yes_no_ids(model.tokenizer)
    batched, _ = answer(model, items, batch_size=3, max_new_tokens=5, yes_no=yes_no, progress=False)
    single, _ = answer(model, items, batch_size=1, max_new_tokens=5, yes_no=yes_no, progress=False)
    assert [r["answer"] for r in batched] == [r["answer"] for r in single]
    assert [r["p_yes"] for r in batched] == pytest.approx([r["p_yes"] for r in single], abs=1e-9)
    assert len({r["answer"] for r in single}) > 1  # answers that depend on the question and image
    # the same as the model's own one-prompt generate
    from comm_fast.data.dataset import load_images

    for it, row in list(zip(items, batched))[:1]:
        assert model.generate(images=load_images([it.image]), prompt=it.prompt, max_new_tokens=5) == row["answer"]


def test_cli_writes_predictions_and_metrics_and_rescores_them(model_dir, images, tmp_path, jsonl, capsys):
    folder, sizes = images
    recs = [{"img_path": name, "expression": f"the thing {k}", "bbox": [2, 3, w - 1, h - 2], "height": h, "width": w,
             "id": f"r{k}"} for k, (name, (w, h)) in enumerate(sorted(sizes.items()))]
    data = jsonl(tmp_path / "rec_val.jsonl", recs)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["eval", "--model", model_dir, "--task", "rec", "--data", data, "--image-folder", folder,
                   "--batch-size", "2", "--out", str(out), "--max-new-tokens", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    # the model pads (the default): no warning about its non-square images, and metrics say so
    assert json.load(open(os.path.join(model_dir, "config.json")))["vision"]["aspect"] == "pad"
    assert not any("not 'pad'" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert json.loads((out / "metrics.json").read_text())["image_aspect"] == "pad"
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]  # the annotation order
    assert set(rows[0]) >= {"id", "prompt", "answer", "parsed", "score", "target", "iou"}
    assert metrics["num_items"] == 3 and metrics["splits"].keys() == {"rec_val"}
    assert metrics["overall"]["parse_failure_rate"] == sum(r["parsed"] is None for r in rows) / 3
    # targets normalised to the padded square: tall.png (30 x 60) pads 15 columns each side
    tall = next(r for r in rows if r["image"].endswith("tall.png"))
    assert tall["target"] == pytest.approx([(2 + 15) / 60, 3 / 60, (29 + 15) / 60, 58 / 60])
    # rescoring after changing two answers: one exact box (IoU 1), one box of IoU 0 -> Acc@0.5 at least 1/3
    rows[0]["answer"] = json.dumps(rows[0]["target"])
    rows[1]["answer"] = "[0.0, 0.0, 0.01, 0.01]"
    rows[2]["answer"] = "not a box"
    (out / PREDICTIONS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--predictions", str(out / PREDICTIONS)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["overall"] == pytest.approx({"n": 3, "acc@0.5": 1 / 3, "mean_iou": 1 / 3, "parse_failure_rate": 1 / 3})
    assert "acc@0.5" in capsys.readouterr().out


def test_two_gloo_ranks_shard_and_gather(model_dir, images, pope_file, tmp_path):
    """``comm-fast eval`` as torchrun starts it, in two CPU processes (gloo): each answers its shard, the
    rows come back in the file's order, and only rank 0 writes."""
    import socket
    import subprocess
    import sys

    folder, _ = images
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "comm_fast.cli", "eval", "--model", model_dir, "--task", "pope", "--data", pope_file,
           "--image-folder", folder, "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out), "--no-progress"]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["num_items"] == 6 and metrics["overall"]["n"] == 6
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    records = [json.loads(line) for line in open(pope_file)]
    assert [r["id"] for r in rows] == [q["question_id"] for q in records]  # the file's order
    assert all(r["prompt"].startswith(q["text"]) and r["target"] == q["label"] for r, q in zip(rows, records))
    assert "wrote" in logs[0] and "wrote" not in logs[1]  # rank 0 reports and writes


@pytest.mark.gpu
def test_on_cuda(model_dir, images, pope_file, tmp_path):
    """On a GPU: the saved model loads there in bf16 and answers every item; in fp32 a batch gives each
    prompt the first-token probabilities it gets alone (to 1e-3: Triton's fp32 dots may use TF32)."""
    folder, _ = images
    metrics = evaluate(model_dir, "pope", pope_file, folder, batch_size=4, out=str(tmp_path / "out"),
                       max_new_tokens=4, pope_rule="prismatic", progress=False)
    assert metrics["num_items"] == 6 and metrics["overall"]["n"] == 6
    rows = [json.loads(line) for line in (tmp_path / "out" / PREDICTIONS).read_text().splitlines()]
    assert all(0.0 <= r["p_yes"] <= 1.0 for r in rows)
    model = COMMForCausalLM.from_pretrained(model_dir).to("cuda").eval()
    items = load_items("pope", pope_file, folder)[0]
    yes_no = yes_no_ids(model.tokenizer)
    batched, _ = answer(model, items, batch_size=4, max_new_tokens=2, yes_no=yes_no, progress=False)
    single, _ = answer(model, items, batch_size=1, max_new_tokens=2, yes_no=yes_no, progress=False)
    assert [r["p_yes"] for r in batched] == pytest.approx([r["p_yes"] for r in single], abs=1e-3)


def test_a_model_saved_before_the_aspect_field_is_evaluated_as_cropping(model_dir, images, tmp_path, jsonl):
    """A config.json without vision.aspect (saved before the field) loads as "crop", what such a model was
    trained with; its boxes of non-square images are warned about and metrics.json records it."""
    import shutil

    folder, sizes = images
    old = tmp_path / "old-model"
    shutil.copytree(model_dir, old)
    config = json.load(open(old / "config.json"))
    del config["vision"]["aspect"]
    (old / "config.json").write_text(json.dumps(config))
    recs = [{"img_path": name, "expression": "the thing", "bbox": [2, 3, w - 1, h - 2], "height": h, "width": w}
            for name, (w, h) in sorted(sizes.items())]
    with pytest.warns(UserWarning, match="aspect='crop', not 'pad'"):
        metrics = evaluate(str(old), "rec", jsonl(tmp_path / "rec.jsonl", recs), folder, max_new_tokens=2,
                           progress=False)
    assert metrics["image_aspect"] == "crop"


def test_p_yes_is_the_first_tokens_yes_against_no(images, pope_file):
    """Prismatic's rule on a stand-in model whose first-step logits are 2 for "Y", 0 for "N" and 5 for "a":
    p_yes = e^2 / (e^2 + e^0) = 0.8808 (the other token, and later steps, do not count), and "yes" although the
    text says No."""
    import math
    import types

    from comm_fast.data import ByteTokenizer
    from comm_fast.eval.run import score_rows

    tok = ByteTokenizer()

    class StandIn:
        tokenizer = tok

        def prompt_inputs(self, prompts):
            return torch.ones(len(prompts), 3, dtype=torch.long), torch.ones(len(prompts), 3, dtype=torch.long)

        def generate(self, input_ids, images, **kwargs):
            assert len(images) == len(input_ids)
            logits = torch.zeros(len(input_ids), tok.vocab_size)
            logits[:, ord("Y")], logits[:, ord("a")] = 2.0, 5.0
            later = torch.zeros(len(input_ids), tok.vocab_size)
            later[:, ord("N")] = 9.0  # the second step's scores: not the answer's first token
            seq = torch.tensor([[ord("N"), ord("o"), tok.eos_id, ord("x")]] * len(input_ids))
            return types.SimpleNamespace(sequences=seq, scores=[logits, later])

    items = load_items("pope", pope_file, images[0])[0][:3]
    assert yes_no_ids(tok) == (ord("Y"), ord("N"))
    rows, bad = answer(StandIn(), items, batch_size=2, yes_no=yes_no_ids(tok), progress=False)
    assert bad == [] and [r["answer"] for r in rows] == ["No"] * 3  # cut at </s>
    assert [r["p_yes"] for r in rows] == pytest.approx([math.exp(2) / (math.exp(2) + 1)] * 3, abs=1e-6)
    score_rows("pope", rows, "prismatic")
    assert [r["parsed"] for r in rows] == ["yes"] * 3


def test_limit_takes_the_first_items(model_dir, images, pope_file, tmp_path):
    metrics = evaluate(model_dir, "pope", pope_file, images[0], limit=2, out=str(tmp_path / "out"), max_new_tokens=2,
                       progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / PREDICTIONS).read_text().splitlines()]
    assert metrics["num_items"] == 2 and [r["id"] for r in rows] == [0, 1]


def test_only_rank_zero_writes(model_dir, images, pope_file, tmp_path, monkeypatch):
    """Rank 1 of two (the gather stood in for: both ranks' rows are rank 1's) scores but writes nothing."""
    from comm_fast.eval import run

    monkeypatch.setattr(run, "rank_world", lambda: (1, 2))
    monkeypatch.setattr(run, "gather", lambda obj: [obj, obj])
    metrics = evaluate(model_dir, "pope", pope_file, images[0], out=str(tmp_path / "out"), max_new_tokens=2,
                       progress=False)
    assert metrics["world_size"] == 2 and metrics["num_items"] == 6  # rank 1's 3 items, twice
    assert not (tmp_path / "out").exists()
