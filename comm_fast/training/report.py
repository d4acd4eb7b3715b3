"""Where ``comm-fast train --report-to`` sends each step's scalars besides ``metrics.jsonl`` (which stays the
record a run is resumed and plotted from): TensorBoard event files in ``RUN_DIR/tensorboard``, or a
Weights & Biases run in ``RUN_DIR/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync``
uploads it later). Only rank 0 reports.
"""
from __future__ import annotations

import importlib.util
import os

REPORT_TO = ("none", "tensorboard", "wandb")
# metrics.jsonl key -> the scalar's name in TensorBoard / W&B
SCALARS = {"loss": "train/loss", "lr": "train/learning_rate", "tokens_per_s": "train/tokens_per_s",
           "grad_norm": "train/grad_norm"}
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def missing_package(report_to: str) -> str | None:
    """Why ``report_to`` cannot run here (its package is not importable), or None when it can."""
    if report_to not in REPORT_TO:
        return f"expected one of {', '.join(REPORT_TO)}, got {report_to!r}"
    package = _PACKAGE.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        return f"{report_to} needs the {package!r} package, which is not importable here (pip install {package})"
    return None


class _TensorBoard:
    def __init__(self, out: str, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides what the interrupted one logged after the checkpoint it continues from
        self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start + 1 if start else None)

    def log(self, record: dict) -> None:
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: str, config: dict):
        import wandb

        self.run = wandb.init(project="comm_fast", name=os.path.basename(out), dir=out, config=config,
                              mode=os.environ.get("WANDB_MODE") or "offline")

    def log(self, record: dict) -> None:
        self.run.log({tag: record[key] for key, tag in SCALARS.items() if record.get(key) is not None},
                     step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_reporter(report_to: str, out: str, config: dict, start: int = 0):
    """A reporter with ``log(record)`` (one metrics.jsonl record) and ``close()``; None for ``none``.
    ``start``: the step a resumed run continues from."""
    if report_to == "tensorboard":
        return _TensorBoard(out, start)
    if report_to == "wandb":
        return _WandB(out, config)
    return None
