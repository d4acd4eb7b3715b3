"""comm-fast train end to end on the tiny preset: falling loss, metrics, exact resume, bad input,
and 2-process gloo DDP / FSDP2 equal to one process at the same global batch."""
import json
import os
import subprocess
import sys

import pytest

from comm_fast.cli import main as cli

BASE = ["--preset", "tiny", "--data", "synthetic", "--synthetic-n", "16", "--batch-size", "2", "--threads", "1",
        "--no-progress", "--seed", "5"]


def train(out, *extra):
    return cli(["train", *BASE, "--out", str(out), *extra])


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, "--steps", "40", "--save-every", "10") == 0
    full = losses(a)
    assert [m["step"] for m in full] == list(range(1, 41))
    assert {"step", "loss", "lr", "tokens_per_s", "images_per_s"} <= set(full[0])
    assert full[-1]["loss"] < 0.7 * full[0]["loss"]  # it learns
    assert sorted(n for n in os.listdir(a) if n.startswith("checkpoint")) == [
        "checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]

    assert train(b, "--steps", "40", "--save-every", "10", "--stop-after", "20") == 0  # interrupted at 20
    os.makedirs(b / ".tmp-checkpoint-30")  # cut off mid-write: a temporary directory
    os.makedirs(b / "checkpoint-30")       # and a directory without its trainer state: both never loaded
    (b / "checkpoint-30" / "trainable.safetensors").write_bytes(b"partial")
    assert train(b, "--steps", "40", "--save-every", "10", "--resume") == 0
    resumed = losses(b)
    assert [m["step"] for m in resumed] == list(range(1, 41))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]  # bit-exact on CPU
    assert [m["lr"] for m in resumed] == [m["lr"] for m in full]

    # the trained model answers through the generate command
    img = next(iter(sorted((a / "data-synthetic" / "images").iterdir())))
    assert cli(["generate", "--model", str(a / "model"), "--image", str(img), "--prompt",
                "Where is the red circle?", "--max-new-tokens", "4"]) == 0


def test_bad_input_is_reported_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--resume") == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err and not out.exists()
    assert train(tmp_path / "x", "--steps", "2", "--data", str(tmp_path / "nope.json")) == 2
    assert "no such file or directory" in capsys.readouterr().err

    assert train(out, "--steps", "2", "--save-every", "1") == 0
    before = sorted(os.listdir(out))
    assert train(out, "--steps", "2") == 2  # would overwrite checkpoints
    assert "already holds checkpoints" in capsys.readouterr().err
    assert train(out, "--steps", "4", "--lr", "0.1", "--resume") == 2  # another config
    assert "another config (differs in: lr, steps)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    os.rename(out / "checkpoint-2", out / ".tmp-checkpoint-2")
    os.rename(out / "checkpoint-1", out / "checkpoint-x")
    assert train(out, "--steps", "2", "--resume") == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def mixed_data(directory, n=16):
    """The synthetic set with every other record text-only (as LLaVA's mix holds text-only dialogues)."""
    assert cli(["make-data", "synthetic", "--n", str(n), "--out", str(directory)]) == 0
    path = directory / "finetune.json"
    records = json.loads(path.read_text())
    for rec in records[1::2]:
        del rec["image"]
        rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
    path.write_text(json.dumps(records))
    return directory


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_process_gloo_run_equals_one_process(tmp_path, engine):
    """Text-only micro-batches included: a rank whose batch has no image still reduces the tower's grads."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--steps", "3", "--pack", "--save-every", "3", "--data", str(mixed_data(tmp_path / "data"))]
    assert train(one, *common, "--grad-accum", "2") == 0  # same global batch: 2 x 2 samples
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "comm_fast.cli", "train", *BASE, "--out", str(two), *common]
    if engine == "fsdp":
        cmd += ["--fsdp", "--grad-checkpointing"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 3
    assert all(abs(x["loss"] - y["loss"]) <= 1e-5 for x, y in zip(a, b)), (a, b)

    from safetensors.torch import load_file
    wa = load_file(str(one / "checkpoint-3" / "trainable.safetensors"))
    wb = load_file(str(two / "checkpoint-3" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def _hf_llama_with_tokenizer(directory):
    """A random tiny Llama and a BPE tokenizer trained on the spot (no network), saved like a Vicuna dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from comm_fast.data.conversation import SYSTEM

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [SYSTEM, "USER: ASSISTANT: Where is the red circle? Answer with a box. [0.123,0.456,0.789,0.912]",
              "A blue square and a green triangle on a striped background. What is at"]
    bpe.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(directory)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(directory)


def test_train_from_local_llm_clip_dino_checkpoints(tmp_path):
    from hf_models import hf_clip, hf_dinov2

    from comm_fast import COMMForCausalLM

    _hf_llama_with_tokenizer(tmp_path / "llm")
    hf_clip().save_pretrained(tmp_path / "clip")
    hf_dinov2().save_pretrained(tmp_path / "dino")
    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--llm", str(tmp_path / "llm"), "--clip", str(tmp_path / "clip"),
                 "--dino", str(tmp_path / "dino"), "--stage", "pretrain") == 0
    model = COMMForCausalLM.from_pretrained(out / "model")
    assert model.tokenizer.kind == "hf" and model.config.image_token_id == model.tokenizer.vocab_size
    assert model.config.vision.clip["hidden_size"] == 64 and model.config.vision.out_dim == 64
    img = next(iter(sorted((out / "data-synthetic" / "images").iterdir())))
    assert cli(["generate", "--model", str(out / "model"), "--image", str(img), "--prompt", "Where?",
                "--max-new-tokens", "3"]) == 0
