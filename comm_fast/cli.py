"""The ``comm-fast`` command. Each subcommand lives in its own module, imported only when used;
a module provides ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "bench": ("comm_fast.bench", "microbenchmarks: fused vs eager reference vs torch.compile"),
    "profile-train": ("comm_fast.profile", "profile training steps of COMMForCausalLM"),
    "train": ("comm_fast.training.train", "train COMMForCausalLM (pretrain / finetune)"),
    "make-data": ("comm_fast.data.synthetic", "write a synthetic grounding and captioning set"),
    "generate": ("comm_fast.generate", "answer a prompt about an image"),
    "eval": ("comm_fast.eval.cli", "evaluate a model on referring expressions, POPE or VQA"),
    "info": ("comm_fast._info", "which backend each op uses here, and why"),
}


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
    return int(module.run(cmd.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
