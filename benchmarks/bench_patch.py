"""Side-by-side benchmarks of the csrc patch ops: the extension vs the torch composition it replaces
(and, for preprocessing, vs the transformers PIL processors). Medians after warm-up, one process.

    python benchmarks/bench_patch.py [--threads 2] [--device cpu|cuda] [--json out.json]

Each bench_* function returns a list of dict rows: op, impl, case, ms, and speedups.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from comm_fast import bench, reference
from comm_fast.ops import patch


def median_ms(fn, device, warmup=2, repeats=7) -> float:
    return bench.time_ms(fn, torch.device(device), repeats, warmup)


def _rows(op, case, results: dict, base: str) -> list[dict]:
    """results: impl -> ms; speedup of every impl relative to each other impl."""
    rows = []
    for impl, ms in results.items():
        row = {"op": op, "case": case, "impl": impl, "ms": round(ms, 3)}
        for other, oms in results.items():
            if other != impl:
                row[f"x_vs_{other}"] = round(oms / ms, 2)
        rows.append(row)
    return rows


# ---- joint_preprocess ----

def torch_composition(batch: torch.Tensor, clip_size: int, dino_size: int):
    """The baseline: antialiased F.interpolate + crop + normalise, once per encoder."""
    x = batch.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    outs = []
    for size, mean, std in ((clip_size, patch.CLIP_MEAN, patch.CLIP_STD), (dino_size, patch.DINO_MEAN, patch.DINO_STD)):
        nh, nw = patch.shortest_edge_size(h, w, size)
        y = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        y = y[..., top:top + size, left:left + size].float().div_(255)
        m = torch.tensor(mean, device=y.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=y.device).view(1, 3, 1, 1)
        outs.append((y - m) / s)
    return outs


def bench_joint_preprocess(n=32, h=480, w=640, size=336, device="cpu", processors=True, repeats=5) -> list[dict]:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    batch = torch.from_numpy(np.stack(arrays)).to(device)
    results = {
        "extension": median_ms(lambda: patch.joint_preprocess(batch, size, size), device, repeats=repeats),
        "torch_composition": median_ms(lambda: torch_composition(batch, size, size), device, repeats=repeats),
    }
    if processors:
        import transformers

        kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        clip = transformers.CLIPImageProcessorPil(**kw)
        dino = transformers.BitImageProcessorPil(**kw, image_mean=list(patch.DINO_MEAN), image_std=list(patch.DINO_STD))

        def run_processors():
            a = clip(arrays, return_tensors="pt")["pixel_values"]
            b = dino(arrays, return_tensors="pt")["pixel_values"]
            return a.to(device), b.to(device)

        results["transformers_processors"] = median_ms(run_processors, device, warmup=1, repeats=3)
    return _rows("joint_preprocess", f"{n}x{h}x{w}->2x{size} {device}", results, "extension")


# ---- resample_tokens ----

def bench_resample_tokens(b=8, src=(37, 37), dst=(24, 24), c=1024, dtype=torch.float32, device="cpu",
                          modes=("bilinear", "bicubic", "area")) -> list[dict]:
    t = torch.randn(b, src[0] * src[1], c, dtype=dtype, device=device)
    buf = torch.empty(b, dst[0] * dst[1], 2 * c, dtype=dtype, device=device)
    slot = buf[..., c:]
    rows = []
    for mode in modes:
        case = f"B{b} {src[0]}x{src[1]}->{dst[0]}x{dst[1]} C{c} {str(dtype)[6:]} {mode} {device}"
        rows += _rows("resample_tokens", case, {
            "extension": median_ms(lambda: patch.resample_tokens(t, src, dst, mode), device),
            "torch_composition": median_ms(lambda: reference.resample_tokens(t, src, dst, mode), device),
        }, "extension")
        rows += _rows("resample_tokens", case + " into [B,N,2C] slot", {
            "extension": median_ms(lambda: patch.resample_tokens(t, src, dst, mode, out=slot), device),
            "torch_composition": median_ms(lambda: slot.copy_(reference.resample_tokens(t, src, dst, mode)), device),
        }, "extension")
    return rows


# ---- interpolate_pos_embed ----

def bench_pos_embed(src=(37, 37), dst=(24, 24), d=1024, device="cpu") -> list[dict]:
    pos = torch.randn(1, 1 + src[0] * src[1], d, device=device)
    rows = []
    for mode in patch.POS_EMBED_MODES:
        rows += _rows("interpolate_pos_embed", f"{src[0]}x{src[1]}->{dst[0]}x{dst[1]} D{d} {mode} {device}", {
            "extension": median_ms(lambda: patch.interpolate_pos_embed(pos, src, dst, mode=mode), device),
            "torch_composition": median_ms(
                lambda: patch.interpolate_pos_embed(pos, src, dst, mode=mode, backend="torch"), device),
        }, "extension")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-processors", action="store_true", help="skip the (slow) transformers processors")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench_joint_preprocess(device=args.device, processors=not args.no_processors)
    rows += bench_resample_tokens(device=args.device)
    rows += bench_resample_tokens(device=args.device, dtype=torch.bfloat16, modes=("bilinear", "area"))
    rows += bench_pos_embed(device=args.device)
    for r in rows:
        extra = "  ".join(f"{k[5:]}: {v}x" for k, v in r.items() if k.startswith("x_vs_"))
        print(f"{r['op']:<22} {r['case']:<58} {r['impl']:<24} {r['ms']:>9.2f} ms  {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "device": args.device, "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
