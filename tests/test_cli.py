"""The comm-fast command line: typed arguments with clear messages, no `or`-defaults, defaults taken from
a loaded model, failures in the middle of a run (exit 1, traceback, nothing half-written), resume with
explicit flags equal to the defaults, no hidden flags, generate's device / dtype / temperature."""
import argparse
import importlib
import os

import pytest
import torch

from comm_fast.cli import COMMANDS
from comm_fast.cli import main as cli
from train_runs import Crash, crash_after_checkpoint, metrics, train, trainer_state

BAD_VALUES = [
    ("train", "--save-every", "0", "expected a positive integer, got 0"),
    ("train", "--steps", "-1", "expected a positive integer, got -1"),
    ("train", "--batch-size", "0", "expected a positive integer, got 0"),
    ("train", "--grad-accum", "0", "expected a positive integer, got 0"),
    ("train", "--pack-length", "-8", "expected a positive integer, got -8"),
    ("train", "--max-length", "-1", "expected a positive integer, got -1"),
    ("train", "--synthetic-n", "-3", "expected a positive integer, got -3"),
    ("train", "--threads", "0", "expected a positive integer, got 0"),
    ("train", "--warmup-ratio", "-0.1", "expected a number in [0, 1], got -0.1"),
    ("train", "--warmup-ratio", "1.5", "expected a number in [0, 1], got 1.5"),
    ("train", "--dropout", "2", "expected a number in [0, 1], got 2"),
    ("train", "--lr", "-0.001", "expected a non-negative number, got -0.001"),
    ("train", "--lr", "abc", "expected a non-negative number, got 'abc'"),
    ("train", "--weight-decay", "-1", "expected a non-negative number, got -1"),
    ("train", "--max-grad-norm", "nan", "expected a non-negative number, got nan"),
    ("profile-train", "--steps", "0", "expected a positive integer, got 0"),
    ("profile-train", "--warmup", "-1", "expected a non-negative integer, got -1"),
    ("profile-train", "--batch-size", "0", "expected a positive integer, got 0"),
    ("generate", "--max-new-tokens", "0", "expected a positive integer, got 0"),
    ("generate", "--temperature", "0", "expected a positive number, got 0"),
    ("make-data", "--n", "0", "expected a positive integer, got 0"),
    ("make-data", "--size", "0", "expected a positive integer, got 0"),
    ("generate", "--temperature", "inf", "expected a positive number, got inf"),
    ("generate", "--num-beams", "0", "expected a positive integer, got 0"),
    ("train", "--lr", "inf", "expected a non-negative number, got inf"),
    ("train", "--warmup-ratio", "1e1", "expected a number in [0, 1], got 1e1"),  # the text as typed
]


@pytest.mark.parametrize("command,flag,value,message", BAD_VALUES, ids=[f"{c} {f} {v}" for c, f, v, _ in BAD_VALUES])
def test_bad_values_are_refused_by_name(command, flag, value, message, capsys, tmp_path):
    required = {"generate": ["--model", "m", "--prompt", "p"], "make-data": ["synthetic", "--out", str(tmp_path)]}
    with pytest.raises(SystemExit) as exc:
        cli([command, *required.get(command, []), flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: {message}\n" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_range_ends_are_accepted():
    import argparse

    from comm_fast.training.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert [parser.parse_args(["--warmup-ratio", v]).warmup_ratio for v in ("0", "1")] == [0.0, 1.0]


def test_generate_refuses_a_device_and_an_image_it_cannot_use(tmp_path, capsys):
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer

    assert cli(["generate", "--model", "m", "--prompt", "p", "--device", "meta"]) == 2
    assert "--device: expected cpu, cuda or cuda:N, got 'meta'" in capsys.readouterr().err
    COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).save_pretrained(tmp_path / "m")
    (tmp_path / "x.png").write_text("not an image")
    assert cli(["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--prompt", "hi",
                "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "comm-fast generate: error:" in err and "x.png" in err and "Traceback" not in err


def test_lr_zero_is_honoured(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--lr", "0", "--save-every", "2") == 0
    assert trainer_state(out, 2)["fingerprint"]["lr"] == 0.0
    assert all(m["lr"] == 0.0 for m in metrics(out))


def _threads_in_the_step(monkeypatch) -> list[int]:
    from comm_fast.training.train import TrainStep

    seen, real = [], TrainStep.__call__

    def call(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", call)
    return seen


def test_defaults_come_from_the_loaded_model(tmp_path, monkeypatch):
    """--model: the defaults of the preset the model was built from, and for a model of no preset the
    defaults of pretrained weights (LLaVA's rates, torch's threads), never the tiny preset's."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_defaults(tmp_path, _threads_in_the_step(monkeypatch))
    finally:
        torch.set_num_threads(before)


def _check_defaults(tmp_path, seen):
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer

    base = ["--data", "synthetic", "--synthetic-n", "8", "--batch-size", "2", "--no-progress", "--steps", "1"]
    config = COMMConfig.preset("tiny")
    config.text["num_hidden_layers"] = 2  # a shape of no preset
    COMMForCausalLM(config, ByteTokenizer()).save_pretrained(tmp_path / "other")
    assert train(tmp_path / "a", "--model", str(tmp_path / "other"), "--stage", "pretrain", base=base) == 0
    assert trainer_state(tmp_path / "a", 1)["fingerprint"]["lr"] == 1e-3
    assert seen == [2]

    COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).save_pretrained(tmp_path / "tiny")
    assert train(tmp_path / "b", "--model", str(tmp_path / "tiny"), "--stage", "finetune", base=base) == 0
    assert trainer_state(tmp_path / "b", 1)["fingerprint"]["lr"] == 2e-3  # the tiny preset's own
    assert seen == [2, 1]
    assert torch.get_num_threads() == 2  # restored after the run

    # an explicit --preset names the defaults to take (the model keeps its shape)
    assert train(tmp_path / "c", "--model", str(tmp_path / "tiny"), "--preset", "1b", base=base) == 0
    assert trainer_state(tmp_path / "c", 1)["fingerprint"]["lr"] == 2e-5
    assert trainer_state(tmp_path / "c", 1)["fingerprint"]["model"]["text"]["hidden_size"] == 128
    assert seen == [2, 1, 2]


def test_a_failure_mid_run_exits_1_with_its_traceback_and_leaves_only_whole_files(tmp_path, monkeypatch, capsys):
    from comm_fast.training import train as train_module

    real, calls = train_module.preprocess, []

    def preprocess(paths, vision_config):
        calls.append(1)
        if len(calls) == 3:  # the first micro-batch of step 2 (two per step)
            raise ValueError("image decoder broke")
        return real(paths, vision_config)

    monkeypatch.setattr(train_module, "preprocess", preprocess)
    out = tmp_path / "run"
    assert train(out, "--steps", "3", "--save-every", "1", "--grad-accum", "2", "--batch-size", "1") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: image decoder broke" in err
    assert "step 2 of 3 failed (ValueError: image decoder broke)" in err and "checkpoint-1" in err
    assert "--resume" in err
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]  # no .tmp- left
    assert "model" not in os.listdir(out)
    assert [m["step"] for m in metrics(out)] == [1]


def test_a_failure_while_checkpointing_leaves_no_temporary_directory(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("comm_fast._io.save_safetensors", broken)
    out = tmp_path / "run"
    assert train(out, "--steps", "1") == 1
    assert "writing checkpoint-1 failed (OSError: disk full); no checkpoint was written" in capsys.readouterr().err
    assert not [n for n in os.listdir(out) if "checkpoint" in n]


def test_an_explicit_flag_equal_to_the_default_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run = ["--stage", "pretrain", "--steps", "2", "--save-every", "1"]
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 1)
        assert train(out, *run) == 1
    assert train(out, *run, "--no-tune-llm", "--no-pack", "--resume") == 2  # --no-pack differs: on by default
    assert "differs in: pack" in capsys.readouterr().err
    assert train(out, *run, "--tune-llm", "--resume") == 2
    assert "differs in: tune_llm" in capsys.readouterr().err
    assert train(out, *run, "--no-tune-llm", "--pack", "--warmup-ratio", "0.03", "--resume") == 0
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_no_hidden_flags_in_the_production_parsers():
    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        hidden = [a.option_strings for a in parser._actions if a.help == argparse.SUPPRESS]
        assert not hidden, (name, hidden)


# -- generate ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from comm_fast import COMMConfig, COMMForCausalLM
    from comm_fast.data import ByteTokenizer

    path = tmp_path_factory.mktemp("gen") / "model"
    COMMForCausalLM(COMMConfig.preset("tiny"), ByteTokenizer()).save_pretrained(path)
    return path


@pytest.fixture
def captured_generate(monkeypatch):
    from comm_fast.mllm import COMMForCausalLM

    seen = {}

    def generate(self, **kwargs):
        w = self.llm.get_input_embeddings().weight
        seen.update(kwargs, dtype=w.dtype, device=w.device.type, tower_dtype=self.vision.projector.weight.dtype)
        return "ok"

    monkeypatch.setattr(COMMForCausalLM, "generate", generate)
    return seen


def test_generate_device_and_dtype(saved_model, captured_generate, capsys):
    assert cli(["generate", "--model", str(saved_model), "--prompt", "hi", "--device", "cpu", "--dtype",
                "bfloat16"]) == 0
    assert captured_generate["dtype"] == captured_generate["tower_dtype"] == torch.bfloat16
    assert captured_generate["device"] == "cpu"
    assert cli(["generate", "--model", str(saved_model), "--prompt", "hi"]) == 0
    assert captured_generate["dtype"] == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if not torch.cuda.is_available():
        assert cli(["generate", "--model", str(saved_model), "--prompt", "hi", "--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err
    assert cli(["generate", "--model", str(saved_model), "--prompt", "hi", "--device", "tpu9"]) == 2
    assert "--device: expected cpu, cuda or cuda:N, got 'tpu9'" in capsys.readouterr().err


def test_generate_runs_in_bfloat16_on_cpu(saved_model, tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert cli(["generate", "--model", str(saved_model), "--image", str(tmp_path / "x.png"), "--prompt", "hi",
                "--device", "cpu", "--dtype", "bfloat16", "--max-new-tokens", "2"]) == 0


def test_generate_temperature_needs_sample(saved_model, captured_generate, capsys):
    assert cli(["generate", "--model", str(saved_model), "--prompt", "hi", "--temperature", "0.5"]) == 2
    assert "--temperature: applies to sampling only; add --sample" in capsys.readouterr().err
    assert not captured_generate
    assert cli(["generate", "--model", str(saved_model), "--prompt", "hi", "--sample", "--temperature", "0.5"]) == 0
    assert captured_generate["temperature"] == 0.5 and captured_generate["do_sample"] is True
    captured_generate.clear()
    assert cli(["generate", "--model", str(saved_model), "--prompt", "hi"]) == 0
    assert "temperature" not in captured_generate and captured_generate["do_sample"] is False
