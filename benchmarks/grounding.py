"""Grounding that is learned, on CPU: the recipe's held-out Acc@0.5, the chance baseline, the learning curve
and a miniature of COMM's encoder ablation, on the synthetic set.

    python benchmarks/grounding.py [--quick] [--only recipe|ablation|chance|probe] [--steps N] [--work DIR]
                                   [--texture T] [--variant clip-last|clip-multi|dino-deep|comm ...]

Each run writes the synthetic train set (``--mix rec``) and the held-out val split (``--split val``) once,
builds the model of a variant (random weights, seed 0) and saves it, trains it with ``comm-fast train
--model INIT`` (encoders frozen, as COMM trains), assembles a model from every checkpoint and scores it with
``comm-fast eval --task rec`` on the val split. The figures are what eval's metrics.json says, nothing
else; beside them two diagnostics of the recipe's model (image_dependence: the teacher-forced val loss with
each question's own image and with another's; position_r2: how linearly the visual tokens give their grid
position). The wall time of each training run and the load average around it (the machine may be shared) are
recorded. Results: benchmarks/results/grounding-DATE.json and grounding-DATE.png (``--quick``: a smoke run of
a few steps, results under --work only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

from comm_fast.data.synthetic import TEXTURE  # the generator's default background contrast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# the recipe: `comm-fast make-data synthetic --mix rec --box-decimals RECIPE_BOX_DECIMALS`, then
# `comm-fast train --preset grounding --steps RECIPE_STEPS` on it
RECIPE_STEPS = 1200
RECIPE_BOX_DECIMALS = 2

# the miniature ablation: which hidden states are merged (an empty tuple: that encoder is off)
ABLATION = {
    "clip-last": dict(clip_layers=(3,), dino_layers=()),        # LLaVA: CLIP's last layer only
    "clip-multi": dict(clip_layers=(1, 2, 3), dino_layers=()),  # CLIP multi-level
    "dino-deep": dict(clip_layers=(), dino_layers=(2, 3)),      # DINOv2's deep layers, through the MLP
    "comm": dict(clip_layers=(1, 2, 3), dino_layers=(2, 3)),    # COMM: both
}


def _cli(*args, log=None) -> float:
    """Run ``comm-fast ARGS`` in a subprocess; its wall time in seconds (raises on failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "comm_fast.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(" ".join(map(str, args)) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"comm-fast {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def read_rec(split_dir: str) -> list[dict]:
    """The REC records (rec.jsonl) of a synthetic split, read as eval reads them."""
    from comm_fast.eval.records import read_records

    return read_records(os.path.join(split_dir, "rec.jsonl"))


def make_data(work: str, n_train: int, n_val: int, seed: int, decimals: int, texture: float = TEXTURE) -> tuple[str, str]:
    tag = "" if texture == TEXTURE else f"-t{texture:g}"  # the backgrounds' contrast, when not the default's
    train = os.path.join(work, f"train-{n_train}-s{seed}-d{decimals}{tag}")
    val = os.path.join(work, f"val-{n_val}-s{seed}{tag}")
    if not os.path.isdir(train):
        _cli("make-data", "synthetic", "--n", n_train, "--seed", seed, "--mix", "rec", "--box-decimals", decimals,
             "--texture", texture, "--out", train)
    if not os.path.isdir(val):
        _cli("make-data", "synthetic", "--n", n_val, "--seed", seed, "--split", "val", "--texture", texture,
             "--out", val)
    return train, val


def init_model(path: str, preset: str, seed: int, **vision) -> None:
    """A randomly initialised model of ``preset`` (its vision config overridden by ``vision``) saved at path."""
    import torch

    from comm_fast import presets
    from comm_fast.mllm import COMMForCausalLM

    if os.path.isdir(path):
        return
    torch.manual_seed(seed)
    p = presets.get(preset)
    COMMForCausalLM(p.config(**vision), p.tokenizer()).save_pretrained(path)


def assemble(init: str, checkpoint: str, out: str) -> str:
    """The model of a checkpoint: the initial model with the checkpoint's trained weights."""
    from safetensors.torch import load_file

    from comm_fast.mllm import COMMForCausalLM

    if not os.path.isdir(out):
        model = COMMForCausalLM.from_pretrained(init)
        missing = set(load_file(os.path.join(checkpoint, "trainable.safetensors"))) - set(model.state_dict())
        if missing:
            raise RuntimeError(f"{checkpoint}: weights the model has not: {sorted(missing)[:5]}")
        model.load_state_dict(load_file(os.path.join(checkpoint, "trainable.safetensors")), strict=False)
        model.save_pretrained(out)
    return out


def evaluate(model: str, val: str, out: str, limit: int | None, log: str) -> dict:
    if not os.path.isfile(os.path.join(out, "metrics.json")):
        extra = ("--limit", limit) if limit else ()
        _cli("eval", "--model", model, "--task", "rec", "--data", os.path.join(val, "rec.jsonl"), "--out", out,
             "--batch-size", 32, "--no-progress", *extra, log=log)
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        m = json.load(f)
    return {"acc@0.5": m["overall"]["acc@0.5"], "mean_iou": m["overall"]["mean_iou"],
            "parse_failure_rate": m["overall"]["parse_failure_rate"], "n": m["overall"]["n"],
            "image_aspect": m["image_aspect"]}


def train_and_eval(name: str, work: str, train: str, val: str, *, preset: str, steps: int, every: int,
                   batch: int, lr: float | None, threads: int, seed: int, curve_limit: int | None,
                   vision: dict, decimals: int) -> dict:
    """Train one variant; its final val metrics, its learning curve and the run's wall time and load."""
    base = os.path.join(work, name)
    init, run = os.path.join(base, "init"), os.path.join(base, "run")
    log = os.path.join(base, "log.txt")
    os.makedirs(base, exist_ok=True)
    init_model(init, preset, seed, **vision)
    args = ["train", "--model", init, "--preset", preset, "--data", train, "--steps", steps, "--save-every", every,
            "--batch-size", batch, "--threads", threads, "--seed", seed, "--out", run, "--no-progress"]
    if lr is not None:
        args += ["--lr", lr]
    timing = os.path.join(base, "train-timing.json")  # a finished run is not trained again, its timing kept
    if not os.path.isfile(timing):
        before = os.getloadavg()
        wall = _cli(*args, log=log)
        with open(timing, "w", encoding="utf-8") as f:
            json.dump({"train_wall_s": wall, "loadavg_before": before, "loadavg_after": os.getloadavg()}, f)
    with open(timing, encoding="utf-8") as f:
        timed = json.load(f)
    curve = []
    for step in range(every, steps + 1, every):
        ckpt = os.path.join(run, f"checkpoint-{step}")
        model = assemble(init, ckpt, os.path.join(base, f"model-{step}"))
        final = step == steps
        m = evaluate(model, val, os.path.join(base, f"eval-{step}"), None if final else curve_limit, log)
        curve.append({"step": step, **m})
        print(f"  {name} step {step}: Acc@0.5 {m['acc@0.5']:.3f} mIoU {m['mean_iou']:.3f} (n={m['n']})", flush=True)
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [json.loads(line) for line in f if line.strip()]
    last = os.path.join(base, f"model-{steps}")
    diagnostics = {"image_dependence": image_dependence(last, val, decimals, threads),
                   "position_r2_init": position_r2(init, val, threads)}
    return {"name": name, "preset": preset, "vision": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in vision.items()}, "diagnostics": diagnostics,
            "steps": steps, "batch_size": batch, "lr": lr, "threads": threads,
            "train_command": "comm-fast " + " ".join(map(str, args)).replace(work, "WORK"),  # WORK: --work
            **timed,
            "loss_first": losses[0]["loss"], "loss_last": losses[-1]["loss"], "final": curve[-1], "curve": curve}


# -- diagnostics of a trained model: does it read the image, do its visual tokens say where they are? -----
def image_dependence(model_dir: str, val: str, decimals: int, threads: int, shift: int = 7) -> dict:
    """Teacher-forced loss of the val answers (``decimals``-decimal boxes) with each question's own image and
    with the image of the question ``shift`` places on (another image): equal losses mean the decoder
    answers without reading the image."""
    import torch

    from comm_fast.data.boxes import REC_PROMPT, format_box
    from comm_fast.data.dataset import load_images
    from comm_fast.mllm import COMMForCausalLM

    torch.set_num_threads(threads)
    model = COMMForCausalLM.from_pretrained(model_dir).eval()
    recs = read_rec(val)
    images = load_images([os.path.join(val, r["img_path"]) for r in recs])
    convs = [[{"from": "human", "value": "<image>\n" + REC_PROMPT.format(expression=r["expression"])},
              {"from": "gpt", "value": format_box(r["bbox"], r["width"], r["height"], decimals)}] for r in recs]

    def loss(offset):
        total, tokens = 0.0, 0
        for k in range(0, len(recs), 32):
            rows = range(k, min(k + 32, len(recs)))
            batch = model.processor(conversations=[convs[i] for i in rows],
                                    images=[images[(i + offset) % len(recs)] for i in rows])
            with torch.no_grad():
                out = model(**batch, return_logits=False)
            n = int((batch["labels"] != -100).sum())
            total, tokens = total + out.loss.item() * n, tokens + n
        return total / tokens

    return {"loss_own_image": loss(0), "loss_other_image": loss(shift), "n": len(recs)}


def position_r2(model_dir: str, val: str, threads: int, n_images: int = 120) -> dict:
    """R^2 of a least-squares linear map from the tower's visual tokens to their grid row and column, fitted
    on two thirds of ``n_images`` val images and scored on the rest: ~1 when the tokens say where they are."""
    import torch

    from comm_fast.data.dataset import load_images
    from comm_fast.mllm import COMMForCausalLM

    torch.set_num_threads(threads)
    model = COMMForCausalLM.from_pretrained(model_dir).eval()
    paths = sorted({r["img_path"] for r in read_rec(val)})[:n_images]
    images = load_images([os.path.join(val, p) for p in paths])
    with torch.no_grad():
        v = torch.cat([model.vision(*model.processor.pixel_values(images[k:k + 40]))
                       for k in range(0, len(images), 40)])
    n, t, d = v.shape
    g = math.isqrt(t)
    grid = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(t, 2)
    x = torch.cat([v, torch.ones(n, t, 1)], -1).double()
    y = grid.double().expand(n, t, 2)
    fit = 2 * n // 3
    w = torch.linalg.lstsq(x[:fit].reshape(-1, d + 1), y[:fit].reshape(-1, 2)).solution
    err = x[fit:].reshape(-1, d + 1) @ w - y[fit:].reshape(-1, 2)
    held = y[fit:].reshape(-1, 2)
    r2 = 1 - (err ** 2).sum(0) / ((held - held.mean(0)) ** 2).sum(0)
    return {"r2_row": r2[0].item(), "r2_col": r2[1].item(), "n_images": n}


# -- the probe: is the box in the visual tokens at all? -------------------------------------------------
def probe(name: str, work: str, train: str, val: str, *, preset: str, vision: dict, steps: int, batch: int,
          threads: int, seed: int, lr: float = 1e-3) -> dict:
    """A diagnostic apart from the LLM: the tower of a variant (encoders random and frozen, its merge heads
    and projector trained) read by a small learned cross-attention readout (the question's colour and shape
    as the query, learned positions on the visual tokens, two attention blocks, sigmoid box), trained with
    an L1 loss on the REC boxes of the train images and scored on the val split with eval's IoU. If it
    finds the boxes, the spatial information survives the tower at this grid and the limit lies in the LLM."""
    import numpy as np
    import torch
    import torch.nn as nn

    from comm_fast import ops, presets
    from comm_fast.data.boxes import box_iou, box_to_square
    from comm_fast.data.dataset import load_images
    from comm_fast.data.synthetic import COLORS, SHAPES
    from comm_fast.eval.rec import THRESHOLD
    from comm_fast.tower import COMMVisionTower

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = presets.get(preset).config(**vision).vision
    tower = COMMVisionTower(cfg)
    for p in (*tower.clip.parameters(), *tower.dino.parameters()):
        p.requires_grad_(False)
    names = [f"{c} {s}" for c in COLORS for s in SHAPES]

    def read(split_dir):
        recs = read_rec(split_dir)
        paths = sorted({r["img_path"] for r in recs})
        images = load_images([os.path.join(split_dir, p) for p in paths])
        index = {p: k for k, p in enumerate(paths)}
        return (images, [index[r["img_path"]] for r in recs],
                torch.tensor([names.index(r["expression"][len("the "):]) for r in recs]),
                torch.tensor([box_to_square(r["bbox"], r["width"], r["height"]) for r in recs], dtype=torch.float32))

    class Readout(nn.Module):
        def __init__(self, dim: int, tokens: int):
            super().__init__()
            self.query = nn.Embedding(len(names), dim)
            self.pos = nn.Parameter(0.02 * torch.randn(tokens, dim))
            self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
            self.attn = nn.ModuleList(nn.MultiheadAttention(dim, 4, batch_first=True) for _ in range(2))
            self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                     for _ in range(2))
            self.head = nn.Linear(dim, 4)

        def forward(self, visual, ids):
            v = visual + self.pos
            q = self.query(ids)[:, None]
            for k in range(2):
                q = q + self.attn[k](self.norms[2 * k](q), v, v, need_weights=False)[0]
                q = q + self.mlp[k](self.norms[2 * k + 1](q))
            return torch.sigmoid(self.head(q[:, 0]))

    def boxes(images, img_idx, ids, _targets, rows):
        batch_images = [images[img_idx[r]] for r in rows]
        clip_px, dino_px = ops.joint_preprocess(batch_images, cfg.clip_image_size, cfg.dino_image_size,
                                                aspect=cfg.aspect)
        return readout(tower(clip_px, dino_px), ids[rows])

    tr, va = read(train), read(val)
    readout = Readout(cfg.out_dim, tower.num_tokens)
    params = [p for p in (*tower.parameters(), *readout.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = np.random.default_rng(seed)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    for _ in range(steps):
        rows = rng.integers(0, len(tr[1]), batch).tolist()
        loss = (boxes(*tr, rows) - tr[3][rows]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    wall = time.perf_counter() - t0
    with torch.no_grad():
        pred = torch.cat([boxes(*va, list(range(k, min(k + 64, len(va[1]))))) for k in range(0, len(va[1]), 64)])
    ious = [box_iou(p.tolist(), t.tolist()) if p[0] < p[2] and p[1] < p[3] else 0.0 for p, t in zip(pred, va[3])]
    out = {"name": name, "preset": preset, "vision": {k: list(v) for k, v in vision.items()}, "steps": steps,
           "batch_size": batch, "train_wall_s": wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "loss_last": loss.item(), "acc@0.5": sum(i >= THRESHOLD for i in ious) / len(ious),
           "mean_iou": sum(ious) / len(ious), "n": len(ious), "tokens": tower.num_tokens}
    print(f"  probe {name}: Acc@0.5 {out['acc@0.5']:.3f} mIoU {out['mean_iou']:.3f} ({wall:.0f} s)", flush=True)
    return out


def chance(train: str, val: str, out: str) -> dict:
    """The training set's mean box answered for every val question, scored by eval's own rescoring."""
    from comm_fast.data.boxes import box_to_square, format_box
    from comm_fast.eval import rescore
    from comm_fast.eval.run import load_items

    boxes = [box_to_square(r["bbox"], r["width"], r["height"]) for r in read_rec(train)]
    mean = [sum(b[k] for b in boxes) / len(boxes) for k in range(4)]
    items, _ = load_items("rec", os.path.join(val, "rec.jsonl"))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "predictions.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"task": "rec", "id": it.id, "split": it.split, "answer": format_box(mean),
                                "target": it.target}) + "\n")
    m = rescore(path, "rec", out)["overall"]
    return {"mean_box": [round(v, 4) for v in mean], "acc@0.5": m["acc@0.5"], "mean_iou": m["mean_iou"], "n": m["n"]}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in results["runs"]:
        steps = [c["step"] for c in run["curve"]]
        axes[0].plot(steps, [c["acc@0.5"] for c in run["curve"]], marker="o", label=run["name"])
        axes[1].plot(steps, [c["mean_iou"] for c in run["curve"]], marker="o", label=run["name"])
    if results.get("chance"):
        for ax, key in zip(axes, ("acc@0.5", "mean_iou")):
            ax.axhline(results["chance"][key], color="grey", linestyle="--", label="chance (mean box)")
    axes[0].axhline(0.5, color="red", linestyle=":", linewidth=1, label="target 0.5")
    for ax, title in zip(axes, ("Acc@0.5 on the held-out split", "mean IoU on the held-out split")):
        ax.set_xlabel("optimizer steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"synthetic grounding, random frozen encoders ({results['machine']}, {results['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, a few steps, results under --work")
    p.add_argument("--only", choices=("recipe", "ablation", "chance", "probe"), action="append",
                   help="what to run (repeatable; default all)")
    p.add_argument("--preset", default="grounding")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--every", type=int, default=None, help="checkpoint (curve point) every K steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the grounding preset's 1)")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--box-decimals", type=int, default=RECIPE_BOX_DECIMALS, help="decimals of the training boxes")
    p.add_argument("--texture", type=float, default=TEXTURE, help="background contrast of both splits (make-data --texture)")
    p.add_argument("--curve-limit", type=int, default=200, help="val items scored at the curve's earlier points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-steps", type=int, default=1500)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "grounding"))
    p.add_argument("--name", default=None, help="tag of this run's variant directories (default: the preset)")
    p.add_argument("--results", default=RESULTS, help="where the dated json and png go")
    p.add_argument("--vision", default="{}", help="JSON of COMMVisionConfig overrides for the recipe run")
    p.add_argument("--variant", choices=sorted(ABLATION), action="append",
                   help="the ablation's variants to run (repeatable; default all)")
    args = p.parse_args(argv)
    steps = args.steps or (8 if args.quick else RECIPE_STEPS)
    every = args.every or max(1, steps // (2 if args.quick else 5))
    if args.quick:
        args.n_train, args.n_val, args.curve_limit = 16, 4, None
        args.work = os.path.join(args.work, "quick")
    only = set(args.only or ("recipe", "ablation", "chance", "probe"))
    os.makedirs(args.work, exist_ok=True)
    train, val = make_data(args.work, args.n_train, args.n_val, args.seed, args.box_decimals, args.texture)
    date = datetime.datetime.now(datetime.timezone.utc)
    results = {"date": date.isoformat(timespec="seconds"), "machine": f"{os.cpu_count()}-core CPU",
               "platform": platform.platform(), "python": platform.python_version(),
               "train_data": {"n_images": args.n_train, "mix": "rec", "seed": args.seed,
                              "box_decimals": args.box_decimals, "texture": args.texture},
               "val_data": {"n_images": args.n_val, "split": "val", "seed": args.seed, "texture": args.texture},
               "runs": []}
    common = dict(steps=steps, every=every, batch=args.batch_size, lr=args.lr, threads=args.threads, seed=args.seed,
                  curve_limit=args.curve_limit, decimals=args.box_decimals)
    if "chance" in only:
        results["chance"] = chance(train, val, os.path.join(args.work, "chance"))
        print(f"chance (the training set's mean box): Acc@0.5 {results['chance']['acc@0.5']:.3f} "
              f"mIoU {results['chance']['mean_iou']:.3f}", flush=True)
    if "recipe" in only:
        tag = args.name or args.preset
        results["runs"].append(train_and_eval(tag, args.work, train, val, preset=args.preset,
                                              vision=json.loads(args.vision), **common))
    if "ablation" in only:
        for name in args.variant or ABLATION:
            vision = ABLATION[name]
            results["runs"].append(train_and_eval(f"{args.preset}-{name}", args.work, train, val, preset=args.preset,
                                                  vision=vision, **common))
    if "probe" in only:
        ps = 4 if args.quick else args.probe_steps
        results["probe"] = [probe(f"{args.preset}-{name}", args.work, train, val, preset=args.preset, vision=vision,
                                  steps=ps, batch=32, threads=args.threads, seed=args.seed)
                            for name, vision in ABLATION.items()]
        results["probe"].append(probe("tiny-comm (56 px, 4x4)", args.work, train, val, preset="tiny", vision={},
                                      steps=ps, batch=32, threads=args.threads, seed=args.seed))
    out_dir = args.work if args.quick else args.results
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"grounding-{date:%Y-%m-%d-%H%M}")
    if os.path.exists(stem + ".json"):  # another run started within the same minute: keep both
        stem = os.path.join(out_dir, f"grounding-{date:%Y-%m-%d-%H%M%S}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    if results["runs"]:
        plot(results, stem + ".png")
    print(f"wrote {stem}.json" + (" and .png" if results["runs"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
