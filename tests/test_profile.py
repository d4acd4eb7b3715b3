"""comm-fast profile-train on the tiny preset: the breakdown, the trace, the baseline and packing ratios."""
import json

import pytest

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
        # the phases cover the step: their sum is the mean step time ('other' is what is left)
        assert sum(v["split_ms"].values()) == pytest.approx(sum(v["step_ms"]) / 2, rel=1e-6)
        assert v["split_ms"]["encoders"] > 0 and v["split_ms"]["llm_bwd"] > 0 and v["split_ms"]["optimizer"] > 0
        assert v["peak_step_mem_mb"] is None or v["peak_step_mem_mb"] > 0
    same = r["variants"]["ours_packed"], r["variants"]["ours_padded"]
    assert same[0]["tokens_per_step"] == same[1]["tokens_per_step"]  # the same batches, the same model FLOPs
    assert same[0]["model_tflop_per_step"] == same[1]["model_tflop_per_step"]
    assert same[0]["computed_tokens_per_step"] < same[1]["computed_tokens_per_step"]  # padding
    assert r["ratios"]["packed_over_padded_tokens_per_s"] > 0
    assert r["ratios"]["ours_over_baseline_tokens_per_s"] > 0
    assert r["backends"].get("joint_preprocess")  # what the fused ops ran on is reported
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


def test_bad_arguments(capsys):
    assert cli(["profile-train", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_split_step_from_marks():
    marks = [("start", 0.0), ("data", 2.0), ("vision_start", 2.5), ("enc_start", 3.0), ("enc_end", 5.0),
             ("enc_start", 5.0), ("enc_end", 6.0), ("vision_end", 7.0), ("forward_end", 12.0),
             ("features_grad", 20.0), ("backward_end", 22.0), ("optimizer_end", 25.0)]
    s = split_step(marks, 26.0)
    assert s == {"preprocess": 2.0, "encoders": 3.0, "heads_fwd": 1.5, "llm_fwd": 5.5, "llm_bwd": 8.0,
                 "heads_bwd": 2.0, "optimizer": 3.0, "other": 1.0}
