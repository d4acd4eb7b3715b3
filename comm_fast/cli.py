"""The ``comm-fast`` command. Each subcommand lives in its own module, imported only when used;
a module provides ``add_arguments(parser)`` and ``run(args) -> int``.

Exit status: 0 done, 2 bad input (one line naming the argument; nothing written), 1 a failure while
running (what failed, with its traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

COMMANDS = {
    "bench": ("comm_fast.bench", "microbenchmarks: fused vs eager reference vs torch.compile"),
    "profile-train": ("comm_fast.profile", "profile training steps of COMMForCausalLM"),
    "train": ("comm_fast.training.train", "train COMMForCausalLM (pretrain / finetune)"),
    "merge-lora": ("comm_fast.training.lora", "merge a LoRA run's adapter into a plain model"),
    "plot": ("comm_fast.plot", "draw a training run's loss, learning rate and tokens/s (metrics.jsonl)"),
    "make-data": ("comm_fast.data.synthetic", "write a synthetic grounding and captioning set"),
    "generate": ("comm_fast.generate", "answer a prompt about an image"),
    "eval": ("comm_fast.eval.cli", "evaluate a model on referring expressions, POPE or VQA"),
    "info": ("comm_fast._info", "which backend each op uses here, and why"),
}


# -- argument types: argparse reports "argument --NAME: <message>" and exits with status 2 -----------
def _number(kind, text: str, what: str, ok):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _number(int, text, "a non-negative integer", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a positive number", lambda v: v > 0 and v != float("inf"))


def non_negative_float(text: str) -> float:
    return _number(float, text, "a non-negative number", lambda v: 0 <= v < float("inf"))


def fraction(text: str) -> float:
    return _number(float, text, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def dropout_probability(text: str) -> float:
    return _number(float, text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="comm-fast", description="comm_fast: a fast runtime for COMM-style MLLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd = argparse.ArgumentParser(prog=f"comm-fast {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except Exception as exc:  # a failure while running: what failed, and where
        traceback.print_exc()
        print(f"comm-fast {argv[0]}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
