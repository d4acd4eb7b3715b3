"""``comm-fast plot RUN_DIR [--out PNG]``: a training run's loss, learning rate and tokens/s against the
optimizer step, read from ``RUN_DIR/metrics.jsonl`` (default output ``RUN_DIR/metrics.png``).

Drawn by matplotlib's Agg canvas on a ``Figure`` of its own (no pyplot state, no display needed).
"""
from __future__ import annotations

import json
import os
import sys

# metrics.jsonl key -> panel title
PANELS = {"loss": "loss", "lr": "learning rate", "tokens_per_s": "tokens/s"}


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be plotted: the message names the file (and line)."""


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, each checked for a positive integer step and numbers in PANELS."""
    if not os.path.isfile(path):
        raise MetricsError(f"{path}: no such file (comm-fast train writes it in its --out directory)")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MetricsError(f"{where}: not a JSON object ({exc.msg} at column {exc.colno}): "
                                   f"{line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise MetricsError(f"{where}: expected a JSON object, got {type(record).__name__}")
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                raise MetricsError(f"{where}: 'step': expected a positive integer, got {step!r}")
            for key in PANELS:
                value = record.get(key)
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise MetricsError(f"{where}: {key!r}: expected a number, got {value!r}")
            records.append(record)
    if not records:
        raise MetricsError(f"{path}: empty (no step logged yet)")
    return records


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Each panel's (steps, values)."""
    steps = [r["step"] for r in records]
    return {key: (steps, [float(r[key]) for r in records]) for key in PANELS}


def plot_metrics(records: list[dict], title: str = ""):
    """A matplotlib Figure: one panel per PANELS entry, sharing the step axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig = Figure(figsize=(8, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    marker = "o" if len(records) <= 50 else None  # single steps visible on short runs
    for ax, (key, (steps, values)) in zip(axes, series(records).items()):
        ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.5)
        ax.set_ylabel(PANELS[key])
        ax.grid(True, alpha=0.3)
        if key == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return fig


def save(fig, path: str) -> None:
    """Write ``fig`` as a PNG, atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a comm-fast train --out directory (holds metrics.jsonl)")
    p.add_argument("--out", metavar="PNG", help="where to write the chart (default: RUN_DIR/metrics.png)")


def run(args) -> int:
    if not os.path.isdir(args.run_dir):
        print(f"comm-fast plot: error: RUN_DIR: expected a run directory, got {args.run_dir!r} "
              f"({'a file' if os.path.exists(args.run_dir) else 'not found'})", file=sys.stderr)
        return 2
    try:
        records = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    except MetricsError as exc:
        print(f"comm-fast plot: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "metrics.png")
    save(plot_metrics(records, os.path.basename(os.path.abspath(args.run_dir))), out)
    print(f"wrote {out} ({len(records)} steps)")
    return 0
