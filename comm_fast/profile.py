"""``comm-fast profile-train``: real training steps of COMMForCausalLM, timed and broken down.

    comm-fast profile-train [--preset tiny|1b|comm-7b] [--steps N] [--batch-size B] [--stage S]
                            [--baseline] [--trace FILE.json] [--json FILE]
                            [--llm-kernels auto|liger|chunked|eager] [--llm-variants]

A model of the preset (random init, with the preset's tokenizer) trains on a synthetic set generated
into a temporary directory, with ``comm-fast train``'s own step (``training.train.TrainStep``: collate,
preprocessing, bf16 autocast on GPU, backward of the global token mean, grad clipping, AdamW with its
weight-decay groups and schedule), which the profiler only instruments (marks at the step's phase
boundaries, forward hooks on the visual branch). Each variant has an optimizer of its own. Variants
run side by side in one process, interleaved step by step on the same batches: ours with packed rows,
ours with padded batches, and with ``--baseline`` ours packed with the visual branch swapped for
``COMMReference.from_tower`` (transformers' CLIPVisionModel / Dinov2Model with
``output_hidden_states=True`` and per-layer nn.LayerNorm / nn.Linear, same weights). With ``--llm-variants``, ours packed also runs
with each other LM loss (``eager``: the [tokens, vocab] logits; ``chunked``: comm_fast.ops.linear_ce), the
decoder's kernels shared, for the loss variants' peak memory and tokens/s side by side.

Reported per variant: step time (median of the measured steps, after warm-up), tokens/s and
images/s (real tokens: image and text tokens, no padding), peak memory of one step, model FLOPs
utilisation against the GEMM rate measured here at the start (``comm_fast.bench.gemm_tflops``), and
the time split of a step, from synchronised timers (CUDA events on GPU) at the phase boundaries:

    preprocess      collate + image decode + joint_preprocess + host-to-device copy
    encoders        CLIP and DINOv2 forward (frozen: no autograd graph)
    heads_fwd       multi-level merges, token resampling, DINOv2 MLP and projector, forward
    llm_fwd         image-token expansion, embedding, decoder, LM head on the label positions, loss
    llm_bwd         backward from the loss to the visual tokens' gradient
    heads_bwd       the rest of backward: merges/MLP/projector (and the embedding's weight gradient,
                    which autograd runs after the visual tokens' gradient)
    optimizer       gradient clipping, AdamW step, zero_grad

One more pass of ours (packed) runs under torch.profiler: the ``comm_fast::*`` record_function
ranges (``vision``/``llm_forward`` in COMMForCausalLM.forward, the encoders, ``preprocess``,
``backward``, ``optimizer``) give a second, independent split, and ``--trace`` writes its Chrome trace.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

PHASES = ("preprocess", "encoders", "heads_fwd", "llm_fwd", "llm_bwd", "heads_bwd", "optimizer", "other")
PHASE_NAMES = {"preprocess": "preprocessing (collate, decode, joint_preprocess)",
               "encoders": "vision encoders (frozen, forward)", "heads_fwd": "merge/MLP/projector forward",
               "llm_fwd": "LLM forward (+ loss)", "llm_bwd": "LLM backward",
               "heads_bwd": "merge/MLP/projector backward",
               "optimizer": "optimizer (clip, AdamW, zero_grad)", "other": "other"}
FLOPS_METHOD = (
    "model FLOPs per step, counted from the batch's real tokens (padding never counts, so packed and padded "
    "batches do the same model FLOPs): LLM 6*P*T for its trained weights (4*P*T when frozen in pretrain: "
    "only input gradients), P = decoder-layer weights (embedding lookup excluded), T = sequence tokens "
    "(text + image); LM head 6*V*H per label token (it runs on label positions only); attention 12*L*H*sum(s_i^2) "
    "over samples (causal counted in full, as in PaLM's MFU); each frozen encoder forward only, "
    "2*P*T + 4*L*D*T^2 per image over the blocks it runs (T = patches + prefix tokens); trained merge/MLP/"
    "projector weights 6*P*tokens they see. MFU = FLOPs / step time / GEMM peak measured here "
    "(n x n matmul in the training dtype).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from comm_fast.cli import non_negative_int, positive_int
    from comm_fast.presets import PRESETS
    from comm_fast.training.train import add_llm_kernels_argument

    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape and tokenizer (random init)")
    p.add_argument("--steps", type=positive_int, default=5, help="measured steps per variant (after --warmup)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="warm-up steps per variant, not measured")
    p.add_argument("--batch-size", type=positive_int, help="samples per step (default: the preset's, 8; 4 for comm-7b)")
    p.add_argument("--stage", default="finetune", choices=["pretrain", "finetune"])
    p.add_argument("--baseline", action="store_true",
                   help="also run the naive transformers composition of the visual branch and report the ratio")
    p.add_argument("--no-padded", action="store_true", help="skip the padded-batch variant")
    p.add_argument("--trace", help="write the profiled steps' Chrome trace (JSON) here")
    p.add_argument("--profile-steps", type=positive_int, default=1,
                   help="steps of ours (packed) run under torch.profiler")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of the LLM blocks")
    add_llm_kernels_argument(p)
    p.add_argument("--llm-variants", action="store_true",
                   help="also run ours packed with each other LM loss (eager, chunked), side by side")
    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: the preset's on CPU, as comm-fast train; else torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


# -- timing ---------------------------------------------------------------------------------------
class Clock:
    """Named marks on one timeline: perf_counter on CPU, CUDA events (no synchronisation) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def times_ms(self) -> list[tuple[str, float]]:
        """(name, ms since the first mark); call after the step has synchronised."""
        if not self.marks:
            return []
        first = self.marks[0][1]
        if self.cuda:
            return [(n, first.elapsed_time(e)) for n, e in self.marks]
        return [(n, (t - first) * 1e3) for n, t in self.marks]


class Probe:
    """Forward hooks on a visual branch: marks where it and its encoders start and end, a mark when the
    visual tokens' gradient arrives in backward, and a profiler range per encoder."""

    def __init__(self, clock: Clock, vision: torch.nn.Module, encoders: dict[str, torch.nn.Module]):
        self.clock, self.handles, self.ranges = clock, [], []
        self.handles.append(vision.register_forward_pre_hook(lambda m, a: clock.mark("vision_start")))
        self.handles.append(vision.register_forward_hook(self._vision_end))
        for name, enc in encoders.items():
            self.handles.append(enc.register_forward_pre_hook(self._enc_start(name)))
            self.handles.append(enc.register_forward_hook(self._enc_end))

    def _enc_start(self, name):
        def hook(module, args):
            self.clock.mark("enc_start")
            rf = torch.profiler.record_function(f"comm_fast::vision_encoder.{name}")
            rf.__enter__()
            self.ranges.append(rf)
        return hook

    def _enc_end(self, module, args, out):
        if self.ranges:
            self.ranges.pop().__exit__(None, None, None)
        self.clock.mark("enc_end")

    def _vision_end(self, module, args, out):
        self.clock.mark("vision_end")
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self.clock.mark("features_grad"))

    def remove(self):
        for h in self.handles:
            h.remove()


def split_step(marks: list[tuple[str, float]], total_ms: float) -> dict[str, float]:
    """Phase durations (ms) of one step from its marks; 'other' is what no phase covers."""
    first: dict[str, float] = {}
    enc, start = 0.0, None
    for name, t in marks:
        first.setdefault(name, t)
        if name == "enc_start":
            start = t
        elif name == "enc_end" and start is not None:
            enc, start = enc + t - start, None
    vision = first["vision_end"] - first["vision_start"]
    grad = first.get("features_grad", first["backward_end"])  # no visual gradient: all backward is LLM
    out = {"preprocess": first["data"],
           "encoders": enc,
           "heads_fwd": vision - enc,
           "llm_fwd": first["forward_end"] - first["data"] - vision,
           "llm_bwd": grad - first["forward_end"],
           "heads_bwd": first["backward_end"] - grad,
           "optimizer": first["optimizer_end"] - first["backward_end"]}
    out["other"] = max(0.0, total_ms - sum(out.values()))
    return out


# -- the model and its baseline twin ----------------------------------------------------------------
class BaselineVision(torch.nn.Module):
    """COMMReference (transformers encoders + per-layer modules) behind the tower's interface."""

    def __init__(self, ref: torch.nn.Module, num_tokens: int):
        super().__init__()
        self.ref = ref
        self.num_tokens = num_tokens
        for p in (*ref.clip_model.parameters(), *ref.dino_model.parameters()):
            p.requires_grad_(False)

    @property
    def projector(self):
        return self.ref.projector

    def forward(self, clip_pixels, dino_pixels):
        return self.ref(clip_pixels, dino_pixels)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def flop_counter(model, tune_llm: bool):
    """A function (sample lengths, label tokens, images) -> model FLOPs of one training step (FLOPS_METHOD)."""
    llm = model.llm
    cfg = llm.config
    layers = _numel(llm.model.layers)
    head = llm.lm_head.weight.numel()
    f_llm = 6 if tune_llm else 4
    vc = model.config.vision
    per_image = 0
    grids = {}
    for name, size, wanted in (("clip", vc.clip_image_size, vc.clip_layers), ("dino", vc.dino_image_size,
                                                                               vc.dino_layers)):
        enc = getattr(model.vision, name)
        run = max(wanted)
        grid = (size // enc.config.patch_size) ** 2
        grids[name] = grid
        t = grid + enc.config.num_prefix_tokens
        p = _numel(enc.patch_embed) + sum(_numel(b) for b in enc.blocks[:run])
        per_image += 2 * p * t + 4 * run * enc.config.hidden_size * t * t
    n = model.num_image_tokens
    v = model.vision
    per_image += 6 * (_numel(v.clip_merge) * grids["clip"] + _numel(v.dino_merge) * grids["dino"]
                      + (_numel(v.dino_mlp) + _numel(v.projector)) * n)

    def count(lengths: list[int], label_tokens: int, images: int) -> float:
        tokens = sum(lengths)
        attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * sum(s * s for s in lengths)
        return float(f_llm * layers * tokens + attn + f_llm * head * label_tokens + per_image * images)

    return count


# -- the run ----------------------------------------------------------------------------------------
class Variant:
    """One way of running the step (packed or padded, our visual branch or the baseline's), with its own
    optimizer and schedule over its trainable weights and its own ``TrainStep``."""

    def __init__(self, name: str, label: str, pack: bool, vision, probe: Probe, train_step, llm_kernels: str):
        self.name, self.label, self.pack, self.vision = name, label, pack, vision
        self.llm_kernels = llm_kernels  # the LM loss it runs (the model's decoder kernels are shared)
        self.probe, self.train_step = probe, train_step
        self.records: list[dict] = []
        self.peak_mem_mb = None

    @property
    def params(self):
        return self.train_step.params

    @property
    def optimizer(self):
        return self.train_step.optimizer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Session:
    """A preset's model, a synthetic set in a temporary directory, fixed batches and the variants, each
    with a fresh optimizer; ``step(variant, batch_index)`` runs ``comm-fast train``'s own step
    (``TrainStep``) with the profiler's marks and returns its timings. ``close()`` removes the temporary
    directory. ``steps``: the schedule's length (default: the number of batches)."""

    def __init__(self, preset: str = "tiny", stage: str = "finetune", batch_size: int | None = None,
                 num_batches: int = 4, baseline: bool = False, padded: bool = True, device=None, seed: int = 0,
                 grad_checkpointing: bool = False, log=None, steps: int | None = None, llm_kernels: str = "auto",
                 llm_variants: bool = False):
        from comm_fast import presets
        from comm_fast.data.dataset import ConversationDataset, DataOrder, resolve_data
        from comm_fast.data.synthetic import make_synthetic
        from comm_fast.mllm import COMMForCausalLM
        from comm_fast.reference import COMMReference
        from comm_fast.training import train

        log = log or (lambda msg: None)
        self.device = device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        spec = presets.get(preset)
        self.batch_size = batch_size = batch_size or spec.profile_batch
        if batch_size < 1:
            raise ValueError(f"--batch-size: expected a positive integer, got {batch_size}")
        train.seed_all(seed)  # as comm-fast train: the same initial weights
        self.config = config = spec.config()
        tokenizer = spec.tokenizer()
        presets.check_tokenizer(config, tokenizer)
        log(f"building {preset} on {device}")
        with torch.device(device):
            model = COMMForCausalLM(config, tokenizer)
        self.model = model = model.to(device)
        if grad_checkpointing:
            model.enable_activation_checkpointing()
        self.llm_kernels = kernels = model.set_llm_kernels(llm_kernels, device)
        trainable = train.configure_stage(model, stage, None)
        self.tune_llm = any(n.startswith("llm.") for n in trainable)
        model.train()
        _, capacity = train.packing_defaults(model, config.max_length)  # as comm-fast train
        self.count_flops = flop_counter(model, self.tune_llm)
        train.seed_all(train.training_seed(seed, 0))
        lr = spec.lr[train.STAGES.index(stage)]
        steps = steps or num_batches

        self.tmp = tempfile.mkdtemp(prefix="comm-fast-profile-")
        try:
            data_dir = make_synthetic(os.path.join(self.tmp, "data"), max(16, batch_size * num_batches), seed=seed)
            json_path, folder = resolve_data(data_dir, stage)
            self.dataset = ConversationDataset(json_path, folder, model.tokenizer, model.num_image_tokens,
                                               config.max_length)
            order = DataOrder(len(self.dataset), seed)
            self.batches = [order.take(batch_size) for _ in range(num_batches)]
            self.lengths = [len(s.input_ids) for s in self.dataset.samples]

            def make_step(params, pack):
                optimizer, scheduler = train.make_optimizer(params, lr, train.DEFAULTS["weight_decay"],
                                                            train.DEFAULTS["warmup_ratio"], steps)
                return train.TrainStep(model, model, optimizer, scheduler, self.dataset, device, params, pack=pack,
                                       pack_length=capacity, max_grad_norm=train.DEFAULTS["max_grad_norm"],
                                       micro_batch=batch_size)

            self.clock = clock = Clock(device)
            self.ours_vision = model.vision
            self.ours_params = [p for p in model.parameters() if p.requires_grad]
            encoders = {"clip": model.vision.clip, "dino": model.vision.dino}
            self.variants = [Variant("ours_packed", "ours packed", True, model.vision,
                                     Probe(clock, model.vision, encoders), make_step(self.ours_params, True), kernels)]
            if padded:
                self.variants.append(Variant("ours_padded", "ours padded", False, model.vision,
                                             self.variants[0].probe, make_step(self.ours_params, False), kernels))
            for loss in [k for k in ("eager", "chunked") if llm_variants and k != kernels]:
                self.variants.append(Variant(f"ours_packed_loss_{loss}", f"packed, {loss} loss", True, model.vision,
                                             self.variants[0].probe, make_step(self.ours_params, True), loss))
            if baseline:
                log("building the baseline visual branch (COMMReference.from_tower)")
                ref = COMMReference.from_tower(model.vision).to(device)
                base = BaselineVision(ref, model.num_image_tokens).train()
                params = ([p for p in model.llm.parameters() if p.requires_grad]
                          + [p for p in base.parameters() if p.requires_grad])
                self.variants.append(Variant("baseline_packed", "baseline packed", True, base,
                                             Probe(clock, base, {"clip": ref.clip_model, "dino": ref.dino_model}),
                                             make_step(params, True), kernels))
            self.use_autocast = self.variants[0].train_step.autocast
        except BaseException:
            self.close()
            raise

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def step(self, variant: Variant, k: int) -> dict:
        """One training step of ``variant`` on batch ``k``, timed and split at the step's marks."""
        model, device, clock = self.model, self.device, self.clock
        idx = self.batches[k]
        model.vision, model.llm_kernels = variant.vision, variant.llm_kernels
        try:
            clock.marks = []
            _sync(device)
            t0 = time.perf_counter()
            clock.mark("start")
            r = variant.train_step(idx, mark=clock.mark)
            _sync(device)
            total = (time.perf_counter() - t0) * 1e3
        finally:
            model.vision, model.llm_kernels = self.ours_vision, self.llm_kernels
        return {"ms": total, "loss": r["loss"], "tokens": r["tokens"], "images": r["images"],
                "computed_tokens": r["computed_tokens"],
                "flops": self.count_flops([self.lengths[i] for i in idx], r["targets"], r["images"]),
                "split": split_step(clock.times_ms(), total)}

    def resident_mb(self) -> float:
        """Weights and every variant's optimizer state."""
        state = [t for v in self.variants for s in v.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *state)) / 2**20

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def profile(args) -> dict:
    from comm_fast import _backend, bench
    from comm_fast.models import packing

    from comm_fast.presets import get

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda asked for, but no CUDA device is available here")
    spec = get(args.preset)
    if args.threads is None and device.type == "cpu":
        args.threads = spec.cpu_threads
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[profile-train] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    # the machine's ceiling, measured first, in the dtype the matmuls run in
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemm_n = 8192 if device.type == "cuda" else 1024
    peak_tflops = bench.gemm_tflops(device, dtype, gemm_n)

    measured = args.warmup + args.steps
    session = Session(args.preset, args.stage, args.batch_size, measured + args.profile_steps + 1, args.baseline,
                      not args.no_padded, device, args.seed, args.grad_checkpointing, log,
                      llm_kernels=args.llm_kernels, llm_variants=args.llm_variants)
    variants = session.variants
    try:
        # warm-up and measured steps, the variants interleaved step by step on the same batches
        log(f"{len(variants)} variants x ({args.warmup} warm-up + {args.steps} measured) steps of "
            f"{session.batch_size} samples")
        failed = {}  # a comparison variant that fails is reported and dropped; ours failing is the error
        for k in range(measured):
            for v in list(variants):
                try:
                    rec = session.step(v, k)
                except Exception as exc:
                    if v is variants[0]:
                        raise
                    v.optimizer.zero_grad(set_to_none=True)  # no grads of it reach ours' next step
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    failed[v.name] = {"label": v.label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    log(f"variant {v.label} failed at step {k}, dropped: {failed[v.name]['error']}")
                    variants = [u for u in variants if u is not v]
                    continue
                if k >= args.warmup:
                    v.records.append(rec)
        total_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        # torch.profiler over ours (packed): the record_function ranges, the trace
        prof_info = _profiled(session, variants[0], range(measured, measured + args.profile_steps), args.trace)
        backends = _backend.last_used()  # what ours' ops actually ran on, in the steps just run
        # peak memory of one step per variant (CUDA: max_memory_allocated; CPU: heap sampled after every op)
        last = len(session.batches) - 1
        for v in variants:
            v.peak_mem_mb = bench.peak_memory_mb(lambda: session.step(v, last), device)
        resident_mb = session.resident_mb()
    finally:
        session.close()

    model = session.model
    rows = {v.name: _summary(v, peak_tflops) for v in variants}
    rows.update(failed)
    ratios = {}
    if "tokens_per_s" in rows.get("ours_padded", {}):
        ratios["packed_over_padded_tokens_per_s"] = (rows["ours_packed"]["tokens_per_s"]
                                                     / rows["ours_padded"]["tokens_per_s"])
    if "tokens_per_s" in rows.get("baseline_packed", {}):
        ratios["ours_over_baseline_tokens_per_s"] = (rows["ours_packed"]["tokens_per_s"]
                                                     / rows["baseline_packed"]["tokens_per_s"])
        a, b = rows["ours_packed"]["peak_step_mem_mb"], rows["baseline_packed"]["peak_step_mem_mb"]
        if a and b:
            ratios["ours_over_baseline_peak_step_mem"] = a / b
    for name, row in rows.items():  # the LM loss variants against ours
        if name.startswith("ours_packed_loss_") and "tokens_per_s" in row:
            other = name[len("ours_packed_loss_"):]
            ratios[f"ours_over_{other}_loss_tokens_per_s"] = rows["ours_packed"]["tokens_per_s"] / row["tokens_per_s"]
            a, b = rows["ours_packed"]["peak_step_mem_mb"], row["peak_step_mem_mb"]
            if a and b:
                ratios[f"ours_over_{other}_loss_peak_step_mem"] = a / b
    sample_tokens = [session.lengths[i] for b in session.batches[args.warmup:measured] for i in b]
    return {
        "preset": spec.name, "stage": args.stage, "batch_size": session.batch_size, "warmup": args.warmup,
        "steps": args.steps, "device": _device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": "bf16 autocast" if session.use_autocast else "fp32",
        "attention": model.llm.config._attn_implementation, "llm_kernels": session.llm_kernels,
        "packed_attention": backends.get(packing.OP, {}).get("backend"),  # the packed rows' method that ran
        "params": {"total": _numel(model), "trained": sum(p.numel() for p in session.ours_params),
                   "llm": _numel(model.llm), "encoders": _numel(model.vision.clip) + _numel(model.vision.dino)},
        "peak_gemm_tflops": peak_tflops, "gemm": f"{gemm_n}x{gemm_n} {str(dtype).replace('torch.', '')} matmul",
        "flops_method": FLOPS_METHOD,
        "data": {"samples": len(session.dataset), "tokens_min": min(sample_tokens),
                 "tokens_mean": statistics.mean(sample_tokens), "tokens_max": max(sample_tokens),
                 "image_tokens_per_sample": model.num_image_tokens},
        "resident_mb": resident_mb, "peak_allocated_mb": total_peak_mb,
        "variants": rows, "ratios": ratios, "profiler": prof_info,
        "backends": {op: u["backend"] for op, u in sorted(backends.items())},
        "backend_reasons": {op: u["reason"] for op, u in sorted(backends.items())},
        "triton_interpreter": _backend.triton_interpreting(),
    }


def _profiled(session: Session, variant: Variant, batches, trace: str | None) -> dict:
    from torch.profiler import ProfilerActivity

    device = session.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    info: dict = {"variant": variant.name, "steps": len(batches)}
    try:
        with torch.profiler.profile(activities=activities) as prof:
            for k in batches:
                session.step(variant, k)
                prof.step()
        averages = prof.key_averages()
    except Exception as exc:  # the timers' figures stand without it; say what went wrong
        info["error"] = f"{type(exc).__name__}: {exc}"
        return info
    n = max(len(batches), 1)

    def dev_ms(e, attr):
        return getattr(e, attr, getattr(e, attr.replace("device", "cuda"), 0.0)) / 1e3 / n

    info["ranges_ms_per_step"] = {
        e.key: {"cpu_ms": e.cpu_time_total / 1e3 / n, "device_ms": dev_ms(e, "device_time_total")}
        for e in averages if e.key.startswith("comm_fast::")}
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted((e for e in averages if not e.key.startswith(("comm_fast::", "ProfilerStep"))),
                 key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]
    info["top_ops_ms_per_step"] = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3 / n,
                                    "self_device_ms": dev_ms(e, "self_device_time_total"), "calls": e.count // n}
                                   for e in top]
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        prof.export_chrome_trace(trace)
        info["trace"] = os.path.abspath(trace)
    return info


def _summary(v: Variant, peak_tflops: float) -> dict:
    recs = v.records
    time_s = sum(r["ms"] for r in recs) / 1e3
    flops = sum(r["flops"] for r in recs)
    split = {p: statistics.mean(r["split"][p] for r in recs) for p in PHASES}
    step_mean = statistics.mean(r["ms"] for r in recs)
    return {
        "label": v.label, "packed": v.pack, "llm_loss": v.llm_kernels,
        "step_ms_median": statistics.median(r["ms"] for r in recs), "step_ms": [r["ms"] for r in recs],
        "tokens_per_s": sum(r["tokens"] for r in recs) / time_s,
        "images_per_s": sum(r["images"] for r in recs) / time_s,
        "tokens_per_step": statistics.mean(r["tokens"] for r in recs),
        "computed_tokens_per_step": statistics.mean(r["computed_tokens"] for r in recs),
        "model_tflop_per_step": flops / len(recs) / 1e12, "achieved_tflops": flops / time_s / 1e12,
        "mfu_pct": 100 * flops / time_s / 1e12 / peak_tflops,
        "peak_step_mem_mb": v.peak_mem_mb, "losses": [r["loss"] for r in recs],
        "split_ms": split, "split_pct": {p: 100 * split[p] / step_mean for p in PHASES},
    }


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores)"


# -- report ---------------------------------------------------------------------------------------
def format_report(r: dict) -> str:
    failed = {n: v for n, v in r["variants"].items() if "error" in v}
    rows = {n: v for n, v in r["variants"].items() if n not in failed}
    names = list(rows)
    w = max(16, *(len(rows[n]["label"]) + 2 for n in names))
    head = f"{'':<52}" + "".join(f"{rows[n]['label']:>{w}}" for n in names)

    def line(label, fn):
        return f"{label:<52}" + "".join(f"{fn(rows[n]):>{w}}" for n in names)

    def fmt_mem(x):
        return "n/a" if x is None else f"{x:,.0f}"

    threads = f", {r['threads']} thread(s)" if r["threads"] else ""
    d = r["data"]
    out = [f"comm-fast profile-train: preset {r['preset']}, stage {r['stage']}, batch {r['batch_size']}, "
           f"{r['steps']} measured steps after {r['warmup']} warm-up",
           f"device: {r['device']}{threads}; torch {r['torch']}; {r['dtype']}; attention {r['attention']}"
           + (f" (packed rows: {r['packed_attention']})" if r.get("packed_attention") else "")
           + f"; LLM kernels {r['llm_kernels']}",
           f"data: synthetic finetune mix, {d['tokens_min']}-{d['tokens_max']} tokens per sample "
           f"(mean {d['tokens_mean']:.0f}, {d['image_tokens_per_sample']} image tokens)",
           f"GEMM peak measured here: {r['peak_gemm_tflops']:.3g} TFLOP/s ({r['gemm']})", "",
           head,
           line("LM loss", lambda x: x["llm_loss"]),
           line("step time, median (ms)", lambda x: f"{x['step_ms_median']:,.1f}"),
           line("tokens/s (real tokens)", lambda x: f"{x['tokens_per_s']:,.0f}"),
           line("images/s", lambda x: f"{x['images_per_s']:,.1f}"),
           line("tokens per step: real / computed",
                lambda x: f"{x['tokens_per_step']:.0f}/{x['computed_tokens_per_step']:.0f}"),
           line("model TFLOP per step", lambda x: f"{x['model_tflop_per_step']:.4g}"),
           line("MFU (% of GEMM peak)", lambda x: f"{x['mfu_pct']:.1f}"),
           line("peak memory of a step (MB)", lambda x: fmt_mem(x["peak_step_mem_mb"])),
           "time split, ms per step (% of step):"]
    for p in PHASES:
        out.append(line("  " + PHASE_NAMES[p], lambda x, p=p: f"{x['split_ms'][p]:,.1f} ({x['split_pct'][p]:.0f}%)"))
    ratios = r["ratios"]
    out.append("")
    if "packed_over_padded_tokens_per_s" in ratios:
        out.append(f"packed / padded tokens/s: {ratios['packed_over_padded_tokens_per_s']:.2f}x")
    if "ours_over_baseline_tokens_per_s" in ratios:
        mem = ratios.get("ours_over_baseline_peak_step_mem")
        out.append(f"ours / baseline (naive transformers visual branch) tokens/s: "
                   f"{ratios['ours_over_baseline_tokens_per_s']:.2f}x"
                   + (f"; peak step memory ours / baseline: {mem:.2f}x" if mem else ""))
    for key, value in ratios.items():
        if key.endswith("_loss_tokens_per_s"):
            other = key[len("ours_over_"):-len("_loss_tokens_per_s")]
            mem = ratios.get(f"ours_over_{other}_loss_peak_step_mem")
            out.append(f"ours ({r['llm_kernels']} loss) / {other} loss tokens/s: {value:.2f}x"
                       + (f"; peak step memory: {mem:.2f}x" if mem else ""))
    prof = r["profiler"]
    if "error" in prof:
        out.append(f"torch.profiler pass failed: {prof['error']}")
    elif prof.get("ranges_ms_per_step"):
        dev = any(v["device_ms"] for v in prof["ranges_ms_per_step"].values())
        parts = [f"{k.split('::', 1)[1]} {v['device_ms' if dev else 'cpu_ms']:,.1f}"
                 for k, v in sorted(prof["ranges_ms_per_step"].items())]
        out.append(f"torch.profiler, {prof['variant']}, {'device' if dev else 'CPU'} ms per step of the comm_fast:: "
                   f"ranges (profiler overhead included): " + ", ".join(parts))
        if prof.get("trace"):
            out.append(f"Chrome trace: {prof['trace']} (chrome://tracing or ui.perfetto.dev)")
    if r["peak_allocated_mb"] is not None:
        out.append(f"peak allocated during the measured steps (every variant's weights and optimizer state "
                   f"resident): {r['peak_allocated_mb']:,.0f} MB")
    if r["backends"]:
        out.append("ours, backends that ran: " + ", ".join(f"{k}={v}" for k, v in r["backends"].items())
                   + (" (Triton interpreter: not fused times)" if r["triton_interpreter"] else ""))
    out += [f"variant {v['label']} FAILED and was dropped: {v['error']}" for v in failed.values()]
    return "\n".join(out)


def run(args) -> int:
    threads = torch.get_num_threads()
    try:
        result = profile(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"comm-fast profile-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(format_report(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 1 if any("error" in v for v in result["variants"].values()) else 0
