"""comm-fast bench and comm-fast info on this machine: the table, the JSON rows, the plot, failures
reported per subject, results saved as they come."""
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
