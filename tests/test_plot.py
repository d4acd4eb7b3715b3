"""The charts: comm-fast plot draws a run's metrics.jsonl (the lines hold its numbers; bad files are named
with their line), and the bench chart keeps a very long subject name whole inside the image."""
import json

import numpy as np
import pytest
from PIL import Image

from comm_fast import bench, plot
from comm_fast.cli import main as cli

PNG = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, rows, extra=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)


def _rows(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [{"step": s, "loss": float(5 / s + rng.random()), "lr": float(1e-3 * rng.random()),
             "tokens_per_s": float(2000 + 1000 * rng.random()), "images_per_s": 1.0, "grad_norm": 1.0}
            for s in range(1, n + 1)]


def test_plot_draws_loss_lr_and_tokens_per_s_against_steps(tmp_path, capsys):
    rows = _rows()
    _write_metrics(tmp_path / "run", rows)
    assert cli(["plot", str(tmp_path / "run")]) == 0
    assert "(7 steps)" in capsys.readouterr().out
    png = tmp_path / "run" / "metrics.png"
    assert png.read_bytes()[:8] == PNG and Image.open(png).size[0] > 400
    assert cli(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere" / "m.png")]) == 0
    assert (tmp_path / "elsewhere" / "m.png").read_bytes()[:8] == PNG

    fig = plot.plot_metrics(plot.read_metrics(str(tmp_path / "run" / "metrics.jsonl")))
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["loss", "learning rate", "tokens/s"]
    assert axes[-1].get_xlabel() == "optimizer step"
    for ax, key in zip(axes, ["loss", "lr", "tokens_per_s"]):
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [r["step"] for r in rows]
        assert list(line.get_ydata()) == [r[key] for r in rows], key


def test_a_resumed_run_plots_its_steps_in_order(tmp_path):
    rows = _rows(5)
    _write_metrics(tmp_path / "run", rows, extra="\n")  # a blank line is no step
    fig = plot.plot_metrics(plot.read_metrics(str(tmp_path / "run" / "metrics.jsonl")))
    assert list(fig.get_axes()[0].get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: no such file"),
    ("", "metrics.jsonl: empty (no step logged yet)"),
    ('{"step": 1, "loss": 2.0, "lr": 0.1, "tokens_per_s": 5}\n{"step": 2, "loss": 1.',  # cut off mid-line
     "metrics.jsonl line 2: not a JSON object"),
    ('{"step": 1, "loss": 2.0, "lr": 0.1}\n', "metrics.jsonl line 1: 'tokens_per_s': expected a number, got None"),
    ('{"step": 1, "loss": "nan?", "lr": 0.1, "tokens_per_s": 5}\n', "line 1: 'loss': expected a number, got 'nan?'"),
    ('{"step": 0, "loss": 2.0, "lr": 0.1, "tokens_per_s": 5}\n', "line 1: 'step': expected a positive integer, got 0"),
    ('[1, 2]\n', "line 1: expected a JSON object, got list"),
])
def test_a_bad_metrics_file_is_named_with_its_line(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert cli(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(run / "metrics.jsonl") in err
    assert not (run / "metrics.png").exists()


def test_plot_run_dir_must_be_a_directory(tmp_path, capsys):
    assert cli(["plot", str(tmp_path / "nowhere")]) == 2
    assert "RUN_DIR: expected a run directory" in capsys.readouterr().err


LONG = "multi_level_merge_with_a_very_long_subject_name_that_would_run_off_the_image"


def test_the_bench_chart_keeps_a_very_long_label_inside_the_image(tmp_path):
    rows = [{"name": "fused_mlp", "speedup_vs_ref": 2.5, "speedup_vs_compile": 1.25},
            {"name": LONG, "speedup_vs_ref": 11.0, "speedup_vs_compile": None},
            {"name": "failed_one", "error": "RuntimeError: boom"}]
    path = tmp_path / "bench.png"
    fig = bench.plot_speedups({"machine": {"device": "cpu", "date": "2026-12-01"}, "rows": rows}, str(path))
    assert path.read_bytes()[:8] == PNG
    (ax,) = fig.get_axes()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert [t.replace("\n", "") for t in labels] == ["fused_mlp", LONG]  # whole; the failed row left out
    assert max(len(line) for t in labels for line in t.split("\n")) <= 30  # wrapped
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == [1.25, 2.5, 11.0]
    # nothing cut off: every edge of the saved image is background (a clipped label would reach it)
    img = np.asarray(Image.open(path).convert("L"))
    for edge in (img[:2], img[-2:], img[:, :2], img[:, -2:]):
        assert edge.min() > 250
    # and the image holds every label: its width covers the longest label line and the plot
    renderer = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(renderer)
    for t in ax.get_yticklabels() + [ax.title]:
        box = t.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        assert tight.x0 <= box.x0 and box.x1 <= tight.x1 and tight.y0 <= box.y0 and box.y1 <= tight.y1
    pad = 2 * 0.1  # savefig's pad_inches on either side
    assert img.shape[1] / img.shape[0] == pytest.approx((tight.width + pad) / (tight.height + pad), rel=0.01)
