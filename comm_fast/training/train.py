"""``comm-fast train``: two-stage COMM training (pretrain / finetune), single process or torchrun.

    comm-fast train --preset tiny --data synthetic                         # the embedded default
    comm-fast train --preset P --data synthetic|PATH --stage pretrain|finetune --steps N --out DIR
                    [--save-every K] [--resume] [--seed S]
                    [--lora [--lora-r R] ...]    # LoRA of the LLM (comm_fast.training.lora): writes DIR/adapter
    torchrun --nproc_per_node 2 -m comm_fast.cli train ... [--fsdp]        # DDP, or FSDP2 with --fsdp

One optimizer step consumes a global batch of batch_size x grad_accum x world_size samples, taken in
order from a seeded per-epoch permutation; rank r takes its own contiguous slice. Every token loss is
divided by the global batch's number of target tokens, so the result does not depend on how the batch
is split over micro-batches, ranks, or packed rows. A resumed run continues the interrupted one exactly:
weights, optimizer, schedule, data position and every rank's RNG streams (dropout) come from the checkpoint.
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

from comm_fast.models.packing import VARLEN_SDPA
from comm_fast.training import checkpoint, lora, report

STAGES = ("pretrain", "finetune")
DEFAULTS = {"weight_decay": 0.0, "warmup_ratio": 0.03, "max_grad_norm": 1.0}  # train's, and profile-train's


class UsageError(Exception):
    """Bad input: reported as one clear line, exit status 2, nothing written."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from comm_fast.cli import fraction, non_negative_float, positive_int
    from comm_fast.presets import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model shape and tokenizer (random init; default tiny), the vision options used with "
                        "--llm/--clip/--dino, and the defaults that go with it (with --model: only the defaults; "
                        "default: the preset the model's shape matches)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (generated into DIR/data-synthetic), a LLaVA JSON file or a directory "
                        "with <stage>.json")
    p.add_argument("--image-folder", help="root of the JSON's image paths (default: the JSON's directory)")
    p.add_argument("--stage", default="finetune", choices=STAGES)
    p.add_argument("--steps", type=positive_int, default=80, help="optimizer steps in all")
    p.add_argument("--out", help="run directory (default: runs/<preset>-<stage>)")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every K steps (and at the end)")
    p.add_argument("--report-to", default="none", choices=report.REPORT_TO,
                   help="also log loss, learning rate, tokens/s and grad norm per step to TensorBoard "
                        "(DIR/tensorboard) or W&B (DIR/wandb, offline unless WANDB_MODE is set); "
                        "DIR/metrics.jsonl is always written")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="start from a saved COMMForCausalLM directory (e.g. a pretrain run's DIR/model)")
    p.add_argument("--llm", help="Llama/Vicuna checkpoint directory (with --clip and --dino)")
    p.add_argument("--clip", help="CLIP checkpoint directory")
    p.add_argument("--dino", help="DINOv2 checkpoint directory")
    p.add_argument("--tune-llm", action=argparse.BooleanOptionalAction, default=None,
                   help="train the LLM too (default: off for pretrain, on for finetune)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per micro-batch per process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=non_negative_float,
                   help="peak learning rate (default: the preset's, or the --model's preset's, for the stage; "
                        "1e-3 pretrain / 2e-5 finetune for pretrained weights)")
    p.add_argument("--weight-decay", type=non_negative_float, default=DEFAULTS["weight_decay"])
    p.add_argument("--warmup-ratio", type=fraction, default=DEFAULTS["warmup_ratio"],
                   help="fraction of the steps warming up")
    p.add_argument("--max-grad-norm", type=non_negative_float, default=DEFAULTS["max_grad_norm"],
                   help="gradient clipping (0: none)")
    p.add_argument("--dropout", type=fraction,
                   help="attention dropout of the LLM while training (default: the model's own, 0 for the presets)")
    p.add_argument("--max-length", type=positive_int, help="longest sequence in tokens (default: the model's)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack each micro-batch into rows, attention kept within each sample (default: on "
                        "when attention runs per sample: flash-attn varlen, or comm_fast's varlen SDPA)")
    p.add_argument("--pack-length", type=positive_int,
                   help="tokens per packed row (default: one row per micro-batch with per-sample attention, "
                        "else 2 x max-length, as a block-diagonal mask costs row_length^2)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of the LLM blocks")
    add_llm_kernels_argument(p)
    lora.add_train_arguments(p)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) records with bad images")
    p.add_argument("--synthetic-n", type=positive_int, default=400, help="images in the generated synthetic set")
    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads per process (default: the preset's on CPU, 1 for tiny; else torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_llm_kernels_argument(p: argparse.ArgumentParser) -> None:
    from comm_fast.models.llm_kernels import LLM_KERNELS

    p.add_argument("--llm-kernels", default="auto", choices=LLM_KERNELS,
                   help="the LM loss (and with liger the decoder's RMSNorm/RoPE/SwiGLU): liger = Liger-Kernel "
                        "(CUDA, liger-kernel installed), chunked = chunked linear cross-entropy (no [tokens, vocab] "
                        "logits), eager = transformers' (default auto: liger when it can run, else chunked)")


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
    """(model, preset or None): random init of a preset, --model, or --llm/--clip/--dino. The preset gives
    the defaults (learning rates, threads): the one the model's shape comes from; for --model the one
    named by --preset, else the preset its shape matches, if any (the model keeps its own shape)."""
    from comm_fast import presets
    from comm_fast.mllm import COMMForCausalLM

    if args.model:
        model = COMMForCausalLM.from_pretrained(args.model)
        return model, presets.get(args.preset) if args.preset else presets.match(model.config)
    preset = presets.get(args.preset or "tiny")
    if any((args.llm, args.clip, args.dino)):
        if not all((args.llm, args.clip, args.dino)):
            raise UsageError("--llm, --clip and --dino go together (a Llama checkpoint and both encoders)")
        vision = preset.config().vision.to_dict()
        options = {k: vision[k] for k in ("clip_layers", "dino_layers", "mlp_ratio", "mlp_activation", "combine",
                                          "layer_weights", "per_layer_linear", "grid_resample",
                                          "clip_image_size", "dino_image_size")}
        return COMMForCausalLM.from_components(args.llm, args.clip, args.dino, **options), None
    config, tokenizer = preset.config(), preset.tokenizer()
    presets.check_tokenizer(config, tokenizer)
    return COMMForCausalLM(config, tokenizer), preset


def set_dropout(model, p: float) -> None:
    """Attention dropout of every LLM layer (active in train mode only), kept in the saved config."""
    model.config.text["attention_dropout"] = p
    model.llm.config.attention_dropout = p
    for layer in model.llm.model.layers:
        layer.self_attn.attention_dropout = p


def configure_stage(model, stage: str, tune_llm: bool | None) -> set[str]:
    """Encoders frozen always; merge heads, DINOv2 MLP and projector trained; the LLM per stage (only its
    LoRA adapters when it carries them). Returns the names of the trainable parameters."""
    tune_llm = (stage == "finetune") if tune_llm is None else tune_llm
    for p in model.parameters():
        p.requires_grad_(False)
    for name in model.vision.HEADS:
        for p in getattr(model.vision, name).parameters():
            p.requires_grad_(True)
    if tune_llm:
        adapters = lora.adapted(model) is not None
        for name, p in model.llm.named_parameters():
            if not adapters or lora.is_adapter_param(name):
                p.requires_grad_(True)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """A linear warm-up to the peak that starts at 1/(warmup + 1) of it, not at 0 (every step trains), then
    transformers' cosine decay to 0 at ``total``."""
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, lr: float, weight_decay: float, warmup_ratio: float, steps: int):
    """AdamW (no weight decay on biases and norms) and its warm-up + cosine schedule over ``steps``."""
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
    warmup = max(1, round(warmup_ratio * steps)) if warmup_ratio > 0 else 0
    return optimizer, cosine_with_warmup(optimizer, warmup, steps)


def packing_defaults(model, max_length: int) -> tuple[bool, int | None]:
    """(pack, pack_length) when not given: pack where attention runs per sample (one row per micro-batch),
    else padded batches (a packed row would cost row_length^2 under a block-diagonal mask; 2 x max_length
    when packing is asked for)."""
    varlen = model.llm.config._attn_implementation in ("flash_attention_2", VARLEN_SDPA)
    return varlen, None if varlen else 2 * max_length


def preprocess(paths: list[str], vision_config):
    from comm_fast import ops
    from comm_fast.data.dataset import load_images

    if not paths:
        return None
    return ops.joint_preprocess(load_images(paths), vision_config.clip_image_size, vision_config.dino_image_size,
                                aspect=vision_config.aspect)


def _no_mark(name: str) -> None:
    pass


class TrainStep:
    """One optimizer step over a global batch, as ``train`` and ``profile-train`` both run it.

    Per micro-batch: collate, preprocess, forward under autocast (bf16 on GPU), backward of its share of
    the global token mean; then clipping, the optimizer and scheduler steps. Every token loss is divided by
    the global batch's number of target tokens, once: that share is both what backward differentiates and
    what the logged loss sums, so neither depends on how the batch is split over micro-batches, ranks, or
    packed rows. ``world`` > 1: the engine averages gradients over ranks, so each rank's share is scaled by
    ``world``; ``reduce`` sums a list of floats over ranks. ``mark(name)`` is called at the phase
    boundaries ("data" after each micro-batch's inputs, "forward_end", "backward_end", "optimizer_end") for
    the profiler, which also sees the ``comm_fast::preprocess/backward/optimizer`` ranges.
    """

    def __init__(self, model, engine, optimizer, scheduler, dataset, device, params=None, *, pack: bool,
                 pack_length: int | None, max_grad_norm: float, micro_batch: int, grad_accum: int = 1,
                 world: int = 1, rank: int = 0, fsdp: bool = False, reduce=None):
        self.model, self.engine, self.optimizer, self.scheduler = model, engine, optimizer, scheduler
        self.dataset, self.device = dataset, torch.device(device)
        self.params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        self.pack, self.pack_length, self.max_grad_norm = pack, pack_length, max_grad_norm
        self.micro, self.accum, self.world, self.rank, self.fsdp = micro_batch, grad_accum, world, rank, fsdp
        self.reduce = reduce or (lambda values: values)
        self.autocast = self.device.type == "cuda"  # bf16 autocast on GPU only; fp32 on CPU

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def __call__(self, global_idx: list[int], mark=_no_mark) -> dict:
        from comm_fast.data.dataset import collate

        if len(global_idx) != self.global_batch:
            raise ValueError(f"global_idx: expected {self.global_batch} samples, got {len(global_idx)}")
        model, engine, device, micro = self.model, self.engine, self.device, self.micro
        total_targets = self.dataset.num_label_tokens(global_idx)
        norm = 1.0 / max(total_targets, 1)
        mine = global_idx[self.rank * micro * self.accum:(self.rank + 1) * micro * self.accum]
        loss = torch.zeros((), dtype=torch.float64, device=device)
        tokens = images = computed = targets = 0
        for k in range(self.accum):
            with torch.profiler.record_function("comm_fast::preprocess"):
                batch = collate([self.dataset[i] for i in mine[k * micro:(k + 1) * micro]],
                                model.tokenizer.pad_id, self.pack, self.pack_length)
                pixels = preprocess(batch["image_paths"], model.config.vision)
                if pixels is not None:
                    pixels = tuple(x.to(device, non_blocking=True) for x in pixels)
                inputs = {key: batch[key].to(device, non_blocking=True) for key in
                          ("input_ids", "labels", "attention_mask", "position_ids") if key in batch}
            mark("data")
            last = k == self.accum - 1
            if self.world > 1 and self.fsdp:
                engine.set_requires_gradient_sync(last)
            sync = (engine.no_sync() if self.world > 1 and not self.fsdp and not last else contextlib.nullcontext())
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    result = engine(**inputs, pixel_values=pixels, return_logits=False)
                share = result.loss_sum * norm  # this micro-batch's part of the global token mean
                mark("forward_end")
                with torch.profiler.record_function("comm_fast::backward"):
                    (share * self.world).backward()
                mark("backward_end")
            loss += share.detach()
            tokens += batch["num_tokens"]
            images += batch["num_images"]
            computed += int(batch["input_ids"].numel())
            targets += result.num_label_tokens
        with torch.profiler.record_function("comm_fast::optimizer"):
            # the norm before clipping (infinite max: measured, not clipped)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer_end")
        loss, tokens, images, targets = self.reduce([float(loss), tokens, images, targets])  # one read per step
        if int(targets) != total_targets:  # the normalisation above would not be the mean the model computes
            raise RuntimeError(f"the model counted {int(targets)} target tokens in the global batch, the dataset "
                               f"{total_targets}")
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        return {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": int(tokens), "images": int(images),
                "computed_tokens": computed, "targets": total_targets}


def fingerprint(args, model, dataset, world: int) -> dict:
    """What must match for a resumed run to continue the same run (resolved values, not the flags)."""
    return {"model": model.config.to_dict(), "stage": args.stage, "tune_llm": args.tune_llm, "seed": args.seed,
            "data": dataset.json_path, "num_samples": len(dataset), "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "world_size": world, "steps": args.steps, "lr": args.lr,
            "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "max_length": args.max_length, "pack": args.pack,
            "pack_length": args.pack_length, "dropout": args.dropout}


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut off by a crash counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def training_seed(seed: int, rank: int) -> int:
    """The seed of the generators once the model is built (dropout): a stream of each rank's own."""
    return seed * 1009 + rank


class StepFailed(RuntimeError):
    """A failure in the middle of a run, with the step it happened in and where the run's checkpoints are."""


# -- the run ----------------------------------------------------------------------------------------
def train(args) -> dict:
    """Run training; returns a summary. Raises UsageError on bad input before anything is written, and
    StepFailed (from the error) when a step fails."""
    from comm_fast.data.dataset import ConversationDataset, DataOrder, resolve_data
    from comm_fast.data.synthetic import make_synthetic
    from comm_fast.presets import PRETRAINED_LR

    dist = Dist()
    try:
        # 1. everything that can fail on bad input, before anything is written
        seed_all(args.seed)  # the same initial weights on every rank
        try:
            model, preset = build_model(args)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from exc
        if args.threads is None and preset is not None and preset.cpu_threads and dist.device.type == "cpu":
            args.threads = preset.cpu_threads
        if args.threads:
            torch.set_num_threads(args.threads)
        name = preset.name if preset else "model"
        out = os.path.abspath(args.out or os.path.join("runs", f"{name}-{args.stage}"))
        if args.resume:
            found = checkpoint.latest_complete(out)
            if found is None:
                partial = [n for n in (os.listdir(out) if os.path.isdir(out) else []) if "checkpoint-" in n]
                raise UsageError(f"--resume: {out} holds no complete checkpoint"
                                 + (f" (incomplete: {', '.join(sorted(partial))})" if partial else ""))
        elif checkpoint.list_checkpoints(out):
            raise UsageError(f"--out: {out} already holds checkpoints; pass --resume to continue that run "
                             "or choose another --out")
        missing = report.missing_package(args.report_to)
        if missing:
            raise UsageError(f"--report-to: {missing}")
        if model.tokenizer is None:
            raise UsageError("model: no tokenizer found next to the weights (tokenizer files are needed to train)")
        if args.dropout is None:
            args.dropout = float(model.config.text.get("attention_dropout", 0.0) or 0.0)
        set_dropout(model, args.dropout)
        try:
            model.set_llm_kernels(args.llm_kernels, dist.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        try:  # LoRA (comm_fast.training.lora): adapters on the LLM, the heads trained fully
            lora_info = lora.setup(args, model, dist.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if args.max_length is None:
            args.max_length = model.config.max_length
        pack, pack_length = packing_defaults(model, args.max_length)
        if args.pack is None:
            args.pack = pack
        if args.pack_length is None:
            args.pack_length = pack_length
        args.tune_llm = args.stage == "finetune" if args.tune_llm is None else args.tune_llm
        if args.lr is None:
            args.lr = (preset.lr if preset else PRETRAINED_LR)[STAGES.index(args.stage)]
            if lora_info and not preset:
                args.lr = lora.LORA_LR
        try:
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
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from exc
        if dist.rank == 0:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
        trainable = configure_stage(model, args.stage, args.tune_llm)
        prints = fingerprint(args, model, dataset, dist.world)
        if lora_info:
            prints["lora"] = lora_info
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
        optimizer, scheduler = make_optimizer((p for p in model.parameters() if p.requires_grad), args.lr,
                                              args.weight_decay, args.warmup_ratio, args.steps)
        order = DataOrder(len(dataset), args.seed)
        seed_all(training_seed(args.seed, dist.rank))
        start = 0
        if args.resume:  # the weights, optimizer, schedule, data position and every RNG stream as they were
            checkpoint.load(ckpt_path, engine, optimizer, scheduler, trainable, dist.rank)
            start, order.position = ckpt_state["step"], ckpt_state["data_position"]
        step = TrainStep(model, engine, optimizer, scheduler, dataset, dist.device, pack=args.pack,
                         pack_length=args.pack_length, max_grad_norm=args.max_grad_norm, micro_batch=args.batch_size,
                         grad_accum=args.grad_accum, world=dist.world, rank=dist.rank, fsdp=args.fsdp,
                         reduce=dist.sum)

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
        return _loop(args, dist, model, engine, step, order, trainable, prints, start, out, metrics_path)
    finally:
        dist.close()


def _loop(args, dist, model, engine, train_step, order, trainable, prints, start, out, metrics_path) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=dist.rank != 0 or args.no_progress, dynamic_ncols=True,
               desc=f"{args.stage}")
    losses = []
    metrics_file = open(metrics_path, "a", encoding="utf-8") if dist.rank == 0 else None
    reporter = report.open_reporter(args.report_to, out, prints, start) if dist.rank == 0 else None
    step = start
    doing = ""
    try:
        while step < args.steps:
            doing = f"step {step + 1} of {args.steps}"
            t0 = time.perf_counter()
            r = train_step(order.take(train_step.global_batch))
            step += 1
            dt = time.perf_counter() - t0
            losses.append(r["loss"])
            record = {"step": step, "loss": r["loss"], "lr": r["lr"], "tokens_per_s": r["tokens"] / dt,
                      "images_per_s": r["images"] / dt, "grad_norm": r["grad_norm"]}
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")  # one whole line per step
                metrics_file.flush()
            if reporter:
                reporter.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=f"{r['tokens'] / dt:,.0f}")
            if step % args.save_every == 0 or step == args.steps:
                doing = f"writing checkpoint-{step}"
                checkpoint.save(out, step, engine, train_step.optimizer, train_step.scheduler, trainable,
                                {"data_position": order.position, "fingerprint": prints, "lora": prints.get("lora")},
                                dist.rank, dist.barrier, dist.world)
        doing = "saving the model"
        _save_model(out, model, engine, dist, trainable, prints.get("lora"))
    except Exception as exc:
        done = checkpoint.latest_complete(out)
        where = (f"the last complete checkpoint is {done[0]} (continue with --resume)" if done
                 else "no checkpoint was written")
        raise StepFailed(f"{doing} failed ({type(exc).__name__}: {exc}); {where}") from exc
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if reporter:
            reporter.close()
    return {"out": out, "step": step, "losses": losses, "lora": "lora" in prints}


def _save_model(out: str, model, engine, dist, trainable: set[str], lora_info: dict | None) -> None:
    """The whole model as DIR/model (safetensors + tokenizer), for generation or the next stage; with LoRA
    the adapter and the heads as DIR/adapter (comm-fast merge-lora makes a model of it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(engine, options=checkpoint._options())
    if dist.rank == 0 and lora_info:
        lora.save_model(os.path.join(out, "adapter"), model, {k: v for k, v in sd.items() if k in trainable},
                        lora_info)
    elif dist.rank == 0:
        model.save_pretrained(os.path.join(out, "model"), state_dict=sd)
    dist.barrier()


def run(args) -> int:
    threads = torch.get_num_threads()
    try:
        summary = train(args)
    except UsageError as exc:
        print(f"comm-fast train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if int(os.environ.get("RANK", "0")) == 0 and summary["losses"]:
        first, last = summary["losses"][0], summary["losses"][-1]
        print(f"step {summary['step']}: loss {first:.4f} -> {last:.4f}; checkpoints and metrics.jsonl in "
              f"{summary['out']}")
        if summary["lora"]:
            print(f"LoRA adapter in {summary['out']}/adapter: comm-fast merge-lora --model {summary['out']}/adapter "
                  "--out DIR writes a plain model")
    return 0
