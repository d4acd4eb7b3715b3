"""comm-fast train --report-to: TensorBoard event files and an offline W&B run hold the same per-step scalars
as metrics.jsonl (read back with TensorBoard's reader; from the offline run file); a resumed run replaces the
interrupted one's steps after its checkpoint; the grad norm is the one before clipping, and under FSDP the
whole model's; rank 0 alone reports; a backend whose package is missing is refused before anything is written."""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from comm_fast.training import report
from train_runs import BASE, metrics, train

SHORT = ["--steps", "2", "--save-every", "100"]


def test_tensorboard_holds_the_metrics_and_grad_norm_is_before_clipping(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []  # the gradient norm the optimizer sees, in float64, at each step
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad.double() for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "tb"
    assert train(out, *SHORT, "--max-grad-norm", "0", "--report-to", "tensorboard") == 0
    rows = metrics(out)
    assert [r["grad_norm"] for r in rows] == pytest.approx(seen, rel=1e-5)  # no clipping: what the optimizer saw

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(report.SCALARS.values())
    for key, tag in report.SCALARS.items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [r["step"] for r in rows], tag
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), tag  # float32 there

    seen.clear()  # clipped to a tiny norm: the logged norm is still the one before clipping
    assert train(tmp_path / "clipped", "--steps", "1", "--max-grad-norm", "0.01") == 0
    (row,) = metrics(tmp_path / "clipped")
    assert row["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=1e-5)  # the same first batch
    assert seen == [pytest.approx(0.01, rel=1e-3)] and row["grad_norm"] > 1
    assert not (tmp_path / "clipped" / "tensorboard").exists()  # --report-to none: metrics.jsonl only


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path, monkeypatch):
    """The interrupted run logged step 3 after checkpoint-2; the resumed run's step 3 replaces it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from comm_fast.training.train import TrainStep

    out, run = tmp_path / "r", ["--steps", "4", "--save-every", "2", "--report-to", "tensorboard"]
    real, calls = TrainStep.__call__, []

    def call(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed in step 4")
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(TrainStep, "__call__", call)
        assert train(out, *run) == 1  # steps 1-3 logged, checkpoint-2
    assert train(out, *run, "--resume") == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = events.Scalars("train/tokens_per_s")
    assert [e.step for e in logged] == [1, 2, 3, 4]
    assert [e.value for e in logged] == pytest.approx([r["tokens_per_s"] for r in metrics(out)], rel=1e-6)


def _wandb_history(run_file: bytes, tag: str) -> set[float]:
    """The values logged under ``tag`` in an offline run's .wandb file (history and summary items: a protobuf
    field 2 with the key, then field 16 with the value as JSON)."""
    key = tag.encode()
    pattern = re.escape(b"\x12" + bytes([len(key)]) + key + b"\x82\x01") + rb"(.)"
    values = set()
    for m in re.finditer(pattern, run_file, flags=re.DOTALL):
        n = m.group(1)[0]
        values.add(float(json.loads(run_file[m.end():m.end() + n])))
    return values


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert train(out, *SHORT, "--report-to", "wandb") == 0
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(run_file, "rb").read()
    rows = metrics(out)
    for key, tag in report.SCALARS.items():
        assert _wandb_history(data, tag) == {r[key] for r in rows}, tag


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_backend_package_is_named_before_anything_is_written(tmp_path, monkeypatch, capsys, backend):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real(name, *a))
    out = tmp_path / "run"
    assert train(out, *SHORT, "--report-to", backend) == 2
    err = capsys.readouterr().err
    assert f"--report-to: {backend} needs the '{backend}' package" in err and f"pip install {backend}" in err
    assert not out.exists()


def test_two_fsdp_processes_report_once_with_the_single_process_grad_norm(tmp_path):
    """Rank 0 alone writes events; the grad norm of the sharded gradients (a DTensor) is the whole model's."""
    pytest.importorskip("tensorboard")
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(one, *SHORT) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "comm_fast.cli", "train", *BASE, "--out", str(two), *SHORT, "--batch-size", "1", "--fsdp",
           "--report-to", "tensorboard"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(os.listdir(two / "tensorboard")) == 1  # one event file: rank 0's
    assert [r["grad_norm"] for r in metrics(two)] == pytest.approx([r["grad_norm"] for r in metrics(one)], rel=1e-5)
