"""``comm-fast bench``: every op and the whole tower, fused vs eager reference vs torch.compile.

All figures come from one process, side by side: medians after warm-up (CUDA events on GPU),
inputs rotated through more memory than the caches hold, peak memory of each variant, and the
percentage of a roofline built from this machine's measured copy bandwidth and GEMM rate.
A row whose fused path did not run its fast backend says so in ``backend`` and ``note``.
"""
from __future__ import annotations

import ctypes
import importlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable

import torch

from comm_fast import _backend, reference

# ----------------------------------------------------------------------------------- presets
PRESETS = {
    # CPU, fp32, sized for 2 cores and a few minutes: one 336px image for the merges
    # (the tower: ViT-B x 2 at 224 px, timed at batch 4, peak RSS and speed also at 16)
    "cpu-small": dict(dtype=torch.float32, clip_l=24, dino_l=6, d=1024, tokens=576, batch=1, mlp_hidden=4096,
                      resample_batch=8, images=32, tower_batch=4, tower_dim=768, tower_heads=12, tower_layers=12,
                      tower_image=224, tower_clip_patch=16, tower_rss_batches=(4, 16), reps=7,
                      ceiling_bytes=256 * 2**20, ceiling_gemm=2048),
    # the real sizes of the paper's model: CLIP ViT-L/14 at 336, batch 32, bf16
    "h200": dict(dtype=torch.bfloat16, clip_l=24, dino_l=6, d=1024, tokens=576, batch=32, mlp_hidden=4096,
                 resample_batch=64, images=32, tower_batch=16, tower_dim=1024, tower_heads=16, tower_layers=24,
                 tower_image=336, tower_clip_patch=14, tower_rss_batches=(), reps=20,
                 ceiling_bytes=2 * 2**30, ceiling_gemm=8192),
    # a smoke run in seconds (the GPU check's rehearsal on a CPU): its times say nothing
    "cpu-tiny": dict(dtype=torch.float32, clip_l=3, dino_l=2, d=64, tokens=16, batch=1, mlp_hidden=128,
                     resample_batch=1, images=2, tower_batch=1, tower_dim=64, tower_heads=2, tower_layers=4,
                     tower_image=56, tower_clip_patch=14, tower_rss_batches=(), reps=2,
                     ceiling_bytes=8 * 2**20, ceiling_gemm=256),
}


def default_preset(device: torch.device) -> str:
    """The preset when none is named: the real sizes on a GPU, the small ones on a CPU."""
    return "h200" if device.type == "cuda" else "cpu-small"


SUBJECTS = ("layernorm_weighted_sum", "multilevel_merge", "multilevel_merge_fwd_bwd", "fused_mlp",
            "resample_tokens", "resample_tokens_into_slot", "interpolate_pos_embed", "joint_preprocess", "tower")


# ------------------------------------------------------------------------------ measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable, device, reps: int, warmup: int = 2, stat: Callable = statistics.median) -> float:
    """Median (or ``stat``) wall time of ``fn()`` in milliseconds after warm-up."""
    return time_interleaved({"fn": fn}, device, reps, warmup, stat)["fn"]


def time_interleaved(fns: dict[str, Callable], device, reps: int, warmup: int = 2,
                     stat: Callable = statistics.median) -> dict[str, float]:
    """Median milliseconds of each function after warm-up, the functions run in rotation (one call
    each per round, the starting one rotating) so that a shared machine's drifts in speed fall on
    all of them alike and the ratios between them hold."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_time_once(fns[name], device))
    return {name: stat(t) for name, t in times.items()}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int | None:
    """glibc's bytes in use (arena + mmapped chunks): where torch's CPU tensors live."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _SampleHeap(torch.utils._python_dispatch.TorchDispatchMode):
    """Samples the heap after every op, while its outputs and inputs are alive: the peak of a CPU call."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use() or 0)
        return out


def peak_memory_mb(fn: Callable, device) -> float | None:
    """Extra memory at the peak of one ``fn()`` call over what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # Garbage of earlier work, freed by a collection in the middle of fn(), would hide fn's own peak.
    gc.collect()
    base = _heap_in_use()
    if base is None:
        return None
    enabled = gc.isenabled()
    gc.disable()
    try:
        with _SampleHeap() as mode:
            fn()
    finally:
        if enabled:
            gc.enable()
    return max(0, mode.peak - base) / 2**20


def loss_step_peaks_mb(model, ids, labels, kinds=("eager", "chunked"), repeats: int = 1) -> dict:
    """Peak memory (MB) of one forward + backward of ``model(ids, labels=labels)`` per LM loss in ``kinds``,
    alternated ``repeats`` times and the smallest kept (a shared machine's other work only adds); a kind's
    value is None where this machine gives no heap figures."""
    device = ids.device
    peaks: dict = {}
    for _ in range(repeats):
        for kind in kinds:
            model.llm_kernels = kind

            def step():
                model(ids, labels=labels, return_logits=False).loss_sum.backward()
                model.zero_grad(set_to_none=True)

            mb = peak_memory_mb(step, device)
            peaks[kind] = mb if peaks.get(kind) is None or mb is None else min(peaks[kind], mb)
    return peaks


def copy_bandwidth_gbs(device, nbytes: int) -> float:
    """Measured copy bandwidth (bytes read + written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10, stat=min)  # a ceiling: the best of the runs
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gemm_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=10, stat=min)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------- agreement
# Largest |fused - reference| a row accepts, as a fraction of the reference output's largest magnitude.
# Two correct computations in one dtype differ by their rounding (a few ulps per op, compounded over the
# tower's 48 blocks); a wrong table, layer or constant moves outputs by a sizeable part of that scale.
AGREE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2.0**-7, torch.bfloat16: 2.0**-4}


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of an output, in order: a tensor, or a tuple / list / mapping (BatchFeature) of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "values") and hasattr(out, "keys"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def outputs_agree(fused, ref, atol: float = 0.0, fraction: float = 1.0) -> str | None:
    """None if each fused output tensor matches the reference's in shape and, on at least ``fraction``
    of its elements, lies within AGREE_TOL (of the less precise of the two dtypes) x max|ref| + ``atol``;
    otherwise what differs. NaN never agrees."""
    got, want = _tensors(fused), _tensors(ref)
    if not want or len(got) != len(want):
        return f"{len(got)} fused output tensor(s) against {len(want)} of the reference"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(a.shape)} against the reference's {tuple(b.shape)}"
        a, b = a.detach().to(b.device, torch.float64), b.detach().double()
        tol = max(AGREE_TOL.get(t.dtype, 1e-4) for t in (got[i], want[i]))
        scale = b.abs().max().item() if b.numel() else 0.0
        allowed = tol * scale + atol
        err = (a - b).abs()
        bad = int((~(err <= allowed)).sum())  # NaN counts as bad
        if bad > (1.0 - fraction) * err.numel():
            worst = err.nan_to_num(float("inf")).max().item()
            return (f"output {i}: {bad} of {err.numel()} elements off by more than {allowed:.3g} "
                    f"({tol:.3g} x max|ref| {scale:.3g}" + (f" + {atol:.3g}" if atol else "") + f"), worst {worst:.3g}")
    return None


@dataclasses.dataclass
class Case:
    """One subject: the fused call, its eager reference, and what torch.compile is applied to."""
    name: str
    shape: str
    fused: Callable
    ref: Callable
    compile_target: Callable | None   # a function of no arguments' inputs, compiled then timed
    compile_args: tuple = ()
    bytes: int = 0
    flops: int = 0
    ref_name: str = "eager reference (comm_fast.reference)"
    extra: dict = dataclasses.field(default_factory=dict)   # more baselines: name -> callable
    op: str | None = None            # the comm_fast op whose backend is recorded
    compile_on_cpu: bool = True      # False where inductor's CPU compile alone outlasts the preset's budget
    # (fused outputs, reference outputs) on one input set, compared before timing; None: (fused(), ref()),
    # right only where neither rotates its inputs
    check: Callable[[], tuple] | None = None
    check_rule: dict = dataclasses.field(default_factory=dict)  # outputs_agree keywords, e.g. for resamplers
    notes: list = dataclasses.field(default_factory=list)   # said in the row's note
    report: Callable[[dict], dict] | None = None   # row -> more fields the subject measures itself (tower RSS)


# ----------------------------------------------------------------------------------- cases
def _rotating(make: Callable[[], tuple], per_copy_bytes: int, cache_bytes: int) -> Callable[[], tuple]:
    """Cycle through enough copies of the inputs that each call reads from memory, not cache."""
    copies = max(1, min(8, math.ceil(2 * cache_bytes / max(per_copy_bytes, 1))))
    sets = [make() for _ in range(copies)]
    state = {"i": 0}

    def next_inputs():
        state["i"] = (state["i"] + 1) % copies
        return sets[state["i"]]

    return next_inputs


def _merge_inputs(p, device, layers, grad=False):
    dt, d, m = p["dtype"], p["d"], p["tokens"] * p["batch"]
    h = torch.randn(layers, m, d, device=device, dtype=dt)
    params = [torch.ones(layers, d), torch.zeros(layers, d), torch.randn(layers, d, d) / math.sqrt(d),
              torch.zeros(layers, d), torch.full((layers,), 1.0 / layers)]
    params = [t.to(device, dt).requires_grad_(grad) for t in params]
    return h, params


def _merge_variants(h, params, device, shape) -> tuple[dict, list]:
    """Every forward variant of the merge, each timed on its own (CUDA); on a CPU, where they cannot
    run, the kernel report's prediction for each, labelled as one (or its absence, said as such)."""
    from comm_fast.ops import merge_variants

    if device.type == "cuda":
        from comm_fast.kernels.multilevel_merge import folded_eligible, merge_forward

        layers = list(h.unbind(0))
        ok, why = folded_eligible(layers)
        runs = {f"variant {v}": (lambda v=v: merge_forward(layers, *params, 1e-5, v))
                for v in merge_variants.VARIANTS if v != "folded" or ok}
        return runs, ([] if ok else [f"variant folded not run: {why}"])
    names = ", ".join(merge_variants.VARIANTS)
    try:
        kernel_report = importlib.import_module("comm_fast.kernel_report")
    except ImportError:
        return {}, [f"GPU variants ({names}): no prediction, comm_fast.kernel_report is absent"]
    try:  # compiles the variants' kernels ahead of time for sm_90 (not possible under TRITON_INTERPRET=1)
        ms = kernel_report.predict_variants("multilevel_merge", shape)  # {variant: predicted ms, H200}
    except Exception as exc:
        return {}, [f"GPU variants ({names}): no prediction ({type(exc).__name__}: {str(exc)[:200]})"]
    return {}, ["prediction (comm_fast.kernel_report, not measured): "
                + ", ".join(f"{v} {t:.3f} ms" for v, t in ms.items())]


def build_cases(p: dict, device: torch.device, subjects, cache_bytes: int) -> list[Case]:
    from comm_fast import ops

    dt, es = p["dtype"], torch.finfo(p["dtype"]).bits // 8
    L, Ld, D, M = p["clip_l"], p["dino_l"], p["d"], p["tokens"] * p["batch"]
    cases = []
    if "layernorm_weighted_sum" in subjects:
        h, (lw, lb, _, _, a) = _merge_inputs(p, device, L)
        next_h = _rotating(lambda: torch.randn_like(h), h.numel() * es, cache_bytes)
        cases.append(Case("layernorm_weighted_sum", f"L={L} M={M} D={D}",
                          lambda: ops.layernorm_weighted_sum(next_h(), lw, lb, a),
                          lambda: reference.layernorm_weighted_sum(next_h().unbind(0), lw, lb, a),
                          reference.layernorm_weighted_sum, (list(h.unbind(0)), lw, lb, a),
                          bytes=(L + 1) * M * D * es, op="layernorm_weighted_sum",
                          check=lambda: (ops.layernorm_weighted_sum(h, lw, lb, a),
                                         reference.layernorm_weighted_sum(h.unbind(0), lw, lb, a))))
    if "multilevel_merge" in subjects:
        h, (lw, lb, w, b, a) = _merge_inputs(p, device, L)
        variants, notes = _merge_variants(h, (lw, lb, w, b, a), device, dict(M=M, N=D, D=D, L=L, dtype=dt))
        cases.append(Case("multilevel_merge", f"L={L} M={M} D={D}",
                          lambda: ops.multilevel_merge(h, lw, lb, w, b, a),
                          lambda: reference.multilevel_merge(h.unbind(0), lw, lb, w, b, a),
                          reference.multilevel_merge, (list(h.unbind(0)), lw, lb, w, b, a),
                          bytes=(L * M * D + L * D * D + M * D) * es, flops=2 * M * L * D * D,
                          op="multilevel_merge", extra=variants, notes=notes))
    if "multilevel_merge_fwd_bwd" in subjects:
        h, params = _merge_inputs(p, device, L, grad=True)
        g = torch.randn(M, D, device=device, dtype=dt)

        def step(fn, hs):
            fn(hs, *params).backward(g)
            for t in params:
                t.grad = None

        def outputs(fn, hs):  # the output and every parameter's grad
            out = fn(hs, *params)
            return (out.detach(), *torch.autograd.grad(out, params, g))

        cases.append(Case("multilevel_merge_fwd_bwd", f"L={L} M={M} D={D} (h frozen)",
                          lambda: step(ops.multilevel_merge, h),
                          lambda: step(reference.multilevel_merge, h.unbind(0)),
                          lambda hs: reference.multilevel_merge(hs, *params).backward(g), (list(h.unbind(0)),),
                          bytes=(2 * L * M * D + 3 * L * D * D + 2 * M * D) * es, flops=2 * 2 * M * L * D * D,
                          op="multilevel_merge",
                          check=lambda: (outputs(ops.multilevel_merge, h),
                                         outputs(reference.multilevel_merge, h.unbind(0)))))
    if "fused_mlp" in subjects:
        H = p["mlp_hidden"]
        x = torch.randn(M, D, device=device, dtype=dt)
        w1, b1 = torch.randn(H, D, device=device, dtype=dt) / math.sqrt(D), torch.zeros(H, device=device, dtype=dt)
        w2, b2 = torch.randn(D, H, device=device, dtype=dt) / math.sqrt(H), torch.zeros(D, device=device, dtype=dt)
        cases.append(Case("fused_mlp", f"M={M} {D}->{H}->{D} gelu",
                          lambda: ops.fused_mlp(x, w1, b1, w2, b2, "gelu"),
                          lambda: reference.mlp(x, w1, b1, w2, b2, "gelu"),
                          reference.mlp, (x, w1, b1, w2, b2, "gelu"),
                          bytes=(2 * M * D + 2 * D * H) * es, flops=2 * 2 * M * D * H, op="fused_mlp"))
    if {"resample_tokens", "resample_tokens_into_slot"} & set(subjects):
        B = p["resample_batch"]
        t = torch.randn(B, 37 * 37, D, device=device, dtype=dt)
        next_tokens = _rotating(lambda: torch.randn_like(t), t.numel() * es, cache_bytes)
    if "resample_tokens" in subjects:
        cases.append(Case("resample_tokens", f"B={B} 37x37->24x24 C={D} bilinear",
                          lambda: ops.resample_tokens(next_tokens(), (37, 37), (24, 24)),
                          lambda: reference.resample_tokens(next_tokens(), (37, 37), (24, 24)),
                          reference.resample_tokens, (t, (37, 37), (24, 24)),
                          ref_name="F.interpolate + permute + contiguous",
                          bytes=B * (37 * 37 + 24 * 24) * D * es, op="resample_tokens",
                          check=lambda: (ops.resample_tokens(t, (37, 37), (24, 24)),
                                         reference.resample_tokens(t, (37, 37), (24, 24)))))
    if "resample_tokens_into_slot" in subjects:
        # the out= path: DINOv2's tokens written into their half of a concatenated [B, N, 2C] buffer
        slot = torch.empty(B, 24 * 24, 2 * D, device=device, dtype=dt)[..., D:]
        cases.append(Case("resample_tokens_into_slot", f"B={B} 37x37->24x24 C={D} bilinear, out= [B,N,2C] half",
                          lambda: ops.resample_tokens(next_tokens(), (37, 37), (24, 24), out=slot),
                          lambda: slot.copy_(reference.resample_tokens(next_tokens(), (37, 37), (24, 24))),
                          lambda x: slot.copy_(reference.resample_tokens(x, (37, 37), (24, 24))), (t,),
                          ref_name="F.interpolate + permute + contiguous, copied into the slot",
                          bytes=B * (37 * 37 + 24 * 24) * D * es, op="resample_tokens",
                          check=lambda: (ops.resample_tokens(t, (37, 37), (24, 24), out=slot),
                                         reference.resample_tokens(t, (37, 37), (24, 24)))))
    if "interpolate_pos_embed" in subjects:
        pos = torch.randn(1, 1 + 37 * 37, D, device=device, dtype=dt)
        cases.append(Case("interpolate_pos_embed", f"37x37->24x24 D={D} dinov2_offset",
                          lambda: ops.interpolate_pos_embed(pos, (37, 37), (24, 24), "dinov2_offset"),
                          lambda: reference.interpolate_pos_embed(pos, (37, 37), (24, 24), "dinov2_offset"),
                          reference.interpolate_pos_embed, (pos, (37, 37), (24, 24), "dinov2_offset"),
                          ref_name="F.interpolate(scale_factor) composition",
                          bytes=(1 + 37 * 37 + 1 + 24 * 24) * D * es, op="interpolate_pos_embed"))
    if "joint_preprocess" in subjects:
        cases.append(_preprocess_case(p, device))
    if "tower" in subjects:
        cases.append(_tower_case(p, device))
    return cases


# transformers' image processors, preferred first: the PIL ones (the resize Pillow itself does), then the
# torchvision-backed ones of the same names without the suffix.
_PROCESSORS = (("CLIPImageProcessorPil", "BitImageProcessorPil"), ("CLIPImageProcessor", "BitImageProcessor"))


def _processors(arrays, size):
    """(call, name, failures): the first pair of transformers processors of _PROCESSORS that builds and
    runs here, each with its encoder's mean/std, and why the pairs before it did not; raises with every
    pair's failure when none does."""
    import transformers

    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True)
    failures = []
    for clip_name, dino_name in _PROCESSORS:
        try:
            clip = getattr(transformers, clip_name)(**kw)
            dino = getattr(transformers, dino_name)(**kw, image_mean=list(reference.DINO_MEAN),
                                                    image_std=list(reference.DINO_STD), do_convert_rgb=False)
            clip(arrays[:1], return_tensors="pt"), dino(arrays[:1], return_tensors="pt")  # needs its backend
        except Exception as exc:  # absent from this transformers, or its image backend is not installed
            failures.append(f"{clip_name}/{dino_name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue

        def run(clip=clip, dino=dino):
            return clip(arrays, return_tensors="pt")["pixel_values"], dino(arrays, return_tensors="pt")["pixel_values"]
        return run, f"transformers {clip_name} + {dino_name}", failures
    raise RuntimeError("; ".join(failures))


def _preprocess_case(p, device) -> Case:
    from comm_fast import ops

    gen = torch.Generator().manual_seed(0)
    n, size = p["images"], 336
    images = [torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8, generator=gen) for _ in range(n)]
    dev_images = [im.to(device) for im in images]
    arrays = [im.numpy() for im in images]

    def torch_composition():  # (clip, dino), each [n, 3, S, S]
        return tuple(torch.stack([reference.preprocess_image(im, size, mean, std) for im in dev_images])
                     for mean, std in ((reference.CLIP_MEAN, reference.CLIP_STD),
                                       (reference.DINO_MEAN, reference.DINO_STD)))

    try:
        ref, ref_name, skipped = _processors(arrays, size)
        if skipped:
            ref_name += f" (unavailable: {'; '.join(skipped)})"
    except Exception as exc:  # no usable processors: the reference composition stands in, and says so
        ref = torch_composition
        ref_name = (f"comm_fast.reference.preprocess_image per image, torch's antialiased bicubic (transformers' "
                    f"processors unavailable: {exc})")
    # Pillow's bicubic (a = -0.5) and torch's (a = -0.75) round to different uint8 pixels here and there
    # (0.2 % of the values off by more than 2/255 on these noise images): 99 % of the values within 2/255
    # of a pixel (in normalised units). A wrong table or constant moves nearly all of them.
    rule = dict(atol=2 / 255 / min(reference.CLIP_STD + reference.DINO_STD), fraction=0.99)
    return Case("joint_preprocess", f"{n} x 640x480 uint8 -> 2 x {size}", lambda: ops.joint_preprocess(dev_images),
                ref, None, ref_name=ref_name, extra={"torch_composition": torch_composition},
                bytes=n * (480 * 640 * 3 + 2 * 3 * size * size * 4), op="joint_preprocess",
                check=lambda: (ops.joint_preprocess(dev_images), ref()), check_rule=rule)


def tower_config(d: int, heads: int, out_dim: int, layers: int = 24, image_size: int = 336, clip_patch: int = 14):
    """A COMMVisionConfig of two ViTs of ``layers`` blocks at width d (CLIP with patch ``clip_patch``, DINOv2
    /14 trained at 518) at ``image_size``: CLIP's blocks all merged, DINOv2's last quarter (19..24 of 24)."""
    from comm_fast import COMMVisionConfig
    from comm_fast.models import ViTConfig

    clip = ViTConfig(family="clip", hidden_size=d, num_layers=layers, num_heads=heads, mlp_hidden=4 * d,
                     patch_size=clip_patch, image_size=image_size, layer_norm_eps=1e-5, activation="quick_gelu",
                     pre_norm=True, patch_bias=False)
    dino = ViTConfig(family="dinov2", hidden_size=d, num_layers=layers, num_heads=heads, mlp_hidden=4 * d,
                     patch_size=14, image_size=518, layer_norm_eps=1e-6, activation="gelu", layerscale=True)
    return COMMVisionConfig(clip=clip.to_dict(), dino=dino.to_dict(), out_dim=out_dim,
                            clip_layers=tuple(range(1, layers + 1)),
                            dino_layers=tuple(range(layers - layers // 4 + 1, layers + 1)),
                            clip_image_size=image_size, dino_image_size=image_size)


def _tower_models(p, device, seed: int = 0):
    """(tower, naive composition with the same weights, pixels maker) of the preset, eval mode."""
    from comm_fast import COMMVisionTower
    from comm_fast.reference import COMMReference

    torch.manual_seed(seed)
    d = p["tower_dim"]
    tower = COMMVisionTower(tower_config(d, p["tower_heads"], 2 * d, p["tower_layers"], p["tower_image"],
                                         p["tower_clip_patch"]))
    ref_model = COMMReference.from_tower(tower)
    tower = tower.to(device, p["dtype"]).eval()
    ref_model = ref_model.to(device, p["dtype"]).eval()
    pixels = lambda B: torch.randn(B, 3, p["tower_image"], p["tower_image"], device=device, dtype=p["dtype"])  # noqa: E731
    return tower, ref_model, pixels


def _inference(model, px):
    def call():
        with torch.no_grad():
            return model(px, px)
    return call


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


TOWER_KEYS = ("tower_dim", "tower_heads", "tower_layers", "tower_image", "tower_clip_patch")


def peak_rss_child(spec: dict, contender: str, batch: int, calls: int = 2) -> dict:
    """In a fresh process: build both contenders (the same history for either), keep ``contender`` ("fused"
    or "ref"), free the other and trim the heap, reset the high-water mark (/proc/self/clear_refs), run
    ``calls`` inferences and read VmHWM. ``spec``: the preset's TOWER_KEYS and its dtype's name.
    Returns MB: the process's peak, its RSS at the reset, the difference."""
    p = {**spec, "dtype": getattr(torch, spec["dtype"])}
    tower, ref_model, pixels = _tower_models(p, torch.device("cpu"))
    model = tower if contender == "fused" else ref_model
    del tower, ref_model
    px = pixels(batch)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the freed twin goes back to the OS for either contender
    except (OSError, AttributeError):
        pass
    call = _inference(model, px)
    return peak_rss_mb(lambda: [call() for _ in range(calls)])


def peak_rss_mb(fn: Callable) -> dict:
    """The process's resident-set peak (VmHWM, MB) over ``fn()``, the high-water mark reset just before it
    (/proc/self/clear_refs), with the RSS at the reset and the difference (Linux only)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    base = _status_mb("VmRSS")
    fn()
    hwm = _status_mb("VmHWM")
    return {"peak_rss_mb": round(hwm, 1), "rss_at_reset_mb": round(base, 1), "extra_peak_rss_mb": round(hwm - base, 1)}


def tower_peak_rss(p: dict, batch: int, contender: str, timeout_s: float = 900) -> dict:
    """peak_rss_child in a subprocess (same interpreter and thread count): a process that ran the other
    contender keeps that one's heap, so each contender's peak is measured in a process of its own."""
    import subprocess

    spec = {**{k: p[k] for k in TOWER_KEYS}, "dtype": str(p["dtype"]).split(".")[-1]}
    code = (f"import json, torch; torch.set_num_threads({torch.get_num_threads()}); from comm_fast import bench; "
            f"print(json.dumps(bench.peak_rss_child({spec!r}, {contender!r}, {batch})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"peak RSS child ({contender}, batch {batch}) failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tower_case(p, device) -> Case:
    """The tower under no_grad against the composition a user would write from transformers' models:
    output_hidden_states=True plus per-layer LayerNorm + Linear modules. On CPU the row also carries, per
    batch of ``tower_rss_batches``, each contender's peak RSS (a fresh process each) and both speeds (timed
    in alternation in this process)."""
    B = p["tower_batch"]
    tower, ref_model, pixels = _tower_models(p, device)
    px = pixels(B)
    fused, ref = _inference(tower, px), _inference(ref_model, px)

    def report(row: dict) -> dict:
        out = {"inference_merge": tower.inference_variant()[0]}
        batches = p["tower_rss_batches"] if device.type == "cpu" else ()
        if batches:
            out["rss_note"] = ("peak RSS: VmHWM of a fresh process per contender, reset (/proc/self/clear_refs) "
                               "after loading, over 2 inferences; extra = peak - RSS at the reset; speeds: "
                               "medians, contenders in alternation in this process")
        for b in batches:
            if b == B:  # the row's own timing
                times = {"fused": row["ms"], "ref": row["ref_ms"]}
            else:
                times = time_interleaved({"fused": _inference(tower, pixels(b)), "ref": _inference(ref_model, pixels(b))},
                                         device, reps=3, warmup=1)
            mine, naive = tower_peak_rss(p, b, "fused"), tower_peak_rss(p, b, "ref")
            out[f"batch{b}"] = {"ms": round(times["fused"], 1), "ref_ms": round(times["ref"], 1),
                                "speedup_vs_ref": round(times["ref"] / times["fused"], 3),
                                "peak_rss_mb": mine, "ref_peak_rss_mb": naive,
                                "extra_peak_rss_ratio": round(mine["extra_peak_rss_mb"] / naive["extra_peak_rss_mb"], 3),
                                "peak_rss_ratio": round(mine["peak_rss_mb"] / naive["peak_rss_mb"], 3)}
        return out

    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    n_params, tokens = count(tower), lambda enc: enc.num_tokens(tuple(px.shape[-2:]))  # noqa: E731
    rest = n_params - count(tower.clip) - count(tower.dino)
    # weights touched once per token (heads once per visual token); attention left out
    flops = 2 * B * (count(tower.clip) * tokens(tower.clip) + count(tower.dino) * tokens(tower.dino)
                     + rest * tower.num_tokens)
    return Case("tower", f"B={B} {p['tower_image']}px, 2 x {p['tower_layers']} blocks of width {p['tower_dim']}, "
                f"inference", fused, ref, ref_model, compile_args=(px, px), compile_on_cpu=False,
                ref_name="transformers encoders + per-layer nn.LayerNorm/nn.Linear",
                flops=flops, bytes=n_params * torch.finfo(p["dtype"]).bits // 8, op="multilevel_merge",
                report=report)


# ------------------------------------------------------------------------------------ runner
def run_benchmarks(preset: str | None = None, subjects=SUBJECTS, compile_ref: bool = True,
                   progress: bool = True, on_row: Callable[[dict], None] | None = None) -> dict:
    """Measure each subject in turn (``preset`` None: ``default_preset`` of this machine's device).

    Each row first compares the fused output with the reference's (``outputs_agree``): one that differs
    is still timed but carries ``mismatch``, a failure of the run. A subject that fails becomes a row with
    its ``error`` (the others still run). ``on_row(result)`` sees the result after every row, so a run cut
    short keeps what it measured; an exception of ``on_row`` lands in that row's ``write_error``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = preset or default_preset(device)
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    unknown = set(subjects) - set(SUBJECTS)
    if unknown:
        raise ValueError(f"ops: unknown subjects {sorted(unknown)}; choose from {SUBJECTS}")
    cache = 64 * 2**20 if device.type == "cpu" else 128 * 2**20
    bw = copy_bandwidth_gbs(device, p["ceiling_bytes"])
    tf = gemm_tflops(device, p["dtype"], p["ceiling_gemm"])
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
               "threads": torch.get_num_threads(), "copy_gbs": round(bw, 1),
               f"gemm_tflops_{str(p['dtype']).split('.')[-1]}": round(tf, 3), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "preset": preset}
    result = {"machine": machine, "rows": []}
    bar = _progress([s for s in SUBJECTS if s in subjects], progress)
    for subject in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(subject)
        try:  # built one at a time: only this subject's inputs are resident while it is timed
            (case,) = build_cases(p, device, [subject], cache)
            row = _measure(case, p, device, bw, tf, compile_ref)
        except Exception as exc:  # reported in its row (traceback on stderr); the other subjects still run
            traceback.print_exc()
            row = {"name": subject, "dtype": str(p["dtype"]).split(".")[-1], "device": device.type,
                   "error": _describe(exc)}
        case = None  # its inputs go before the next subject's are built
        result["rows"].append(row)
        if on_row is not None:
            try:
                on_row(result)
            except Exception as exc:  # a JSON or plot error loses this write, not the run
                traceback.print_exc()
                row["write_error"] = _describe(exc)
    return result


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line, the whole message (a Triton CompilationError's first line is only
    where it happened), at most its last 1000 characters."""
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[-1000:]}"


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, file=sys.stderr, leave=False)


def _measure(case: Case, p, device, bw_gbs, tflops, compile_ref) -> dict:
    reps = p["reps"]
    if case.name == "tower":  # its reference takes seconds per call on a CPU
        reps = max(3, reps // 2)
    before = _backend.last_used().get(case.op, {})
    fused_out, ref_out = case.check() if case.check is not None else (case.fused(), case.ref())
    used = _backend.last_used().get(case.op, before) if case.op else {}
    mismatch = outputs_agree(fused_out, ref_out, **case.check_rule)
    fused_out = ref_out = None
    note = list(case.notes)
    if mismatch:  # still timed (GPU time is scarce), but the row and the run fail
        mismatch = f"fused output ({used.get('backend', '?')}) differs from the reference's: {mismatch}"
        print(f"comm-fast bench: {case.name}: {mismatch}", file=sys.stderr)
    fns = {"fused": case.fused, "ref": case.ref, **case.extra}
    if case.compile_target is not None and device.type == "cpu" and not case.compile_on_cpu:
        note.append("torch.compile baseline skipped on CPU (its compile time alone exceeds the preset's budget)")
    elif case.compile_target is not None and compile_ref:
        compiled = torch.compile(case.compile_target)
        grad_off = isinstance(case.compile_target, torch.nn.Module)

        def run_compiled():
            with torch.no_grad() if grad_off else _nullcontext():
                return compiled(*case.compile_args)
        try:
            run_compiled()  # compiles here, outside the timed rounds
            fns["compile"] = run_compiled
        except Exception as exc:  # no compiler on this machine, or an inductor failure
            note.append(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    elif case.compile_target is None:
        note.append("no torch.compile baseline for this subject")
    else:
        note.append("torch.compile skipped (--no-compile)")
    times = time_interleaved(fns, device, reps)
    ms, ref_ms, compile_ms = times.pop("fused"), times.pop("ref"), times.pop("compile", None)
    extra = {name: round(value, 3) for name, value in times.items()}
    backend = used.get("backend", "?")
    if backend == "torch" and case.op not in (None,) and device.type == "cuda":
        note.append("fused op fell back to torch")
    if _backend.triton_interpreting():
        note.append("TRITON_INTERPRET=1: interpreted times are not fused times")
    roof_ms = max(case.bytes / (bw_gbs * 1e9), case.flops / (tflops * 1e12)) * 1e3
    row = {
        "name": case.name, "shape": case.shape, "dtype": str(p["dtype"]).split(".")[-1], "device": device.type,
        "backend": backend, "backend_reason": used.get("reason"), "ms": round(ms, 4), "ref_ms": round(ref_ms, 4),
        "ref_name": case.ref_name, "compile_ms": None if compile_ms is None else round(compile_ms, 4),
        "speedup_vs_ref": round(ref_ms / ms, 3),
        "speedup_vs_compile": None if compile_ms is None else round(compile_ms / ms, 3),
        "pct_of_roofline": round(100 * roof_ms / ms, 1) if roof_ms > 0 else None,
        "bound": "compute" if case.flops / (tflops * 1e12) > case.bytes / (bw_gbs * 1e9) else "memory",
        "bytes": case.bytes, "flops": case.flops,
        "peak_mem_mb": _round(peak_memory_mb(case.fused, device)),
        "ref_peak_mem_mb": _round(peak_memory_mb(case.ref, device)),
        "extra_ms": extra, "note": "; ".join(note), "mismatch": mismatch,
    }
    for name, value in extra.items():
        row[f"speedup_vs_{name}"] = round(value / ms, 3)
    if case.report is not None:
        row.update(case.report(row))
    return row


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _round(x):
    return None if x is None else round(x, 1)


# ----------------------------------------------------------------------------------- output
def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"comm_fast bench - {m['device']} ({m['threads']} threads), preset {m['preset']}, {m['date']}, "
             f"copy {m['copy_gbs']} GB/s, GEMM {[v for k, v in m.items() if k.startswith('gemm')][0]} TFLOP/s",
             f"{'subject':<26}{'backend':<9}{'fused ms':>10}{'ref ms':>10}{'compile':>10}{'x ref':>8}"
             f"{'x comp':>8}{'%roof':>7}{'mem MB':>9}{'ref MB':>9}  shape"]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"{r['name']:<26}FAILED: {r['error']}")
            if r.get("write_error"):
                lines.append(f"{'':<26}results not written after this row: {r['write_error']}")
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)
        lines.append(f"{r['name']:<26}{r['backend']:<9}{r['ms']:>10.3f}{r['ref_ms']:>10.3f}"
                     f"{fmt(r['compile_ms'], '10.3f'):>10}{r['speedup_vs_ref']:>8.2f}"
                     f"{fmt(r['speedup_vs_compile'], '8.2f'):>8}{fmt(r['pct_of_roofline'], '7.1f'):>7}"
                     f"{fmt(r['peak_mem_mb'], '9.1f'):>9}{fmt(r['ref_peak_mem_mb'], '9.1f'):>9}  {r['shape']}")
        for name, ms in r["extra_ms"].items():
            lines.append(f"{'':<26}vs {name}: {ms:.3f} ms -> {r['speedup_vs_' + name]:.2f}x")
        if r["note"]:
            lines.append(f"{'':<26}note: {r['note']}")
        if r.get("mismatch"):
            lines.append(f"{'':<26}OUTPUTS DIFFER (times above are not of a correct result): {r['mismatch']}")
        if r.get("write_error"):
            lines.append(f"{'':<26}results not written after this row: {r['write_error']}")
    return "\n".join(lines)


def plot_speedups(result: dict, path: str):
    """A PNG horizontal bar chart of each subject's speedup over the eager reference (and torch.compile),
    1x marked; long names wrapped, the canvas cropped to what is drawn. Returns the matplotlib Figure."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result["rows"] if not r.get("error")]
    fig = Figure(figsize=(9, 1.2 + 0.7 * max(len(rows), 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]  # the first subject on top
    h = 0.38
    for offset, key, color, label in ((h / 2, "speedup_vs_ref", "#3465a4", "vs eager"),
                                      (-h / 2, "speedup_vs_compile", "#f57900", "vs torch.compile")):
        at = [(yi + offset, r[key]) for yi, r in zip(y, rows) if r.get(key) is not None]
        if at:
            bars = ax.barh([a for a, _ in at], [v for _, v in at], height=h, color=color, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}x" for _, v in at], padding=3, fontsize=8)
    ax.axvline(1.0, color="#c00000", linewidth=1, linestyle="--")
    wrap = lambda name: textwrap.fill(name.replace("_", "_ "), 28).replace("_ ", "_")  # lines end after a "_"
    ax.set_yticks(y, [wrap(r["name"]) for r in rows], fontsize=9)
    ax.set_xlabel("speedup (x, higher is faster; dashed: 1x)")
    ax.margins(x=0.15)  # room for the value labels
    if rows:
        ax.legend(loc="best", fontsize=8)
    machine = result["machine"]
    ax.set_title(textwrap.fill(f"comm_fast speedups - {machine['device']} ({machine['date']})", 70), fontsize=10)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return fig


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="shapes (default: h200 on a GPU, cpu-small otherwise); an explicit one is kept")
    parser.add_argument("--ops", nargs="+", default=list(SUBJECTS), choices=SUBJECTS, metavar="SUBJECT",
                        help=f"subjects to run, from {', '.join(SUBJECTS)}")
    parser.add_argument("--skip", nargs="+", default=[], choices=SUBJECTS, metavar="SUBJECT",
                        help="subjects to leave out")
    parser.add_argument("--json", metavar="FILE", help="write one JSON row per subject here")
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the speedups")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--no-progress", action="store_true")


def _write_json(result: dict, path: str) -> None:
    tmp = path + ".tmp"  # atomically: a run stopped while writing leaves the previous rows
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def run(args) -> int:
    def save(result):  # after every row: an interrupted run keeps its measured rows
        if args.json:
            _write_json(result, args.json)
        if args.plot:
            tmp = args.plot + ".tmp.png"
            plot_speedups(result, tmp)
            os.replace(tmp, args.plot)

    for path in (args.json, args.plot):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    subjects = [s for s in args.ops if s not in args.skip]
    result = run_benchmarks(args.preset, subjects, compile_ref=not args.no_compile, progress=not args.no_progress,
                            on_row=save if args.json or args.plot else None)
    if args.json and any(r.get("write_error") for r in result["rows"]):
        try:  # the JSON then says which writes failed
            _write_json(result, args.json)
        except Exception:
            traceback.print_exc()
    print(format_table(result))
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    failed = [r["name"] for r in result["rows"] if r.get("error") or r.get("mismatch")]
    unwritten = [r["name"] for r in result["rows"] if r.get("write_error")]
    if failed:
        print(f"comm-fast bench: error: {len(failed)} subject(s) failed: {', '.join(failed)}", file=sys.stderr)
    if unwritten:
        print(f"comm-fast bench: error: writing the results failed after {', '.join(unwritten)}", file=sys.stderr)
    return 1 if failed or unwritten else 0
