"""``comm-fast train``: two-stage COMM training (pretrain / finetune), single process or torchrun.

    comm-fast train --preset tiny --data synthetic                         # the embedded default
    comm-fast train --preset P --data synthetic|PATH --stage pretrain|finetune --steps N --out DIR
                    [--save-every K] [--resume] [--seed S]
    torchrun --nproc_per_node 2 -m comm_fast.cli train ... [--fsdp]        # DDP, or FSDP2 with --fsdp

One optimizer step consumes a global batch of batch_size x grad_accum x world_size samples, taken in
order from a seeded per-epoch permutation; rank r takes its own contiguous slice. Every token loss is
divided by the global batch's number of target tokens, so the result does not depend on how the batch
is split over micro-batches, ranks, or packed rows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch

from comm_fast.mllm import VARLEN_SDPA
from comm_fast.training import checkpoint

STAGES = ("pretrain", "finetune")
# (pretrain, finetune) learning rates: LLaVA's for real models; the tiny model learns from scratch
DEFAULT_LR = {"tiny": (2e-3, 2e-3), "1b": (1e-3, 2e-5), "comm-7b": (1e-3, 2e-5)}


class UsageError(Exception):
    """Bad input: reported as one clear line, exit status 2, nothing written."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=["tiny", "1b", "comm-7b"],
                   help="model shape (random init) and the vision options used with --llm/--clip/--dino")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (generated into DIR/data-synthetic), a LLaVA JSON file or a directory "
                        "with <stage>.json")
    p.add_argument("--image-folder", help="root of the JSON's image paths (default: the JSON's directory)")
    p.add_argument("--stage", default="finetune", choices=STAGES)
    p.add_argument("--steps", type=int, default=80, help="optimizer steps in all")
    p.add_argument("--out", help="run directory (default: runs/<preset>-<stage>)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="start from a saved COMMForCausalLM directory (e.g. a pretrain run's DIR/model)")
    p.add_argument("--llm", help="Llama/Vicuna checkpoint directory (with --clip and --dino)")
    p.add_argument("--clip", help="CLIP checkpoint directory")
    p.add_argument("--dino", help="DINOv2 checkpoint directory")
    p.add_argument("--tune-llm", action=argparse.BooleanOptionalAction, default=None,
                   help="train the LLM too (default: off for pretrain, on for finetune)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default depends on preset and stage)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, help="longest sequence in tokens (default: the preset's)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack each micro-batch into rows, attention kept within each sample (default: on "
                        "when attention runs per sample: flash-attn varlen, or comm_fast's varlen SDPA)")
    p.add_argument("--pack-length", type=int,
                   help="tokens per packed row (default: one row per micro-batch with per-sample attention, "
                        "else 2 x max-length, as a block-diagonal mask costs row_length^2)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of the LLM blocks")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) records with bad images")
    p.add_argument("--synthetic-n", type=int, default=400, help="images in the generated synthetic set")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads per process (default: 1 for the tiny preset on CPU, whose small "
                        "matmuls gain little from a second thread and lose badly when cores are shared)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate an interruption


# -- distributed ------------------------------------------------------------------------------------
class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -- building ---------------------------------------------------------------------------------------
def build_model(args):
    from comm_fast.data.tokenizer import ByteTokenizer
    from comm_fast.mllm import COMMConfig, COMMForCausalLM

    if args.model:
        return COMMForCausalLM.from_pretrained(args.model)
    if any((args.llm, args.clip, args.dino)):
        if not all((args.llm, args.clip, args.dino)):
            raise UsageError("--llm, --clip and --dino go together (a Llama checkpoint and both encoders)")
        vision = COMMConfig.preset(args.preset).vision.to_dict()
        options = {k: vision[k] for k in ("clip_layers", "dino_layers", "mlp_ratio", "mlp_activation", "combine",
                                          "layer_weights", "per_layer_linear", "grid_resample",
                                          "clip_image_size", "dino_image_size")}
        return COMMForCausalLM.from_components(args.llm, args.clip, args.dino, **options)
    config = COMMConfig.preset(args.preset)
    return COMMForCausalLM(config, ByteTokenizer())


def configure_stage(model, stage: str, tune_llm: bool | None) -> set[str]:
    """Encoders frozen always; merge heads, DINOv2 MLP and projector trained; the LLM per stage. Returns
    the names of the trainable parameters."""
    tune_llm = (stage == "finetune") if tune_llm is None else tune_llm
    for p in model.parameters():
        p.requires_grad_(False)
    for name in model.vision.HEADS:
        for p in getattr(model.vision, name).parameters():
            p.requires_grad_(True)
    if tune_llm:
        for p in model.llm.parameters():
            p.requires_grad_(True)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def preprocess(paths: list[str], vision_config):
    from comm_fast import ops
    from comm_fast.data.dataset import load_images

    if not paths:
        return None
    return ops.joint_preprocess(load_images(paths), vision_config.clip_image_size, vision_config.dino_image_size)


def fingerprint(args, model, dataset, world: int) -> dict:
    """What must match for a resumed run to continue the same run."""
    return {"model": model.config.to_dict(), "stage": args.stage, "tune_llm": args.tune_llm, "seed": args.seed,
            "data": dataset.json_path, "num_samples": len(dataset), "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "world_size": world, "steps": args.steps, "lr": args.lr,
            "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "max_length": args.max_length, "pack": args.pack,
            "pack_length": args.pack_length}


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut off by a crash counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# -- the run ----------------------------------------------------------------------------------------
def train(args) -> dict:
    """Run training; returns a summary. Raises UsageError on bad input before anything is written."""
    from comm_fast.data.dataset import ConversationDataset, DataOrder, collate, resolve_data
    from comm_fast.data.synthetic import make_synthetic

    if args.threads is None and args.preset == "tiny" and not torch.cuda.is_available():
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    out = os.path.abspath(args.out or os.path.join("runs", f"{args.preset}-{args.stage}"))
    dist = Dist()
    try:
        # 1. everything that can fail on bad input, before anything is written
        if args.resume:
            found = checkpoint.latest_complete(out)
            if found is None:
                partial = [n for n in (os.listdir(out) if os.path.isdir(out) else []) if "checkpoint-" in n]
                raise UsageError(f"--resume: {out} holds no complete checkpoint"
                                 + (f" (incomplete: {', '.join(sorted(partial))})" if partial else ""))
        elif checkpoint.list_checkpoints(out):
            raise UsageError(f"--out: {out} already holds checkpoints; pass --resume to continue that run "
                             "or choose another --out")
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        model = build_model(args)
        if model.tokenizer is None:
            raise UsageError("model: no tokenizer found next to the weights (tokenizer files are needed to train)")
        args.max_length = args.max_length or model.config.max_length
        varlen = model.llm.config._attn_implementation in ("flash_attention_2", VARLEN_SDPA)
        if args.pack is None:
            args.pack = varlen
        if args.pack_length is None and not varlen:
            args.pack_length = 2 * args.max_length
        if args.data == "synthetic":
            data_dir = os.path.join(out, "data-synthetic")
            if dist.rank == 0 and not os.path.isdir(data_dir):
                make_synthetic(data_dir, args.synthetic_n, seed=args.seed)
            dist.barrier()
            json_path, image_folder = resolve_data(data_dir, args.stage)
        else:
            json_path, image_folder = resolve_data(args.data, args.stage, args.image_folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = ConversationDataset(json_path, image_folder, model.tokenizer, model.num_image_tokens,
                                          args.max_length, skip_bad_images=args.skip_bad_images)
        if dist.rank == 0:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
        trainable = configure_stage(model, args.stage, args.tune_llm)
        args.lr = args.lr or DEFAULT_LR.get(args.preset, (1e-3, 2e-5))[STAGES.index(args.stage)]
        prints = fingerprint(args, model, dataset, dist.world)
        if args.resume:
            ckpt_path, ckpt_state = found
            diff = _differences(ckpt_state.get("fingerprint", {}), prints)
            if diff:
                raise UsageError(f"--resume: {ckpt_path} belongs to a run of another config (differs in: "
                                 f"{', '.join(diff)})")

        # 2. the engine
        model.to(dist.device)
        if args.grad_checkpointing:
            model.enable_activation_checkpointing()
        model.train()
        engine = model
        if dist.world > 1 and args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.llm.model.layers:
                fully_shard(layer)
            fully_shard(model)
        elif dist.world > 1:
            engine = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
        warmup = max(1, round(args.warmup_ratio * args.steps)) if args.warmup_ratio > 0 else 0
        scheduler = cosine_with_warmup(optimizer, warmup, args.steps)
        order = DataOrder(len(dataset), args.seed)
        start = 0
        if args.resume:
            checkpoint.load(ckpt_path, engine, optimizer, scheduler, trainable, dist.rank)
            start, order.position = ckpt_state["step"], ckpt_state["data_position"]

        # 3. outputs: metrics.jsonl keeps the steps up to the checkpoint we continue from
        metrics_path = os.path.join(out, "metrics.jsonl")
        if dist.rank == 0:
            os.makedirs(out, exist_ok=True)
            kept = []
            if args.resume and os.path.isfile(metrics_path):
                with open(metrics_path, encoding="utf-8") as f:
                    kept = [line for line in f if _step_of(line) <= start]
            with open(metrics_path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(metrics_path + ".tmp", metrics_path)
        dist.barrier()
        return _loop(args, dist, model, engine, optimizer, scheduler, dataset, order, trainable, prints,
                     start, out, metrics_path, collate)
    finally:
        dist.close()


def _loop(args, dist, model, engine, optimizer, scheduler, dataset, order, trainable, prints, start, out,
          metrics_path, collate) -> dict:
    from tqdm import tqdm

    micro, accum, world = args.batch_size, args.grad_accum, dist.world
    pad = model.tokenizer.pad_id
    use_autocast = dist.device.type == "cuda"  # bf16 autocast on GPU only; fp32 on CPU
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=args.steps, initial=start, disable=dist.rank != 0 or args.no_progress, dynamic_ncols=True,
               desc=f"{args.stage}")
    losses = []
    metrics_file = open(metrics_path, "a", encoding="utf-8") if dist.rank == 0 else None
    step = start
    try:
        while step < args.steps:
            if args.stop_after is not None and step - start >= args.stop_after:
                break
            t0 = time.perf_counter()
            global_idx = order.take(micro * accum * world)
            total_targets = dataset.num_label_tokens(global_idx)
            mine = global_idx[dist.rank * micro * accum:(dist.rank + 1) * micro * accum]
            loss_sum, tokens, images = 0.0, 0, 0
            for k in range(accum):
                batch = collate([dataset[i] for i in mine[k * micro:(k + 1) * micro]], pad, args.pack,
                                args.pack_length)
                pixels = preprocess(batch["image_paths"], model.config.vision)
                inputs = {key: batch[key].to(dist.device) for key in
                          ("input_ids", "labels", "attention_mask", "position_ids") if key in batch}
                last = k == accum - 1
                if world > 1 and args.fsdp:
                    model.set_requires_gradient_sync(last)
                sync = engine.no_sync() if world > 1 and not args.fsdp and not last else contextlib.nullcontext()
                with sync, torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    result = engine(**inputs, pixel_values=pixels, return_logits=False)
                    # world / total: the engines average gradients over ranks, we want the global token mean
                    (result.loss_sum * (world / max(total_targets, 1))).backward()
                loss_sum += result.loss_sum.detach().double()  # read once per step, not per micro-batch
                tokens += batch["num_tokens"]
                images += batch["num_images"]
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, tokens, images = dist.sum([float(loss_sum), tokens, images])
            dt = time.perf_counter() - t0
            loss = loss_sum / max(total_targets, 1)
            losses.append(loss)
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens / dt, "images_per_s": images / dt}
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
            if step % args.save_every == 0 or step == args.steps:
                checkpoint.save(out, step, engine, optimizer, scheduler, trainable,
                                {"data_position": order.position, "fingerprint": prints}, dist.rank, dist.barrier)
        if step == args.steps:
            _save_model(out, model, engine, dist)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {"out": out, "step": step, "losses": losses}


def _save_model(out: str, model, engine, dist) -> None:
    """The whole model as DIR/model (safetensors + tokenizer), for generation or the next stage."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(engine, options=checkpoint._options())
    if dist.rank == 0:
        model.save_pretrained(os.path.join(out, "model"), state_dict=sd)
    dist.barrier()


def run(args) -> int:
    threads = torch.get_num_threads()
    try:
        summary = train(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"comm-fast train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if int(os.environ.get("RANK", "0")) == 0 and summary["losses"]:
        first, last = summary["losses"][0], summary["losses"][-1]
        print(f"step {summary['step']}: loss {first:.4f} -> {last:.4f}; checkpoints and metrics.jsonl in "
              f"{summary['out']}")
    return 0
