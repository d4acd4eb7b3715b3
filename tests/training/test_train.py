"""comm-fast train end to end on the tiny preset: falling loss, metrics, exact resume with dropout, bad input,
split invariance (micro-batches x accumulation x processes, packed or padded), 2-process gloo DDP / FSDP2."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from comm_fast.cli import main as cli
from train_runs import (BASE, crash_after_checkpoint, max_difference, metrics, mixed_data, train, trainer_state,
                        weights)


def test_resume_with_dropout_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    """Dropout draws from torch's generator every step: a resumed run matches only if the RNG is restored."""
    a, b = tmp_path / "a", tmp_path / "b"
    run = ["--steps", "24", "--save-every", "8", "--dropout", "0.2"]
    assert train(a, *run) == 0
    full = metrics(a)
    assert [m["step"] for m in full] == list(range(1, 25))
    assert {"step", "loss", "lr", "tokens_per_s", "images_per_s"} <= set(full[0])
    assert full[-1]["loss"] < 0.8 * full[0]["loss"]  # it learns
    assert sorted(n for n in os.listdir(a) if n.startswith("checkpoint")) == [
        "checkpoint-16", "checkpoint-24", "checkpoint-8"]

    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 16)
        assert train(b, *run) == 1  # killed right after checkpoint-16
    assert [x["step"] for x in metrics(b)] == list(range(1, 17))
    os.makedirs(b / ".tmp-checkpoint-24")  # cut off mid-write: a temporary directory
    os.makedirs(b / "checkpoint-24")       # and a directory without its trainer state: both never loaded
    (b / "checkpoint-24" / "trainable.safetensors").write_bytes(b"partial")
    assert train(b, *run, "--resume") == 0
    resumed = metrics(b)
    assert [m["step"] for m in resumed] == list(range(1, 25))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]  # bit-exact on CPU, dropout included
    assert [m["lr"] for m in resumed] == [m["lr"] for m in full]
    assert max_difference(weights(a, 24), weights(b, 24)) == 0

    # the trained model answers through the generate command
    img = next(iter(sorted((a / "data-synthetic" / "images").iterdir())))
    assert cli(["generate", "--model", str(a / "model"), "--image", str(img), "--prompt",
                "Where is the red circle?", "--max-new-tokens", "4"]) == 0


def test_dropout_is_active_in_training_only():
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer
    from comm_fast.training.train import set_dropout

    model = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer())
    ids = torch.randint(0, 256, (2, 40))
    set_dropout(model, 0.3)
    model.train()
    assert not torch.equal(model(ids, labels=ids).loss, model(ids, labels=ids).loss)
    model.eval()
    assert torch.equal(model(ids, labels=ids).loss, model(ids, labels=ids).loss)


def test_a_checkpoint_without_its_rng_files_is_not_complete(tmp_path, capsys):
    from comm_fast.training import checkpoint

    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--save-every", "1") == 0
    assert checkpoint.latest_complete(str(out))[0].endswith("checkpoint-2")
    assert trainer_state(out, 2)["world_size"] == 1
    os.remove(out / "checkpoint-2" / "rng-rank0.pt")
    assert checkpoint.read_state(str(out / "checkpoint-2")) is None
    assert checkpoint.latest_complete(str(out))[0].endswith("checkpoint-1")
    os.remove(out / "checkpoint-1" / "rng-rank0.pt")
    assert train(out, "--steps", "2", "--save-every", "1", "--resume") == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


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


# -- split invariance: one global batch of 4 samples, cut every way -----------------------------------
SPLIT = ["--steps", "3", "--save-every", "3", "--lr", "2e-4"]
REFERENCE = ("padded", 4, 1)
TOLERANCE = 4e-6  # CPU fp32 rounding, amplified by Adam on near-zero gradients: 2e-7 to 1.2e-6 measured as the
                  # data and the encoders' init changed; a per-micro-batch mean, or attention across packed samples, 8e-4


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    return mixed_data(tmp_path_factory.mktemp("split") / "data")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, split_data):
    out = tmp_path_factory.mktemp("split") / "reference"
    kind, micro, accum = REFERENCE
    assert train(out, *SPLIT, "--data", str(split_data), "--no-pack", "--batch-size", str(micro),
                 "--grad-accum", str(accum)) == 0
    return out


PACKING = {"padded": ["--no-pack"], "packed": ["--pack"], "packed-rows": ["--pack", "--pack-length", "700"]}


@pytest.mark.parametrize("kind,micro,accum", [("padded", 2, 2), ("padded", 1, 4), ("packed", 4, 1),
                                              ("packed", 2, 2), ("packed", 1, 4), ("packed-rows", 4, 1)])
def test_the_split_of_a_global_batch_does_not_change_training(tmp_path, split_data, reference_run, kind, micro,
                                                              accum):
    """4 x 1, 2 x 2 and 1 x 4 (micro-batch x accumulation), padded, packed into one row per micro-batch, or
    packed into rows of 700 tokens (several samples and a padding tail per row): the same weights after
    3 steps, text-only samples included. The packed cases fail if attention crosses samples of a row."""
    out = tmp_path / "run"
    assert train(out, *SPLIT, "--data", str(split_data), *PACKING[kind], "--batch-size", str(micro),
                 "--grad-accum", str(accum)) == 0
    diff = max_difference(weights(out, 3), weights(reference_run, 3))
    print(f"split {kind} {micro}x{accum}: max weight difference {diff:.3g} against padded 4x1")
    assert diff <= TOLERANCE
    for x, y in zip(metrics(out), metrics(reference_run), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * y["loss"]


@pytest.mark.parametrize("engine,micro,accum,packing", [("ddp", 1, 2, "packed"), ("ddp", 2, 1, "padded"),
                                                        ("fsdp", 1, 2, "packed")])
def test_two_gloo_processes_equal_one_process(tmp_path, split_data, reference_run, engine, micro, accum, packing):
    """2 processes x (micro x accumulation) = the single-process global batch; text-only micro-batches
    included (a rank whose batch has no image still reduces the tower's grads)."""
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "comm_fast.cli", "train", *BASE, "--out", str(two), *SPLIT, "--data", str(split_data), *PACKING[packing],
           "--batch-size", str(micro), "--grad-accum", str(accum)]
    if engine == "fsdp":
        cmd += ["--fsdp", "--grad-checkpointing"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert trainer_state(two, 3)["world_size"] == 2
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(os.listdir(two / "checkpoint-3"))
    diff = max_difference(weights(two, 3), weights(reference_run, 3))
    print(f"split {engine} 2 x {micro}x{accum} {packing}: max weight difference {diff:.3g} against padded 4x1")
    assert diff <= TOLERANCE
    for x, y in zip(metrics(two), metrics(reference_run), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * y["loss"]


def test_train_from_local_llm_clip_dino_checkpoints(tmp_path):
    from hf_models import hf_clip, hf_dinov2, hf_llama_with_tokenizer

    from comm_fast import COMMForCausalLM

    hf_llama_with_tokenizer(tmp_path / "llm")
    hf_clip().save_pretrained(tmp_path / "clip")
    hf_dinov2().save_pretrained(tmp_path / "dino")
    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--llm", str(tmp_path / "llm"), "--clip", str(tmp_path / "clip"),
                 "--dino", str(tmp_path / "dino"), "--stage", "pretrain") == 0
    assert trainer_state(out, 2)["fingerprint"]["lr"] == 1e-3  # pretrained weights: LLaVA's rate, not tiny's
    model = COMMForCausalLM.from_pretrained(out / "model")
    assert model.tokenizer.kind == "hf" and model.config.image_token_id == model.tokenizer.vocab_size
    assert model.config.vision.clip["hidden_size"] == 64 and model.config.vision.out_dim == 64
    img = next(iter(sorted((out / "data-synthetic" / "images").iterdir())))
    assert cli(["generate", "--model", str(out / "model"), "--image", str(img), "--prompt", "Where?",
                "--max-new-tokens", "3"]) == 0


# -- what an interrupted-and-resumed run cannot see (it is broken the same way as the uninterrupted one) --
def _fake_checkpoint(out, step, files):
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(b"x")
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1, "data_position": 0}))
    return d


CHECKPOINT_FILES = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng-rank0.pt"]


def test_the_latest_checkpoint_is_the_highest_step_and_a_partial_one_is_skipped(tmp_path):
    from comm_fast.training import checkpoint

    for s in (8, 16, 100, 24):
        _fake_checkpoint(tmp_path / "run", s, CHECKPOINT_FILES)
    path, state = checkpoint.latest_complete(str(tmp_path / "run"))
    assert path.endswith("checkpoint-100") and state["step"] == 100  # by number, not by name
    for missing in CHECKPOINT_FILES:
        d = _fake_checkpoint(tmp_path / missing, 3, CHECKPOINT_FILES)
        os.remove(d / missing)
        assert checkpoint.read_state(str(d)) is None and checkpoint.latest_complete(str(tmp_path / missing)) is None


@pytest.mark.parametrize("ratio, steps, warmup", [(0.1, 20, 2), (0.03, 24, 1), (0.0, 10, 0), (0.25, 8, 2)])
def test_the_schedule_warms_up_then_follows_transformers_cosine_to_zero(ratio, steps, warmup):
    """Warm-up steps s < w at (s + 1) / (w + 1) of the peak; from w on, transformers'
    get_cosine_schedule_with_warmup to the step. A ratio > 0 warms up at least one step."""
    from transformers import get_cosine_schedule_with_warmup

    from comm_fast.training.train import make_optimizer

    p = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer, scheduler = make_optimizer([p], 1.0, 0.0, ratio, steps)
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                                warmup, steps)
    for s in range(steps):
        want = (s + 1) / (warmup + 1) if s < warmup else reference.lr_lambdas[0](s)
        assert scheduler.get_last_lr()[0] == pytest.approx(want, abs=1e-12), s
        p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_a_run_logs_the_schedules_learning_rates(tmp_path):
    out = tmp_path / "lr"
    assert train(out, "--steps", "6", "--lr", "1e-3", "--warmup-ratio", "0.34") == 0  # warm-up round(2.04) = 2
    # by hand: 1/3, 2/3, then 0.5 (1 + cos(pi k / 4)) for k = 0..3
    want = [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert [m["lr"] for m in metrics(out)] == pytest.approx([1e-3 * w for w in want], rel=1e-9)


def test_a_pretrain_run_trains_only_the_heads(tmp_path):
    out = tmp_path / "pre"
    assert train(out, "--stage", "pretrain", "--steps", "1") == 0
    names = set(weights(out, 1))
    assert names and not any(n.startswith("llm.") for n in names)
    assert trainer_state(out, 1)["fingerprint"]["tune_llm"] is False


def test_a_step_clips_the_update_to_max_grad_norm(tmp_path):
    """With SGD at lr 1 the update is the clipped gradient: its norm is min(|g|, c), and |g| unclipped."""
    from comm_fast.data.dataset import ConversationDataset, resolve_data
    from comm_fast.data.synthetic import make_synthetic
    from comm_fast.mllm import COMMForCausalLM
    from comm_fast.presets import get
    from comm_fast.training.train import TrainStep, configure_stage

    preset = get("tiny")
    model = COMMForCausalLM(preset.config(), preset.tokenizer())
    configure_stage(model, "finetune", None)
    data, folder = resolve_data(make_synthetic(tmp_path / "d", 4, seed=3), "finetune")
    dataset = ConversationDataset(data, folder, model.tokenizer, model.num_image_tokens, model.config.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    for clip in (1e-3, 0.0):
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=1.0)
        step = TrainStep(model, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                         dataset, "cpu", pack=False, pack_length=None, max_grad_norm=clip, micro_batch=2)
        logged = step([0, 1])["grad_norm"]  # the norm before clipping
        moved = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(params, before)))
        assert logged > 1e-2 and moved == pytest.approx(min(logged, clip) if clip else logged, rel=1e-3)
