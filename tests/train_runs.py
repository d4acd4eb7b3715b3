"""Shared helpers of the training and CLI tests: ``comm-fast train`` runs on the tiny preset, in process."""
import json
import os

from comm_fast.cli import main as cli

BASE = ["--preset", "tiny", "--data", "synthetic", "--synthetic-n", "16", "--batch-size", "2", "--threads", "1",
        "--no-progress", "--seed", "5"]


def train(out, *extra, base=BASE):
    return cli(["train", *base, "--out", str(out), *extra])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, f"checkpoint-{step}", "trainable.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def trainer_state(out, step):
    with open(os.path.join(out, f"checkpoint-{step}", "trainer_state.json")) as f:
        return json.load(f)


def mixed_data(directory, n=16):
    """The synthetic set with every other record text-only (as LLaVA's mix holds text-only dialogues).

    Square images only: the mean-colour bands of padded non-square images are near-constant patches whose
    LayerNorms amplify the rounding of a different batch split (max weight difference 2e-6 measured, against
    4e-7 on square images), which would narrow the split tests' margin between rounding and a bug (8e-4)."""
    assert cli(["make-data", "synthetic", "--n", str(n), "--out", str(directory), "--nonsquare", "0"]) == 0
    path = directory / "finetune.json"
    records = json.loads(path.read_text())
    for rec in records[1::2]:
        del rec["image"]
        rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
    path.write_text(json.dumps(records))
    return directory


class Crash(Exception):
    """An interruption simulated in the middle of a run."""


def crash_after_checkpoint(monkeypatch, step: int):
    """Make the run die right after it wrote checkpoint-STEP (as a killed job would)."""
    from comm_fast.training import checkpoint

    real = checkpoint.save

    def save(out, at, *args, **kwargs):
        path = real(out, at, *args, **kwargs)
        if at == step:
            raise Crash(f"killed after checkpoint-{at}")
        return path

    monkeypatch.setattr(checkpoint, "save", save)
