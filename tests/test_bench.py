"""comm-fast bench and comm-fast info on this machine: the table, the JSON rows, the plot, failures
reported per subject, results saved as they come, fused outputs checked against the reference's."""
import json
import subprocess
import sys

import pytest

from comm_fast import bench, info
from comm_fast.cli import main as cli

ROW_FIELDS = {"name", "shape", "dtype", "device", "backend", "ms", "ref_ms", "compile_ms", "speedup_vs_ref",
              "speedup_vs_compile", "pct_of_roofline", "peak_mem_mb", "ref_peak_mem_mb"}


@pytest.fixture
def quick_ceilings(monkeypatch):
    """The machine's copy bandwidth and GEMM rate are measured for seconds; here a stand-in will do."""
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device, nbytes: 10.0)
    monkeypatch.setattr(bench, "gemm_tflops", lambda device, dtype, n: 0.1)


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli(["bench", "--ops", "interpolate_pos_embed", "--no-compile", "--no-progress",
                "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]) == 0
    table = capsys.readouterr().out
    assert "interpolate_pos_embed" in table and "fused ms" in table
    result = json.loads((out / "bench.json").read_text())
    assert result["machine"]["copy_gbs"] > 0 and result["machine"]["preset"] == "cpu-small"
    (row,) = result["rows"]
    assert ROW_FIELDS <= set(row) and row["name"] == "interpolate_pos_embed" and "error" not in row
    assert row["mismatch"] is None  # the fused output was compared with the reference's, and agreed
    assert row["ms"] > 0 and row["ref_ms"] > 0 and row["backend"] in ("cpp", "torch")
    assert row["speedup_vs_ref"] == pytest.approx(row["ref_ms"] / row["ms"], rel=1e-2)
    assert 0 < row["pct_of_roofline"] and row["compile_ms"] is None and "--no-compile" in row["note"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_subject_is_reported_and_the_rest_still_run(tmp_path, capsys, monkeypatch, quick_ceilings):
    real = bench.build_cases
    path = tmp_path / "bench.json"
    on_disk = []

    def build(p, device, subjects, cache):
        on_disk.append(len(json.loads(path.read_text())["rows"]) if path.exists() else 0)
        if "resample_tokens" in subjects:
            raise RuntimeError("no kernel image for this device")
        return real(p, device, subjects, cache)

    monkeypatch.setattr(bench, "build_cases", build)
    code = cli(["bench", "--ops", "resample_tokens", "interpolate_pos_embed", "fused_mlp", "--skip", "fused_mlp",
                "--no-compile", "--no-progress", "--json", str(path)])
    captured = capsys.readouterr()
    assert code == 1 and "1 subject(s) failed: resample_tokens" in captured.err
    assert "Traceback" in captured.err and "no kernel image for this device" in captured.err  # where it failed
    assert "FAILED: RuntimeError: no kernel image" in captured.out
    rows = json.loads(path.read_text())["rows"]
    assert [r["name"] for r in rows] == ["resample_tokens", "interpolate_pos_embed"]
    assert rows[0]["error"] == "RuntimeError: no kernel image for this device" and rows[1]["ms"] > 0
    assert on_disk == [0, 1]  # each row is on disk before the next subject starts: an interrupted run keeps it


def test_bench_rejects_unknown_subjects(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["bench", "--ops", "layernorm", "--no-progress"])
    assert exc.value.code == 2 and "invalid choice: 'layernorm'" in capsys.readouterr().err


def test_info_names_a_backend_and_a_reason_for_every_op():
    import torch

    from comm_fast import ops

    report = info()
    names = {"layernorm_weighted_sum", "multilevel_merge", "fused_mlp", "interpolate_pos_embed", "resample_tokens",
             "joint_preprocess"}
    assert names <= set(report["ops"]) and report["extension"]["loaded"]  # make test builds the extension
    for name in names:
        for device in ("cpu", "cuda"):
            assert report["ops"][name][device]["backend"] and report["ops"][name][device]["reason"]
    assert report["ops"]["resample_tokens"]["cpu"]["backend"] == "cpp"
    ops.resample_tokens(torch.randn(1, 9, 4), (3, 3), (2, 2), "bilinear")
    assert info()["ops"]["resample_tokens"]["last_used"]["backend"] == "cpp"  # what ran, not only the plan
    text = subprocess.run([sys.executable, "-m", "comm_fast.info"], capture_output=True, text=True, check=True).stdout
    assert all(name in text for name in names)
    assert cli(["info"]) == 0


# ---- the bench checks what it times ----

TINY = bench.PRESETS["cpu-tiny"]


def _check(case):
    fused, ref = case.check() if case.check is not None else (case.fused(), case.ref())
    return bench.outputs_agree(fused, ref, **case.check_rule)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_subject_agrees_with_its_reference(dtype):
    import torch

    p = dict(TINY, dtype=getattr(torch, dtype))
    subjects = [s for s in bench.SUBJECTS if s != "tower"]  # the tower's models take seconds to build
    for case in bench.build_cases(p, torch.device("cpu"), subjects, cache_bytes=2**20):
        assert _check(case) is None, case.name


def test_outputs_agree_rule():
    import torch

    x = torch.randn(64, 32, dtype=torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * x.abs().max()
    assert bench.outputs_agree(x + ulp.to(x.dtype), x) is None  # rounding-sized differences pass
    assert bench.outputs_agree((x, {"a": x}), [x, x]) is None  # nested outputs are compared in order
    off = x.clone()
    off[3, 4] += 0.2 * x.abs().max()
    assert "1 of 2048 elements" in bench.outputs_agree(off, x)  # one wrong element fails
    assert bench.outputs_agree(off, x, fraction=0.999) is None
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert "1 of 2048" in bench.outputs_agree(nan, x)
    assert "shape (64, 31)" in bench.outputs_agree(x[:, 1:], x)
    assert "1 fused output tensor(s) against 2" in bench.outputs_agree(x, (x, x))
    assert "0 fused output tensor(s)" in bench.outputs_agree(None, x)


@pytest.mark.parametrize("subject,op,plant", [
    ("interpolate_pos_embed", "interpolate_pos_embed", lambda real: lambda pos, s, d, mode: real(pos, s, d, "hf")),
    # a rotating subject: its check must use one input set for both sides
    ("resample_tokens", "resample_tokens", lambda real: lambda t, s, d, *a, **k: real(t, s, d, "bicubic", **k)),
])
def test_a_wrong_fused_output_fails_the_run(tmp_path, capsys, monkeypatch, quick_ceilings, subject, op, plant):
    from comm_fast import ops

    monkeypatch.setattr(ops, op, plant(getattr(ops, op)))
    path = tmp_path / "bench.json"
    code = cli(["bench", "--ops", subject, "--no-compile", "--no-progress", "--json", str(path)])
    captured = capsys.readouterr()
    (row,) = json.loads(path.read_text())["rows"]
    assert code == 1 and f"1 subject(s) failed: {subject}" in captured.err
    assert "differs from the reference's" in row["mismatch"] and row["ms"] > 0  # timed, and flagged
    assert "OUTPUTS DIFFER" in captured.out


# ---- row writing, presets, the preprocessing reference ----

def test_a_plot_error_loses_a_write_not_the_run(tmp_path, capsys, monkeypatch, quick_ceilings):
    real, calls = bench.plot_speedups, []

    def plot(result, path):
        calls.append(len(result["rows"]))
        if len(calls) == 1:
            raise ValueError("bad bar length")
        real(result, path)

    monkeypatch.setattr(bench, "plot_speedups", plot)
    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = cli(["bench", "--ops", "resample_tokens", "interpolate_pos_embed", "--no-compile", "--no-progress",
                "--json", str(path), "--plot", str(png)])
    captured = capsys.readouterr()
    rows = json.loads(path.read_text())["rows"]
    assert calls == [1, 2] and [r["name"] for r in rows] == ["resample_tokens", "interpolate_pos_embed"]
    assert rows[0]["write_error"] == "ValueError: bad bar length" and rows[1]["ms"] > 0
    assert code == 1 and "writing the results failed after resample_tokens" in captured.err
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_an_explicit_preset_is_kept_on_a_gpu(monkeypatch, quick_ceilings):
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).preset is None and parser.parse_args(["--preset", "cpu-small"]).preset == "cpu-small"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the choice goes
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    assert bench.run_benchmarks("cpu-small", [], progress=False)["machine"]["preset"] == "cpu-small"
    assert bench.run_benchmarks(None, [], progress=False)["machine"]["preset"] == "h200"
    assert bench.default_preset(torch.device("cpu")) == "cpu-small"
    with pytest.raises(ValueError, match="preset: expected one of"):
        bench.run_benchmarks("h100", [], progress=False)


def test_joint_preprocess_names_the_reference_it_fell_back_to(monkeypatch):
    import torch

    monkeypatch.setattr(bench, "_PROCESSORS", (("NoSuchProcessorPil", "BitImageProcessorPil"),
                                               ("CLIPImageProcessorPil", "BitImageProcessorPil")))
    (case,) = bench.build_cases(TINY, torch.device("cpu"), ["joint_preprocess"], 2**20)
    assert case.ref_name.startswith("transformers CLIPImageProcessorPil + BitImageProcessorPil (unavailable: "
                                    "NoSuchProcessorPil/BitImageProcessorPil: AttributeError")
    monkeypatch.setattr(bench, "_PROCESSORS", (("NoSuchProcessorPil", "NoSuchEither"),))
    (case,) = bench.build_cases(TINY, torch.device("cpu"), ["joint_preprocess"], 2**20)
    assert case.ref_name.startswith("comm_fast.reference.preprocess_image per image")
    assert "NoSuchProcessorPil" in case.ref_name
    assert _check(case) is None  # Pillow's resize against torch's, within the preprocess rule
