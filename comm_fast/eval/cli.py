"""``comm-fast eval``: evaluate a saved model on REC, POPE or VQA annotations, or score saved predictions.

    comm-fast eval --model DIR --task rec|pope|vqa --data FILE [FILE ...] [--image-folder DIR]
                   [--batch-size N] [--out DIR] [--limit N] [--skip-bad-images]
    comm-fast eval --predictions DIR/predictions.jsonl [--task T] [--out DIR]
    torchrun --nproc_per_node 2 -m comm_fast.cli eval ...      # each rank a shard, gathered
"""
from __future__ import annotations

import argparse
import sys

from comm_fast.eval.pope import RULES
from comm_fast.eval.run import TASKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a saved COMMForCausalLM directory (e.g. a run's DIR/model)")
    p.add_argument("--task", choices=sorted(TASKS), help="rec (referring expressions), pope or vqa")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="annotation file(s), JSON or JSON Lines; each file's name is its split unless its records "
                        "name one")
    p.add_argument("--image-folder", help="root of the annotations' image paths (default: each file's folder)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (per rank)")
    p.add_argument("--out", help="where predictions.jsonl and metrics.json go (default: runs/eval-<task>; with "
                                 "--predictions, that file's folder)")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--predictions", metavar="FILE", help="score this saved predictions.jsonl again, without a model")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) items whose image is missing "
                                                                   "or corrupt")
    p.add_argument("--prompt", help="question template: {expression} for rec (default LLaVA-1.5's 'Please provide "
                                    "the bounding box coordinate of the region this sentence describes: "
                                    "{expression}'), {question} for pope/vqa (default '{question}\\nAnswer the "
                                    "question using a single word or phrase.')")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default per task: rec 48, pope 16, vqa 24)")
    p.add_argument("--pope-rule", choices=RULES, default="llava",
                   help="yes/no rule: llava (eval_pope.py's words rule) or prismatic (first-token p(Yes) vs p(No))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print(metrics: dict) -> None:
    rows = [("overall", metrics["overall"])] + list(metrics["splits"].items())
    keys = [k for k in metrics["overall"] if k not in ("tp", "fp", "tn", "fn")]
    print(f"{'split':<24}" + "".join(f"{k:>20}" for k in keys))
    for name, m in rows:
        print(f"{name:<24}" + "".join(f"{m[k]:>20}" if isinstance(m[k], int) else f"{m[k]:>20.4f}" for k in keys))


def run(args) -> int:
    import os

    from comm_fast.eval.run import evaluate, rescore
    from comm_fast.training.train import Dist

    if args.predictions:
        if args.model or args.data:
            print("comm-fast eval: error: --predictions scores saved answers: it takes no --model or --data",
                  file=sys.stderr)
            return 2
        try:
            metrics = rescore(args.predictions, args.task, args.out, args.pope_rule)
        except (FileNotFoundError, ValueError) as exc:
            print(f"comm-fast eval: error: {exc}", file=sys.stderr)
            return 2
        _print(metrics)
        return 0
    missing = [f"--{n}" for n in ("model", "task", "data") if not getattr(args, n)]
    if missing:
        print(f"comm-fast eval: error: {', '.join(missing)} required (or --predictions FILE)", file=sys.stderr)
        return 2
    dist = Dist()
    try:
        out = args.out or os.path.join("runs", f"eval-{args.task}")
        metrics = evaluate(args.model, args.task, args.data, args.image_folder, args.batch_size, out, args.limit,
                           args.skip_bad_images, args.prompt, args.max_new_tokens, args.pope_rule,
                           progress=not args.no_progress, device=dist.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"comm-fast eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.close()
    if dist.rank == 0:
        _print(metrics)
        print(f"wrote {out}/predictions.jsonl and {out}/metrics.json")
    return 0
