"""LoRA through PEFT on the tiny preset: what trains (adapters and heads only, the base LLM bit-identical),
what a checkpoint holds (the adapter, no frozen LLM weight), exact resume, merge-lora (W + alpha/r B A, the
merged model's logits equal the adapted one's), QLoRA's refusal, and bad input named by its flag."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comm_fast.cli import main as cli
from train_runs import BASE, crash_after_checkpoint, max_difference, metrics, train, trainer_state

R, ALPHA = 4, 12.0
LORA = ["--lora-r", str(R), "--lora-alpha", str(ALPHA), "--dropout", "0.1"]  # attention and LoRA dropout: RNG
RUN = ["--steps", "6", "--save-every", "3", *LORA]


def _tiny(r=R, alpha=ALPHA, targets=None):
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer
    from comm_fast.training import lora

    model = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer())
    lora.apply(model, {"r": r, "alpha": alpha, "dropout": 0.0, "targets": list(targets or lora.TARGETS)})
    return model


def _batch(model, n=2, length=24):
    """Rows with one <image> each (expanded by the model) and their pixels."""
    ids = torch.randint(0, 250, (n, length))
    ids[:, 1] = model.config.image_token_id
    size = model.config.vision.clip_image_size
    return ids, (torch.randn(n, 3, size, size), torch.randn(n, 3, size, size))


def test_only_the_adapters_and_heads_train_and_the_base_llm_stays_bit_identical(seed):
    from comm_fast.training.train import configure_stage, make_optimizer

    model = _tiny()
    trainable = configure_stage(model, "finetune", None)
    layers = model.config.text["num_hidden_layers"]
    adapters = {f"llm.model.layers.{i}.{block}.{t}.lora_{ab}.default.weight" for i in range(layers)
                for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     ("mlp", ("gate_proj", "up_proj", "down_proj"))) for t in names for ab in "AB"}
    heads = {n for n, _ in model.named_parameters() if any(n.startswith(f"vision.{h}.") for h in model.vision.HEADS)}
    assert heads and trainable == adapters | heads
    assert "llm.lm_head.weight" not in trainable  # the chunked loss reads it directly

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    optimizer, _ = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-3, 0.0, 0.0, 3)
    ids, pixels = _batch(model)
    model.train()
    for _ in range(3):
        model(ids, pixel_values=pixels, labels=ids, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in frozen.items())  # base LLM and encoders: bit-identical
    unmoved = [n for n, w in start.items() if torch.equal(after[n], w)]
    assert not unmoved, unmoved[:4]


# -- a LoRA run through the CLI -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert train(out, *RUN) == 0
    return out


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_a_checkpoint_holds_the_adapter_and_the_heads_and_no_frozen_llm_weight(lora_run):
    ckpt = lora_run / "checkpoint-6"
    adapter = _keys(ckpt / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in adapter)
    assert all(k.startswith("vision.") for k in _keys(ckpt / "trainable.safetensors"))
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")
    assert trainer_state(lora_run, 6)["fingerprint"]["lora"]["r"] == R
    # the final adapter directory: the same files as the last checkpoint's, the same weights; no plain model
    final = lora_run / "adapter"
    assert not (lora_run / "model").exists()
    for name in ("adapter_model.safetensors", "trainable.safetensors"):
        a, b = load_file(final / name), load_file(ckpt / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # far smaller than the LLM: what is saved is the adapter and heads, 4 bytes a parameter
    from comm_fast.training import lora

    base = lora.build_base(json.loads((ckpt / "lora.json").read_text()))
    llm_params = sum(p.numel() for p in base.llm.parameters())
    saved = sum(v.numel() for v in load_file(ckpt / "adapter_model.safetensors").values())
    assert saved < 0.2 * llm_params
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 4 * saved + 20_000


def test_a_resumed_lora_run_reproduces_the_uninterrupted_one(lora_run, tmp_path, monkeypatch, capsys):
    b = tmp_path / "b"
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 3)
        assert train(b, *RUN) == 1
    assert train(b, *RUN, "--resume") == 0
    assert [x["loss"] for x in metrics(b)] == [x["loss"] for x in metrics(lora_run)]  # bit-exact on CPU
    for name in ("adapter_model.safetensors", "trainable.safetensors"):
        x, y = load_file(lora_run / "checkpoint-6" / name), load_file(b / "checkpoint-6" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # another LoRA config does not continue this run
    assert train(b, *RUN, "--lora-r", "8", "--resume") == 2
    assert "another config (differs in: lora)" in capsys.readouterr().err


def test_merge_lora_writes_a_plain_model_with_the_adapted_logits(lora_run, tmp_path, seed):
    from comm_fast import COMMForCausalLM
    from comm_fast.training import lora

    out = tmp_path / "merged"
    assert cli(["merge-lora", "--model", str(lora_run / "adapter"), "--out", str(out)]) == 0
    keys = _keys(out / "model.safetensors")
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    merged = COMMForCausalLM.from_pretrained(out).eval()
    adapted = lora.load(str(lora_run / "adapter"))
    base = lora.build_base(json.loads((lora_run / "adapter" / "lora.json").read_text())).eval()

    # the merged weight is W + alpha/r B A (the scaling from the flags, not from the saved config)
    saved = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    name = "model.layers.1.self_attn.v_proj"
    a, b = saved[f"base_model.model.{name}.lora_A.weight"], saved[f"base_model.model.{name}.lora_B.weight"]
    w0 = base.llm.get_submodule(name).weight.detach().double()
    expected = w0 + (ALPHA / R) * b.double() @ a.double()
    got = merged.llm.get_submodule(name).weight.detach().double()
    assert (b != 0).any() and (got - w0).abs().max() > 1e-4  # trained: the update is not nothing
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    heads = load_file(lora_run / "adapter" / "trainable.safetensors")
    sd = merged.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in heads.items())

    _assert_same_logits(merged, adapted, base)


def _assert_same_logits(merged, adapted, base):
    """fp32: the merged model's logits equal the adapted one's (and differ from the base's: it learnt)."""
    ids, pixels = _batch(merged)
    with torch.no_grad():
        want = adapted(ids, pixel_values=pixels).logits
        diff = (merged(ids, pixel_values=pixels).logits - want).abs().max().item()
        moved = (base(ids, pixel_values=pixels).logits - want).abs().max().item()
    print(f"merged vs adapted logits: max |diff| {diff:.3g} (base vs adapted {moved:.3g})")
    assert diff <= 1e-5 and moved > 1e-4


def test_a_lora_run_on_a_saved_model_merges_onto_it_and_asks_for_it_once_moved(tmp_path, capsys):
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer
    from comm_fast.training import lora

    base = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer())
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    assert train(out, "--model", str(tmp_path / "base"), "--steps", "2", "--save-every", "2", "--lora-r", "4") == 0
    adapter = out / "adapter"
    assert json.loads((adapter / "lora.json").read_text())["base"]["model"] == str(tmp_path / "base")
    os.rename(tmp_path / "base", tmp_path / "moved")
    assert cli(["merge-lora", "--model", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    assert f"its base model {tmp_path / 'base'} (the run's --model) is not there any more; pass --base" in (
        capsys.readouterr().err)
    assert cli(["merge-lora", "--model", str(adapter), "--base", str(tmp_path / "moved"),
                "--out", str(tmp_path / "merged")]) == 0
    _assert_same_logits(COMMForCausalLM.from_pretrained(tmp_path / "merged").eval(),
                        lora.load(str(adapter), base=str(tmp_path / "moved")), base.eval())


def test_a_lora_run_on_local_llm_clip_dino_checkpoints_merges(tmp_path):
    """Pretrained weights: LLaVA's LoRA rate by default; the base is assembled again from the three directories."""
    from hf_models import hf_clip, hf_dinov2, hf_llama_with_tokenizer

    from comm_fast import COMMForCausalLM
    from comm_fast.training import lora

    hf_llama_with_tokenizer(tmp_path / "llm")
    hf_clip().save_pretrained(tmp_path / "clip")
    hf_dinov2().save_pretrained(tmp_path / "dino")
    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--save-every", "2", "--lora-r", "4", "--llm",
                 str(tmp_path / "llm"), "--clip", str(tmp_path / "clip"), "--dino", str(tmp_path / "dino")) == 0
    assert trainer_state(out, 2)["fingerprint"]["lr"] == lora.LORA_LR
    info = json.loads((out / "adapter" / "lora.json").read_text())
    assert info["base"]["llm"] == str(tmp_path / "llm") and info["base"]["model"] is None
    assert cli(["merge-lora", "--model", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = COMMForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.tokenizer.kind == "hf"
    _assert_same_logits(merged, lora.load(str(out / "adapter")), lora.build_base(info).eval())


def test_two_gloo_processes_under_fsdp2_train_the_adapter_as_one_process(tmp_path):
    """FSDP2 shards decoder layers that hold frozen base weights and trainable adapters side by side; 2
    processes x 1 sample = 1 process x 2 (LoRA dropout off: each rank draws its own stream)."""
    run = ["--steps", "3", "--save-every", "3", "--lora-r", "8", "--lora-dropout", "0", "--no-pack"]
    assert train(tmp_path / "one", *run, "--batch-size", "2") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "comm_fast.cli", "train", *BASE, "--out", str(tmp_path / "two"), *run, "--batch-size", "1", "--fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("adapter_model.safetensors", "trainable.safetensors"):
        diff = max_difference(load_file(tmp_path / "one" / "checkpoint-3" / name),
                              load_file(tmp_path / "two" / "checkpoint-3" / name))
        print(f"FSDP2 2 x 1 vs 1 x 2, {name}: max difference {diff:.3g}")
        assert diff <= 1e-5  # 1e-6 measured (lr 2e-3); gradients of one rank only: 1e-3


@pytest.mark.gpu
def test_qlora_trains_adapters_on_a_4bit_llm_on_cuda(tmp_path):
    """QLoRA's path on CUDA with bitsandbytes (NF4 base, bf16 compute); written for it, not run where this was
    built (no GPU, no bitsandbytes)."""
    bnb = pytest.importorskip("bitsandbytes")
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer
    from comm_fast.training import lora

    model = COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer())
    lora.apply(model, {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": list(lora.TARGETS), "bits": 4}, "cuda")
    model.cuda()
    assert isinstance(model.llm.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ids, pixels = _batch(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids.cuda(), pixel_values=tuple(x.cuda() for x in pixels), labels=ids.cuda(),
                     return_logits=False).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if lora.is_adapter_param(n)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    out = tmp_path / "run"
    assert train(out, "--steps", "4", "--save-every", "4", "--lora-r", "8", "--lora-bits", "4") == 0
    assert all(math.isfinite(m["loss"]) for m in metrics(out))
    assert all(".lora_" in k for k in _keys(out / "adapter" / "adapter_model.safetensors"))
    assert cli(["merge-lora", "--model", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0


# -- refusals -----------------------------------------------------------------------------------------
def test_qlora_is_refused_without_bitsandbytes_and_without_cuda(tmp_path, monkeypatch, capsys):
    import importlib.util

    from comm_fast.training import lora

    real = importlib.util.find_spec

    def bitsandbytes(spec):
        return lambda name, *a: spec if name == "bitsandbytes" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", bitsandbytes(None))
    out = tmp_path / "run"
    assert train(out, "--steps", "1", "--lora", "--lora-bits", "4") == 2
    assert "--lora-bits 4: QLoRA needs bitsandbytes, which is not installed" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(importlib.util, "find_spec", bitsandbytes(object()))
    with pytest.raises(ValueError, match=r"--lora-bits 4: QLoRA needs a CUDA device .* this run is on cpu"):
        lora.check_bits(4, "cpu")


BAD = [
    (["--lora-r", "0"], "argument --lora-r: expected a positive integer, got 0"),
    (["--lora", "--lora-dropout", "1"], "argument --lora-dropout: expected a number in [0, 1), got 1"),
    (["--lora", "--lora-dropout", "-0.1"], "argument --lora-dropout: expected a number in [0, 1), got -0.1"),
    (["--lora", "--lora-alpha", "0"], "argument --lora-alpha: expected a positive number, got 0"),
    (["--lora", "--lora-bits", "8"], "argument --lora-bits: invalid choice: 8 (choose from 4)"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_lora_values_are_refused_by_argparse(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train(tmp_path / "run", *flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


REFUSED = [
    (["--lora", "--lora-targets", "q_proj", "qkv"],
     "--lora-targets: expected names of the LLM's linear layers (down_proj, gate_proj, k_proj, o_proj, q_proj, "
     "up_proj, v_proj), got 'qkv'"),
    (["--lora", "--lora-targets", "lm_head"], "--lora-targets: lm_head is not adapted"),
    (["--lora", "--stage", "pretrain"], "--lora: expected --stage finetune (or --tune-llm)"),
    (["--lora-r", "8", "--no-tune-llm"], "--lora: LoRA adapts the LLM, but --no-tune-llm freezes it"),
    (["--lora-alpha", "8"], "--lora-alpha: a LoRA option, expected with --lora or --lora-r (LoRA is off)"),
    (["--lora-targets", "q_proj"], "--lora-targets: a LoRA option, expected with --lora or --lora-r"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_bad_lora_options_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert train(out, "--steps", "1", *flags) == 2
    assert f"comm-fast train: error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_merge_lora_refuses_a_directory_without_an_adapter_and_another_base(lora_run, tmp_path, capsys):
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer

    plain = tmp_path / "plain"
    COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).save_pretrained(plain)  # another random init
    assert cli(["merge-lora", "--model", str(plain), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"--model: {plain} holds no LoRA adapter" in err and "missing adapter_config.json" in err
    assert "a plain model directory already" in err
    assert cli(["merge-lora", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert "--model: no such directory" in capsys.readouterr().err
    assert cli(["merge-lora", "--model", str(lora_run / "adapter"), "--base", str(plain),
                "--out", str(tmp_path / "m")]) == 2
    assert "is not the one the adapter was trained on" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
