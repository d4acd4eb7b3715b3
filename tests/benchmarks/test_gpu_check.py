"""benchmarks/gpu_check.sh on a CPU: the time boxes (SIGINT, then SIGKILL, the part's deadline), the
record written step by step, the summary of what ran and what did not, and a dry run of both parts."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check, summarize = _module("gpu_check"), _module("summarize")
PY = sys.executable


def steps_of(out, part):
    return {s["step"]: s for s in json.loads((out / f"{part}.json").read_text())["steps"]}


def test_a_step_past_its_box_is_cut_and_the_part_goes_on(tmp_path):
    Step = gpu_check.Step
    sleeper = [PY, "-c", "import time; print('sleeping', flush=True); time.sleep(60)"]
    deaf = [PY, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('deaf', flush=True); "
                      "time.sleep(60)"]
    writes = [PY, "-c", f"import json; json.dump({{'rows': [1]}}, open({str(tmp_path / 'bench-x.json')!r}, 'w'))"]
    part = gpu_check.Part("part1", str(tmp_path), deadline_s=30, grace_s=1)
    start = time.monotonic()
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job: children inherit it
    try:
        part.run([Step("sleeps", 1, sleeper), Step("ignores-sigint", 1, deaf), Step("bench-x", 10, writes)])
    finally:
        signal.signal(signal.SIGINT, ignored)
    part.finish()
    assert time.monotonic() - start < 15
    steps = steps_of(tmp_path, "part1")
    assert (steps["sleeps"]["status"], steps["sleeps"]["rc"]) == ("cut", -2)  # SIGINT ended it
    assert (steps["ignores-sigint"]["status"], steps["ignores-sigint"]["rc"]) == ("cut", -9)  # SIGKILL after grace
    assert steps["bench-x"]["status"] == "ok" and steps["sleeps"]["box_s"] == 1
    assert "sleeping" in (tmp_path / "sleeps.log").read_text()


def test_the_deadline_shortens_boxes_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    Step = gpu_check.Step
    monkeypatch.setattr(gpu_check, "MIN_BOX_S", 1)
    part = gpu_check.Part("part2", str(tmp_path), deadline_s=4, grace_s=1)
    part.run([Step("long", 100, [PY, "-c", "import time; time.sleep(60)"]), Step("next", 10, [PY, "-c", "pass"])])
    part.finish()
    steps = steps_of(tmp_path, "part2")
    assert steps["long"]["status"] == "cut" and steps["long"]["box_s"] <= 3
    assert steps["next"]["status"] == "skipped" and "before the part's deadline" in steps["next"]["why"]


def test_a_background_step_is_boxed_and_waited_for(tmp_path):
    Step = gpu_check.Step
    part = gpu_check.Part("part1", str(tmp_path), deadline_s=30, grace_s=1)
    bg = Step("build", 2, [PY, "-c", "import time; time.sleep(60)"], background=True)
    part.run([bg, Step("tests", 5, [PY, "-c", "pass"]), Step("info", 5, [PY, "-c", "pass"], needs="build")])
    part.finish()
    steps = steps_of(tmp_path, "part1")
    assert steps["build"]["status"] == "cut" and steps["tests"]["status"] == steps["info"]["status"] == "ok"
    order = [s for s in json.loads((tmp_path / "part1.json").read_text())["steps"]]
    assert [s["step"] for s in order] == ["tests", "build", "info"]  # info waited for the build


def test_the_summary_states_what_did_not_run(tmp_path):
    Step = gpu_check.Step
    part = gpu_check.Part("part1", str(tmp_path), deadline_s=30, grace_s=1)
    part.run([Step("bench-patch", 1, [PY, "-c", "import time; time.sleep(60)"]), Step("profile", 5, None, why="dry")])
    part.finish()
    (tmp_path / "bench-merge.json").write_text('{"rows": [')  # a file cut mid-write
    assert summarize.main(str(tmp_path)) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    text = (tmp_path / "results.md").read_text()
    assert "part2: not run" in text and "cut or skipped: bench-patch, profile" in text
    assert result["bench"]["rows"] == [] and "No benchmark rows were written." in text  # nothing invented
    assert "Kernel report: part 2 did not run." in text


@pytest.mark.slow
def test_dry_run_of_both_parts(tmp_path):
    env = dict(os.environ, COMM_FAST_GPU_CHECK_DRY="1", PYTHON=PY)
    for part in ("part1", "part2"):
        done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), part, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    for part, want in (("part1", gpu_check.part1(str(tmp_path))), ("part2", gpu_check.part2(str(tmp_path)))):
        steps = steps_of(tmp_path, part)
        assert {s.name for s in want} <= set(steps)
        bad = {name: s for name, s in steps.items() if s["status"] == "failed"}
        assert not bad, {name: (tmp_path / s["log"]).read_text()[-1500:] for name, s in bad.items()}
        # a step may be cut on a loaded machine, but only by its box
        assert all(s["status"] != "cut" or s["seconds"] >= s["box_s"] for s in steps.values())
    assert steps_of(tmp_path, "part2")["kernel-report"]["status"] == "skipped"
    rows = result["bench"]["rows"]
    assert rows and all(not r.get("error") and not r.get("mismatch") for r in rows)
    part1_steps = steps_of(tmp_path, "part1")
    assert {r["configs"] for r in rows if r["step"] in part1_steps} == {"1"}  # part 1: one config per kernel
    assert {r["configs"] for r in rows if r["step"] not in part1_steps} == {"all"}
    assert "part1" in (tmp_path / "results.md").read_text() and "part2" in (tmp_path / "results.md").read_text()


def test_the_report_stands_beside_the_measured_rows(tmp_path):
    part = {"part": "part2", "dry_run": False, "deadline_s": 285, "started": "00:00:00", "elapsed_s": 1.0, "steps": [
        {"step": s, "status": "ok", "rc": 0, "seconds": 1.0, "env": env, "budget_s": 60, "box_s": 60, "log": "", "why": ""}
        for s, env in (("sweep-merge-folded", {"COMM_FAST_MERGE_VARIANT": "folded"}), ("kernel-report", {}))]}
    (tmp_path / "part2.json").write_text(json.dumps(part))
    row = {"name": "multilevel_merge", "shape": "L=24", "backend": "triton", "ms": 1.5, "ref_ms": 3.0, "compile_ms": None,
           "speedup_vs_ref": 2.0, "speedup_vs_compile": None, "pct_of_roofline": 70.0, "peak_mem_mb": 1.0,
           "ref_peak_mem_mb": 2.0, "note": "", "mismatch": None}
    (tmp_path / "sweep-merge-folded.json").write_text(json.dumps({"machine": {"device": "H200"}, "rows": [row]}))
    report = {"entries": [{"kernel": "multilevel_merge_fwd", "variant": "folded", "config": "128x128x64",
                           "dtype": "bf16", "predicted_ms": 1.2, "predicted_pct_peak": 80.0},
                          {"kernel": "fused_mlp_fc1", "predicted_ms": 0.5}]}
    (tmp_path / "kernel_report.json").write_text(json.dumps(report))
    summarize.main(str(tmp_path))
    (merge, mlp) = json.loads((tmp_path / "results.json").read_text())["report_vs_measured"]
    assert merge["predicted_ms"] == 1.2 and merge["predicted_pct"] == 80.0
    assert merge["measured"]["ms"] == 1.5 and merge["measured"]["variant"] == "folded"
    assert mlp["measured"] is None  # not measured: left empty, not borrowed from another row
    text = (tmp_path / "results.md").read_text()
    assert "PREDICTED" in text and "part1: not run" in text
