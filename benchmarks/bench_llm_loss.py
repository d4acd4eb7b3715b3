"""The LM loss variants side by side in a training step (``comm-fast profile-train --llm-variants``), on the
tiny preset and on a mid-size model with a 32k vocabulary (the 1b preset's tokenizer layout, a narrow
decoder), about 2,048 tokens per step.

    python benchmarks/bench_llm_loss.py [--model tiny|mid-32k|both] [--steps 3] [--hidden 256] [--json out.json]

Prints profile-train's report per model (peak memory of a whole step, optimizer included, and tokens/s per
loss, with the ratios), then on CPU the peak memory of forward + backward of one 2,048-token text row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from comm_fast import presets, profile
from comm_fast.cli import positive_int
from comm_fast.mllm import COMMConfig


def mid_32k(hidden: int, layers: int) -> presets.Preset:
    """The tiny preset's visual branch feeding a ``layers`` x ``hidden`` LLaMA with LLaMA's 32,000 ids."""
    def build(tok, **overrides):
        vision = dataclasses.replace(presets.get("tiny").build(tok, **overrides).vision, out_dim=hidden)
        text = presets._llama(tok, 32000, hidden, layers, hidden // 64, hidden // 64, round(hidden * 8 / 3 / 8) * 8,
                              2048)
        return COMMConfig(vision, text, tok.image_token_id, max_length=2048)

    return presets.Preset("mid-32k", build, "llama", lr=(2e-3, 2e-3), cpu_threads=1, profile_batch=6)


def text_step_peaks(spec: presets.Preset, tokens: int = 2048, repeats: int = 2) -> dict:
    """Peak memory (MB) of forward + backward of one text row of ``tokens`` tokens, the second half of them
    targets, per LM loss, alternated ``repeats`` times (the smallest kept: the machine is shared)."""
    import torch

    from comm_fast import bench
    from comm_fast.mllm import COMMForCausalLM
    from comm_fast.training.train import configure_stage

    model = COMMForCausalLM(spec.config(), spec.tokenizer())
    configure_stage(model, "finetune", None)
    ids = torch.randint(3, min(model.config.text["vocab_size"], model.config.image_token_id), (1, tokens))
    labels = ids.clone()
    labels[:, :tokens // 2] = -100
    return bench.loss_step_peaks_mb(model, ids, labels, repeats=repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="both", choices=["tiny", "mid-32k", "both"])
    p.add_argument("--steps", type=positive_int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=6, help="samples per step (~350 tokens each)")
    p.add_argument("--hidden", type=positive_int, default=256, help="mid-32k's decoder width")
    p.add_argument("--layers", type=positive_int, default=2, help="mid-32k's decoder layers")
    p.add_argument("--stage", default="finetune", choices=["pretrain", "finetune"])
    p.add_argument("--llm-kernels", default="chunked")
    p.add_argument("--device")
    p.add_argument("--json")
    args = p.parse_args(argv)
    models = {"tiny": "tiny", "mid-32k": mid_32k(args.hidden, args.layers)}
    names = list(models) if args.model == "both" else [args.model]
    results = {}
    for name in names:
        prof_args = argparse.Namespace(preset=models[name], steps=args.steps, warmup=args.warmup,
                                       batch_size=args.batch_size, stage=args.stage, baseline=False, no_padded=True,
                                       trace=None, profile_steps=1, json=None, grad_checkpointing=False,
                                       threads=None, seed=0, device=args.device, llm_kernels=args.llm_kernels,
                                       llm_variants=True)
        results[name] = r = profile.profile(prof_args)
        print(profile.format_report(r), "\n", flush=True)
        if args.device in (None, "cpu"):
            r["text_row_peak_mb"] = peaks = text_step_peaks(presets.get(models[name]))
            if None not in peaks.values():
                print(f"{name}: forward + backward of one 2,048-token text row (1,024 targets), peak MB: eager "
                      f"{peaks['eager']:,.0f}, chunked {peaks['chunked']:,.0f} "
                      f"({peaks['chunked'] / peaks['eager']:.2f}x)\n", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
