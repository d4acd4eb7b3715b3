"""comm-fast profile-train on the tiny preset: the breakdown (each phase measured where it happens), the
trace, the baseline and packing ratios, and that its step is comm-fast train's."""
import json
import time

import pytest
import torch

from comm_fast.cli import main as cli
from comm_fast.profile import PHASES, split_step

VARIANTS = ("ours_packed", "ours_padded", "baseline_packed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    argv = ["profile-train", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--baseline",
            "--trace", str(out / "trace.json"), "--json", str(out / "profile.json")]
    return out, cli(argv)


def test_report_has_every_figure(run, capsys):
    out, rc = run
    assert rc == 0
    r = json.loads((out / "profile.json").read_text())
    assert set(r["variants"]) == set(VARIANTS)
    assert r["peak_gemm_tflops"] > 0 and "6*P*T" in r["flops_method"]
    for name in VARIANTS:
        v = r["variants"][name]
        assert len(v["step_ms"]) == 2 and v["step_ms_median"] > 0
        assert v["tokens_per_s"] > 0 and v["images_per_s"] > 0 and 0 < v["mfu_pct"] < 100
        assert set(v["split_ms"]) == set(PHASES) and all(x >= 0 for x in v["split_ms"].values())
        assert v["split_ms"]["encoders"] > 0 and v["split_ms"]["llm_bwd"] > 0 and v["split_ms"]["optimizer"] > 0
        assert v["peak_step_mem_mb"] is None or v["peak_step_mem_mb"] > 0
    same = r["variants"]["ours_packed"], r["variants"]["ours_padded"]
    assert same[0]["tokens_per_step"] == same[1]["tokens_per_step"]  # the same batches, the same model FLOPs
    assert same[0]["model_tflop_per_step"] == same[1]["model_tflop_per_step"]
    assert same[0]["computed_tokens_per_step"] < same[1]["computed_tokens_per_step"]  # padding
    assert r["ratios"]["packed_over_padded_tokens_per_s"] > 0
    assert r["ratios"]["ours_over_baseline_tokens_per_s"] > 0
    assert r["backends"].get("joint_preprocess")  # what the fused ops ran on is reported
    assert r["packed_attention"] == ("nested" if torch.cuda.is_available() else "loop")  # the packed rows' attention
    ranges = r["profiler"]["ranges_ms_per_step"]
    for name in ("preprocess", "vision", "vision_encoder.clip", "vision_encoder.dino", "llm_forward", "backward",
                 "optimizer"):
        assert f"comm_fast::{name}" in ranges, sorted(ranges)


def test_trace_is_a_chrome_trace(run):
    out, _ = run
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"comm_fast::vision", "comm_fast::llm_forward", "comm_fast::backward"} <= names


def test_a_failing_comparison_variant_is_reported_and_dropped(tmp_path, capsys, monkeypatch):
    from comm_fast import profile

    real = profile.Session.step

    def step(self, variant, k):
        if variant.name == "baseline_packed":
            raise RuntimeError("CUDA out of memory")
        return real(self, variant, k)

    monkeypatch.setattr(profile.Session, "step", step)
    assert cli(["profile-train", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                "--no-padded", "--baseline", "--json", str(tmp_path / "p.json")]) == 1  # reported, not hidden
    text = capsys.readouterr().out
    assert "variant baseline packed FAILED and was dropped: RuntimeError: CUDA out of memory" in text
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["variants"]["baseline_packed"]["error"].startswith("RuntimeError") and r["ratios"] == {}
    assert r["variants"]["ours_packed"]["tokens_per_s"] > 0


def test_table_is_printed(tmp_path, capsys):
    assert cli(["profile-train", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                "--no-padded"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "LLM backward" in text and "MFU" in text and "ours packed" in text
    assert f"(packed rows: {'nested' if torch.cuda.is_available() else 'loop'})" in text


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["profile-train", "--steps", "0"])
    assert exc.value.code == 2 and "argument --steps: expected a positive integer, got 0" in capsys.readouterr().err
    assert cli(["profile-train", "--device", "tpu"]) == 2
    assert "--device: expected cpu or cuda, got 'tpu'" in capsys.readouterr().err


def test_split_step_from_marks():
    marks = [("start", 0.0), ("data", 2.0), ("vision_start", 2.5), ("enc_start", 3.0), ("enc_end", 5.0),
             ("enc_start", 5.0), ("enc_end", 6.0), ("vision_end", 7.0), ("forward_end", 12.0),
             ("features_grad", 20.0), ("backward_end", 22.0), ("optimizer_end", 25.0)]
    s = split_step(marks, 26.0)
    assert s == {"preprocess": 2.0, "encoders": 3.0, "heads_fwd": 1.5, "llm_fwd": 5.5, "llm_bwd": 8.0,
                 "heads_bwd": 2.0, "optimizer": 3.0, "other": 1.0}


DELAY_S = 0.2  # above every phase of a tiny step but the LLM's (~0.3 s in all on one idle thread)


def test_each_phase_times_what_happens_in_it(monkeypatch):
    """A known delay planted inside each phase (sleeps in hooks and in the data path) shows up in that
    phase. The phases are differences of marks, so a boundary in the wrong place takes a delay away from
    the phase it belongs to (which then falls short of it), or leaves it to 'other'. Only lower bounds:
    a loaded machine makes every phase longer, never shorter."""
    from comm_fast.data import dataset
    from comm_fast.profile import Session

    session = Session("tiny", batch_size=2, num_batches=2, padded=False)
    try:
        variant = session.variants[0]
        model = session.model
        sleep = lambda *args: time.sleep(DELAY_S)  # noqa: E731
        real_load = dataset.load_images
        handles = [model.vision.clip.register_forward_pre_hook(sleep),                  # encoders
                   model.vision.dino_mlp.register_forward_pre_hook(sleep),              # heads forward
                   model.llm.model.norm.register_forward_pre_hook(sleep),               # LLM forward
                   model.llm.lm_head.weight.register_hook(lambda g: sleep()),           # LLM backward
                   model.vision.clip_merge.weight.register_hook(lambda g: sleep()),     # heads backward
                   variant.optimizer.register_step_pre_hook(sleep)]                     # optimizer
        monkeypatch.setattr(dataset, "load_images", lambda paths: (sleep(), real_load(paths))[1])  # preprocess
        session.step(variant, 0)  # warm-up
        split = session.step(variant, 1)["split"]
        for h in handles:
            h.remove()
    finally:
        session.close()
    for phase in PHASES[:-1]:
        assert split[phase] >= DELAY_S * 1e3, (phase, split)
    assert PHASES[-1] == "other" and split["other"] < DELAY_S * 1e3, split


def test_profile_runs_the_training_step_of_train(tmp_path):
    """Same seed, batches and schedule: profile-train's steps give comm-fast train's losses and weights (so
    collate, normalisation, clipping, weight-decay groups and the schedule are the same), and every variant
    has an optimizer of its own."""
    from safetensors.torch import load_file

    from comm_fast.profile import Session

    steps = 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as comm-fast train on the tiny preset: the same reduction order
    session = Session("tiny", batch_size=4, num_batches=steps, padded=True, steps=steps)
    try:
        ours, padded = session.variants
        assert ours.optimizer is not padded.optimizer
        assert [g["weight_decay"] for g in ours.optimizer.param_groups] == [0.0, 0.0]  # decay and no-decay groups
        losses = [session.step(ours, k)["loss"] for k in range(steps)]
        trained = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    finally:
        session.close()
        torch.set_num_threads(threads)
    out = tmp_path / "run"
    assert cli(["train", "--preset", "tiny", "--steps", str(steps), "--batch-size", "4", "--synthetic-n", "16",
                "--seed", "0", "--no-progress", "--out", str(out)]) == 0
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == logged
    w = load_file(str(out / f"checkpoint-{steps}" / "trainable.safetensors"))
    assert w.keys() == trained.keys()
    assert all(torch.equal(w[k], trained[k]) for k in w)
