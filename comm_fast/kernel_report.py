"""What the GPU will run, read without a GPU: every Triton kernel config of the CUDA path, compiled
ahead of time for sm_90 with the runtime's specialisation, its resources, pipelining and SASS, and a
first-order PREDICTION of its time at real sizes.

    python -m comm_fast.kernel_report [--target sm_90] [--preset h200] [--json FILE] [--dump DIR]
                                      [--explain NAME] [--only TEXT] [--tune-configs N] [--jobs N]

Each kernel module (comm_fast.kernels.*) lists what its launchers can launch in
``report_entries(shapes)``; this module owns only the reading, the model and the gates. The helpers
a module uses to describe an entry are here too: ``ptr``, ``entry``, ``tuned``, ``dot_precisions``,
``gemm_model``, ``memory_model``, ``gpu_launch_rules``, ``ESIZE``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

KERNEL_MODULES = ("comm_fast.kernels.layernorm_weighted_sum", "comm_fast.kernels.multilevel_merge",
                  "comm_fast.kernels.fused_mlp")

# --- device constants (H200 SXM, sm_90); every prediction is built from these alone ---
SMEM_PER_BLOCK = 232448    # bytes: sm_90's opt-in shared memory per block (CUDA C guide, compute capability 9.0: 227 KB)
SMEM_PER_SM = 233472       # bytes (228 KB); CUDA reserves 1 KB of it per resident block
SMEM_RESERVED = 1024
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
SMS = 132                  # H200 SXM
PEAK_BF16 = 790e12         # FLOP/s: bf16 8192^3 GEMM measured on this project's H200 (torch.mm, dense)
COPY_BW = 4.3e12           # B/s: device-to-device copy measured on the same H200
CLOCK = 1.83e9             # Hz: 132 SMs x 4096 dense bf16 FLOP/clk x 1.83 GHz = the 989 TFLOP/s of the datasheet
ISSUE_PER_CLK = 4          # warp instructions per SM per clock (4 schedulers, 1 issue each)
HBM_LATENCY = 800e-9       # s: ASSUMED latency of a global load under load (idle pointer-chase latency on Hopper
                           # is ~500-600 ns and grows under load), for Little's law
L2_LATENCY = 250e-9        # s: ASSUMED latency of an L2-hit tile load (~450 clk): what a full pipeline drain exposes
                           # per K step (in grouped tile order most re-read operand tiles hit L2)
# tensor-core (or FMA) rate of a dot relative to bf16, from the H100 SXM datasheet's dense peaks:
# fp16 = bf16, tf32 = 1/2 (495 vs 989 TFLOP/s), fp32 without TF32 runs on the FMA units
# (128 FP32 lanes x 2 = 256 FLOP/clk/SM against 4096: 1/16)
DOT_RATE = {"bf16": 1.0, "fp16": 1.0, "tf32": 0.5, "ieee": 1 / 16}

TARGETS = {"sm_90": 90}
ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}

# The shapes handed to every module's report_entries (the protocol's keys).
PRESETS = {
    "h200": {  # CLIP ViT-L/14 at 336 (576 patch tokens) and DINOv2 ViT-L/14, batch 32, bf16 training
        "merge": [dict(name="clip", M=18432, N=1024, D=1024, L=24, T=576),
                  dict(name="dino", M=18432, N=1024, D=1024, L=6, T=576)],
        "lnws": [dict(name="clip", M=18432, D=1024, L=24, T=576), dict(name="dino", M=18432, D=1024, L=6, T=576)],
        "mlp": [dict(name="dino_mlp", M=18432, K=1024, H=4096, N=1024, activation="gelu")],
        "dtypes": ["bf16", "fp16", "fp32"],
    },
}


# ---------------------------------------------------------------------------------------------
# Describing an entry (used by the kernel modules' report_entries)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: element type ("bf16", "fp32", "i64", ...) and whether it is 16-byte aligned."""
    dtype: str
    aligned: bool = True


def ptr(dtype: str, aligned: bool = True) -> Ptr:
    return Ptr(dtype, aligned)


def _specialise(name: str, value):
    """(triton type, 16-divisible, equal to 1) as triton's runtime specialises a launch argument
    (triton 3.6-3.9: ints 16-divisible or == 1 (a constant), pointers 16-byte aligned, floats fp32)."""
    if isinstance(value, Ptr):
        return "*" + value.dtype, value.aligned, False
    if isinstance(value, bool):
        return "i1", False, False
    if isinstance(value, int):
        if value == 1:
            return "i32", False, True
        kind = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
        return kind, value % 16 == 0, False
    if isinstance(value, float):
        return "fp32", False, False
    raise TypeError(f"{name}: expected a Ptr, an int or a float launch argument, got {type(value).__name__}")


_SHORT = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "BLOCK_D": "BD", "GROUP_M": "GM"}


def config_str(config: dict, num_warps: int, num_stages: int) -> str:
    """"BM=128 BN=128 BK=64 GM=8 warps=8 stages=3" from an autotune config's kwargs."""
    parts = [f"{_SHORT.get(k, k)}={v}" for k, v in config.items()]
    return " ".join(parts + [f"warps={num_warps}", f"stages={num_stages}"])


def _config_tag(config: dict, num_warps: int, num_stages: int) -> str:
    blocks = [str(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D") if k in config]
    rest = [f"{_SHORT.get(k, k).lower()}{v}" for k, v in config.items()
            if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "GROUP_M")]
    return "x".join(blocks) + "".join(rest) + f"w{num_warps}s{num_stages}"


def tuned(configs: list, tune_configs: int | None) -> list:
    """The autotune configs a GPU run keeps (COMM_FAST_TUNE_CONFIGS=N keeps the first N)."""
    return configs[:tune_configs] if tune_configs else list(configs)


def dot_precisions(dtype: str) -> list:
    """The tl.dot input precisions a launch can use: fp32 follows torch's TF32 switch (both reachable)."""
    return ["tf32", "ieee"] if dtype == "fp32" else [None]


def gemm_model(M: int, N: int, K: int, BM: int, BN: int, BK: int, bytes: int) -> dict:
    """Output [M, N] in BM x BN tiles, reduction K in BK steps, `bytes` moved to/from HBM."""
    return {"kind": "gemm", "M": M, "N": N, "K": K, "BM": BM, "BN": BN, "BK": BK, "bytes": int(bytes),
            "flops": 2 * M * N * K}


def memory_model(bytes: int, ctas: int, bytes_in_flight_per_cta: int, iterations: int = 1) -> dict:
    """`bytes` moved by `ctas` CTAs, each with that many bytes of loads in flight at a time and
    `iterations` trips through its main loop (for the issue time)."""
    return {"kind": "memory", "bytes": int(bytes), "ctas": int(ctas),
            "bytes_in_flight_per_cta": int(bytes_in_flight_per_cta), "iterations": int(iterations)}


@contextlib.contextmanager
def gpu_launch_rules(sms: int = SMS):
    """Launcher helpers that branch on _utils.ON_GPU or ask torch for the SM count answer, inside this
    block, as on the preset's GPU (so entries call the launchers' own config functions)."""
    import torch

    from comm_fast.kernels import _utils

    class _Props:
        multi_processor_count = sms

    saved = _utils.ON_GPU, torch.cuda.get_device_properties, torch.cuda.current_device
    _utils.ON_GPU, torch.cuda.get_device_properties, torch.cuda.current_device = True, lambda *a: _Props, lambda: 0
    try:
        yield
    finally:
        _utils.ON_GPU, torch.cuda.get_device_properties, torch.cuda.current_device = saved


def entry(*, kernel: str, variant: str, dtype: str, shape: str, fn, args: dict, constexprs: dict,
          num_warps: int, num_stages: int, gemm: bool, model: dict, config: dict | None = None,
          precision: str | None = None, launchable: bool = True, name: str | None = None) -> dict:
    """One protocol entry. `args` holds every non-constexpr argument as the launcher passes it at
    these shapes (Ptr for tensors, the int/float values): signature, `divisible` and `ones` follow
    from them as the runtime's specialisation would. `config` is the autotune config's kwargs (its
    keys must also be in constexprs); the name is built from the parts unless given."""
    if dtype not in ESIZE:
        raise ValueError(f"dtype: expected one of {tuple(ESIZE)}, got {dtype!r}")
    names = list(fn.arg_names)
    unknown = sorted((set(args) | set(constexprs)) - set(names))
    if unknown:
        raise ValueError(f"{kernel}: {unknown} are not arguments of {fn.__name__}")
    signature, divisible, ones = {}, [], []
    for arg in names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in args:
            kind, div, one = _specialise(arg, args[arg])
            signature[arg] = kind
            if div:
                divisible.append(arg)
            if one:
                ones.append(arg)
        else:
            raise ValueError(f"{kernel}: argument {arg!r} of {fn.__name__} has no value (args or constexprs)")
    config = dict(config or {})
    tag = _config_tag(config, num_warps, num_stages)
    if name is None:
        parts = [kernel, variant, dtype + (f"-{precision}" if precision else ""), shape, tag]
        name = "/".join(p for p in parts if p)
    cfg = config_str(config, num_warps, num_stages) + (f" dot={precision}" if precision else "")
    return {"name": name, "kernel": kernel, "variant": variant, "dtype": dtype, "shape": shape, "config": cfg,
            "fn": fn, "signature": signature, "constexprs": dict(constexprs), "divisible": divisible, "ones": ones,
            "num_warps": num_warps, "num_stages": num_stages, "launchable": launchable, "gemm": gemm,
            "model": model, "precision": precision}


# ---------------------------------------------------------------------------------------------
# Reading compiled code: TTGIR, SASS, resource usage
# ---------------------------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(%[\w.$-]+(?::\d+)?(?:\s*,\s*%[\w.$-]+(?::\d+)?)*)\s*=\s*([a-z_]+\.[\w.]+)(.*)$")
_VAL = re.compile(r"%[\w.$-]+")
_MEMDESC = re.compile(r"!ttg\.memdesc<([0-9x]+)x([a-z]+\d*)")
_DOT = re.compile(r"\b(ttng\.warp_group_dot|tt\.dot)\s+(%[\w.$#-]+),\s*(%[\w.$#-]+)")
_VIEWS = ("ttg.memdesc_index", "ttg.memdesc_subview", "ttg.memdesc_subslice", "ttg.memdesc_trans",
          "ttg.memdesc_reshape", "ttg.memdesc_reinterpret")


def _base(v: str) -> str:
    return v.split("#")[0]


def _loops(lines: list[str]) -> list[dict]:
    """scf.for regions: first and last line, and the iter_args' initial values."""
    stack, loops, depth = [], [], 0
    for i, line in enumerate(lines):
        code = line.split(" loc(")[0]
        opened = code.count("{") - code.count("}")
        if "scf.for" in code and code.rstrip().endswith("{"):
            inits = {}
            m = re.search(r"iter_args\((.*)\)\s*->", code)
            if m:
                for a, b in re.findall(r"(%[\w.$-]+)\s*=\s*(%[\w.$#-]+)", m.group(1)):
                    inits[a] = b
            stack.append((depth, {"start": i, "inits": inits}))
        depth += opened
        while stack and depth <= stack[-1][0]:
            loop = stack.pop()[1]
            loop["end"] = i
            loops.append(loop)
    return loops


def _unconditional(body: list[str]) -> list[bool]:
    """Per line of a loop body: True outside every scf.if region (the lines each iteration runs)."""
    out, depth, ifs = [], 0, []  # ifs: the brace depths at which open scf.if regions started
    for line in body:
        code = line.split(" loc(")[0]
        out.append(not ifs)
        if re.search(r"\bscf\.if\b", code) and code.rstrip().endswith("{"):
            ifs.append(depth)
        depth += code.count("{") - code.count("}")
        while ifs and depth <= ifs[-1]:
            ifs.pop()
    return out


def parse_ttgir(text: str) -> dict:
    """Main loop (innermost scf.for holding a tl.dot) of a TTGIR module: per dot the operands' form and
    shared-memory buffer counts, the async-wait depths and wgmma pendings inside that loop (all of
    them, and `*_every_iteration`: those outside the loop's scf.if regions)."""
    lines = text.splitlines()
    defs = {}
    for i, line in enumerate(lines):
        m = _DEF.match(line.split(" loc(")[0])
        if m:
            for result in m.group(1).split(","):
                defs[result.strip().split(":")[0]] = (m.group(2), m.group(3), i)
    loops = _loops(lines)
    inits = {a: b for lp in loops for a, b in lp["inits"].items()}
    dot_lines = [i for i, line in enumerate(lines) if _DOT.search(line)]
    owning = [lp for lp in loops if any(lp["start"] < i < lp["end"] for i in dot_lines)]
    out = {"has_dot": bool(dot_lines), "loops": len(loops), "dots": [], "async_waits": [], "dot_pendings": [],
           "async_waits_every_iteration": [], "dot_pendings_every_iteration": []}
    if not owning:
        return out
    main = min(owning, key=lambda lp: lp["end"] - lp["start"])
    body = lines[main["start"] + 1:main["end"]]
    out["main_loop_lines"] = [main["start"] + 1, main["end"] + 1]
    every = _unconditional(body)
    for key, pattern in (("async_waits", r"ttg\.async_wait\b.*\{num = (\d+)"),
                         ("dot_pendings", r"warp_group_dot_wait\b.*pendings = (\d+)")):
        found = [(int(n), i) for i, line in enumerate(body) for n in re.findall(pattern, line)]
        out[key] = [n for n, _ in found]  # every wait in the loop body
        out[key + "_every_iteration"] = [n for n, i in found if every[i]]  # outside its scf.if regions
    out["barrier_waits"] = sum("ttng.wait_barrier" in line for line in body)

    def buffers(val, seen):
        """(buffers, source, elements) of the shared memory a dot operand comes from, following views,
        iter_args and register arithmetic back to a local_alloc; (0, 'global', n) for register loads."""
        val = _base(val)
        if val in seen:
            return None
        seen.add(val)
        if val not in defs:
            return buffers(inits[val], seen) if val in inits else None
        op, rest, _ = defs[val]
        if op == "ttg.local_alloc":
            m = _MEMDESC.search(rest)
            shape = [int(s) for s in m.group(1).split("x")] if m else [0]
            stored = rest.lstrip().startswith("%")  # allocated from a register value: one buffer, rewritten
            if len(shape) >= 3 and not stored:
                return shape[0], "smem", math.prod(shape[1:])
            return 1, "smem (stored from registers)" if stored else "smem", math.prod(shape)
        if op in _VIEWS or op == "ttg.local_load":
            first = _VAL.search(rest)
            got = buffers(first.group(0), seen) if first else None
            if got and op == "ttg.local_load":
                return got[0], "registers from " + got[1], got[2]
            return got
        if op == "tt.load":
            return 0, "registers from global", 0
        found = [b for v in _VAL.findall(rest.split(" : ")[0]) if (b := buffers(v, seen))]
        return max(found, key=lambda b: b[2]) if found else None

    for i in dot_lines:
        if not main["start"] < i < main["end"]:
            continue
        m = _DOT.search(lines[i])
        a_type = re.search(r"tensor<|!ttg\.memdesc<", lines[i][m.end():])  # the first type is A's
        form = ""
        if m.group(1) == "ttng.warp_group_dot" and a_type:
            form = "SS" if a_type.group(0).startswith("!ttg") else "RS"
        a, b = buffers(m.group(2), set()), buffers(m.group(3), set())
        out["dots"].append({"op": m.group(1), "form": form,
                            "a_buffers": a[0] if a else None, "a_source": a[1] if a else "?",
                            "b_buffers": b[0] if b else None, "b_source": b[1] if b else "?"})
    return out


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)")
_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|WGMMA)\b")
_FULL_MMA_WAIT = re.compile(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b")  # wgmma wait, pendings = 0


def _paths(instrs: list, labels: dict, start: int, end: int) -> dict:
    """Split a loop [start, end] into the instructions every iteration runs and those a forward branch
    inside the loop jumps over (conditional blocks: [first, last] address, instructions, whether it
    holds a full wgmma wait)."""
    skipped = []
    for addr, text_ in instrs:
        bra = _BRA.search(text_)
        if start <= addr < end and bra and bra.group(1) in labels and addr < labels[bra.group(1)] <= end:
            skipped.append((addr, labels[bra.group(1)]))
    body = [(a, t) for a, t in instrs if start <= a <= end and not t.startswith("NOP")]
    cond = [(a, t) for a, t in body if any(lo < a < hi for lo, hi in skipped)]
    blocks = []
    for a, t in cond:  # runs of consecutive conditional instructions
        if blocks and not any(blocks[-1]["last"] < b < a for b, _ in body):
            blocks[-1].update(last=a, instructions=blocks[-1]["instructions"] + 1)
        else:
            blocks.append({"first": a, "last": a, "instructions": 1, "full_mma_wait": False})
        blocks[-1]["full_mma_wait"] |= bool(_FULL_MMA_WAIT.search(t))
    every = [t for a, t in body if not any(lo < a < hi for lo, hi in skipped)]
    return {"every_iteration": len(every), "conditional": len(cond), "blocks": blocks,
            "every_iteration_full_mma_wait": any(_FULL_MMA_WAIT.search(t) for t in every)}


def parse_sass(text: str) -> dict:
    """Loops of an nvdisasm listing (a backward branch to a label): the main loop is the smallest one
    that holds a tensor-core instruction, else the largest innermost one, else the whole kernel;
    instructions per iteration (NOPs not counted), and in `main_loop_paths` those each iteration runs
    apart from the conditional blocks that forward branches inside the loop jump over."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        ins = _INSTR.match(line)
        if ins:
            addr = int(ins.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, ins.group(2)))
    def span(start, end):
        body = [t for a, t in instrs if start <= a <= end and not t.startswith("NOP")]
        return {"start": start, "end": end, "instructions": len(body), "mma": sum(bool(_MMA.search(t)) for t in body)}

    loops = []
    for addr, text_ in instrs:
        bra = _BRA.search(text_)
        # a backward branch closes a loop; a branch to itself is the trap after EXIT, not a loop
        if bra and bra.group(1) in labels and labels[bra.group(1)] < addr:
            loops.append(span(labels[bra.group(1)], addr))
    innermost = [lp for lp in loops if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"]
                                               for o in loops)]
    with_mma = [lp for lp in loops if lp["mma"]]
    if with_mma:
        main = min(with_mma, key=lambda lp: lp["instructions"])
    elif innermost:
        main = max(innermost, key=lambda lp: lp["instructions"])
    else:  # no loop: the whole kernel is one iteration
        main = dict(span(instrs[0][0], instrs[-1][0]), whole_kernel=True) if instrs else None
    return {"instructions": sum(not t.startswith("NOP") for _, t in instrs), "loops": len(loops),
            "main_loop": main, "mma_total": sum(bool(_MMA.search(t)) for _, t in instrs),
            "main_loop_paths": _paths(instrs, labels, main["start"], main["end"]) if main else None}


def parse_resource_usage(text: str) -> dict:
    """cuobjdump -res-usage: registers, and the local memory per thread that ptxas spills into (its stack
    frame plus any other local memory: what CUDA's LOCAL_SIZE_BYTES, triton's n_spills x 4, counts)."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        raise ValueError(f"no resource usage in cuobjdump output: {text[:200]!r}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local, "spill_bytes": stack + local}


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma"


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------

_ENTRIES: list = []  # the worker processes (forked) read the entries from here


def _compile_key(e: dict) -> tuple:
    return (e["fn"].__module__, e["fn"].__name__, tuple(sorted(e["signature"].items())),
            tuple(sorted((k, repr(v)) for k, v in e["constexprs"].items())), tuple(sorted(e["divisible"])),
            tuple(sorted(e["ones"])), e["num_warps"], e["num_stages"])


def compile_entry(e: dict, capability: int = 90, keep_asm: bool = False) -> dict:
    """Compile one entry for sm_<capability> and read it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = e["fn"]
    signature, constexprs = dict(e["signature"]), dict(e["constexprs"])
    for arg in e.get("ones", []):  # the runtime turns an int argument equal to 1 into a constant
        signature[arg], constexprs[arg] = "constexpr", 1
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in e["divisible"]}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": e["num_warps"], "num_stages": e["num_stages"]})
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    shared = int(k.metadata.shared)
    read = dict(parse_resource_usage(res.stdout), shared=shared, smem_fits=shared <= SMEM_PER_BLOCK,
                mma=_mma_kind(ptx), ttgir=parse_ttgir(ttgir), sass=parse_sass(sass), compile_s=round(seconds, 2),
                triton=triton.__version__)
    dots = read["ttgir"]["dots"]
    read["wgmma_form"] = "/".join(sorted({d["form"] for d in dots if d["form"]})) if read["mma"] == "wgmma" else ""
    if keep_asm:
        read["asm"] = {"ttgir": ttgir, "ptx": ptx, "sass": sass}
    return read


def _work(args):
    index, capability, keep_asm = args
    try:
        return index, compile_entry(_ENTRIES[index], capability, keep_asm)
    except Exception as exc:  # reported per entry, the others still compile
        return index, {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def collect(preset: str = "h200", tune_configs: int | None = None, modules=KERNEL_MODULES,
            shapes: dict | None = None) -> list[dict]:
    """Every module's entries at the preset's shapes (or at ``shapes``); names unique, protocol fields present."""
    import importlib

    if shapes is None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        shapes = dict(PRESETS[preset], tune_configs=tune_configs)
    entries, seen = [], {}
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, "report_entries", None)
        if fn is None:
            raise RuntimeError(f"{mod_name} has no report_entries(shapes) (kernel report protocol)")
        got = fn(shapes)
        if not got:
            raise RuntimeError(f"{mod_name}.report_entries returned no entries")
        for e in got:
            missing = {"name", "kernel", "variant", "dtype", "shape", "config", "fn", "signature", "constexprs",
                       "divisible", "num_warps", "num_stages", "launchable", "gemm", "model"} - set(e)
            if missing:
                raise ValueError(f"{mod_name}: entry {e.get('name')!r} lacks {sorted(missing)}")
            if not e["name"].startswith(e["kernel"]):
                raise ValueError(f"{mod_name}: entry name {e['name']!r} does not start with its kernel {e['kernel']!r}")
            if e["name"] in seen:
                raise ValueError(f"entry name {e['name']!r} given by {mod_name} and {seen[e['name']]}")
            seen[e["name"]] = mod_name
            e.setdefault("ones", [])
            e.setdefault("precision", None)  # a dot precision only where the entry names one
            e["module"] = mod_name
            entries.append(e)
    return entries


def compile_all(entries: list[dict], capability: int = 90, jobs: int = 2, keep_asm: bool = False,
                progress=None) -> list[dict]:
    """Read every entry (identical compiles shared), in a process pool of `jobs`; `progress(done, total)`."""
    import multiprocessing

    _ENTRIES[:] = entries
    first = {}
    for i, e in enumerate(entries):
        first.setdefault(_compile_key(e), i)
    todo = [(i, capability, keep_asm) for i in sorted(set(first.values()))]
    done = {}
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(todo) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")))
            results = pool.map(_work, todo, chunksize=1)
        else:
            results = map(_work, todo)
        for index, read in results:
            done[index] = read
            if progress:
                progress(len(done), len(todo))
    return [done[first[_compile_key(e)]] for e in entries]


def _progress(done: int, total: int) -> None:
    if done % 10 == 0 or done == total:
        print(f"compiled {done}/{total}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The first-order model (a PREDICTION, not a measurement)
# ---------------------------------------------------------------------------------------------


def ctas_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), threads, shared memory."""
    threads = 32 * num_warps
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED)
    return max(0, min(CTAS_PER_SM, THREADS_PER_SM // threads, by_regs, by_smem))


def loop_issue(e: dict, read: dict) -> tuple:
    """(instructions every iteration runs, instructions in conditional blocks, iterations per run of
    those blocks, whether a block waits for every MMA) of the main loop. How often the blocks run is
    the entry's model["conditional_every"] where the kernel knows it; else 1: counted every iteration."""
    sass = read["sass"]
    paths = sass.get("main_loop_paths")
    if not paths:
        loop = sass["main_loop"]
        return (loop["instructions"] if loop else 0), 0, 1, False
    tt = read["ttgir"]
    conditional_pendings = Counter(tt["dot_pendings"]) - Counter(tt["dot_pendings_every_iteration"])
    full_wait = any(b["full_mma_wait"] for b in paths["blocks"]) or conditional_pendings[0] > 0
    return paths["every_iteration"], paths["conditional"], e["model"].get("conditional_every", 1), full_wait


def predict(e: dict, read: dict) -> dict | None:
    """Predicted time of the whole launch at the preset's shapes, with its parts (None: cannot launch)."""
    if "error" in read or not read["smem_fits"]:
        return None
    m = e["model"]
    occ = ctas_per_sm(read["registers"], e["num_warps"], read["shared"])
    if occ == 0:
        return None
    hot, cond, every, cond_full_wait = loop_issue(e, read)
    sass_iter = hot + cond / every  # average instructions per iteration
    if m["kind"] == "gemm":
        rate_key = e.get("precision") or e["dtype"]
        sm_rate = DOT_RATE[rate_key] * PEAK_BF16 / SMS
        tiles = math.ceil(m["M"] / m["BM"]) * math.ceil(m["N"] / m["BN"])
        steps = math.ceil(m["K"] / m["BK"])
        t_tc = 2 * m["BM"] * m["BN"] * m["BK"] * steps / sm_rate
        t_issue = steps * hot * e["num_warps"] / ISSUE_PER_CLK / CLOCK
        t_cond = steps / every * cond * e["num_warps"] / ISSUE_PER_CLK / CLOCK
        t_mem = m["bytes"] / tiles / (COPY_BW / SMS)
        waves = math.ceil(tiles / (SMS * occ))
        tt = read["ttgir"]
        # warp_group_dot_wait {pendings = 0} on the path every iteration runs: issue waits for each MMA
        serial = 0 in tt["dot_pendings_every_iteration"]
        drains = steps if 0 in tt["async_waits_every_iteration"] else steps / every if 0 in tt["async_waits"] else 0
        t_drain = drains * L2_LATENCY  # each such step waits for its own loads
        # a conditional block that waits for every MMA runs while the tensor cores are idle: it adds;
        # one without such a wait is issued alongside the MMAs like the rest of the loop
        cond_serial = cond_full_wait and cond > 0
        if not cond_serial:
            t_issue, t_cond = t_issue + t_cond, 0.0
        t_compute = (t_tc + t_issue if serial else max(t_tc, t_issue)) + t_cond
        t_tile = max(t_compute, t_mem) + t_drain
        t = waves * occ * t_tile  # `occ` resident tiles share one SM's tensor cores, schedulers and bandwidth
        units = "tensor cores" if read["mma"] in ("wgmma", "mma.sync") else "FMA units"
        parts = {"mma+issue (serial)": t_tc + t_issue} if serial else {units: t_tc, "issue": t_issue}
        parts.update({"memory": t_mem, "drain latency": t_drain, "conditional block (serial)": t_cond})
        bound = max(parts, key=parts.get)
        return {"kind": "gemm", "ctas_per_sm": occ, "tiles": tiles, "k_steps": steps, "waves": waves,
                "sass_per_iter": sass_iter, "sass_every_iteration": hot, "sass_conditional": cond,
                "conditional_every": every, "tile_tensor_core_s": t_tc, "tile_issue_s": t_issue,
                "tile_conditional_s": t_cond, "tile_memory_s": t_mem, "drain_steps": drains, "tile_drain_s": t_drain,
                "serialised_mma": serial, "tile_s": t_tile, "launch_tensor_core_s": waves * occ * t_tc,
                "launch_issue_s": waves * occ * t_issue, "launch_memory_s": m["bytes"] / COPY_BW,
                "time_s": t, "bound": bound, "pct_of_bf16_peak": 100 * m["flops"] / t / PEAK_BF16}
    resident = min(m["ctas"], SMS * occ)
    bw_little = resident * m["bytes_in_flight_per_cta"] / HBM_LATENCY
    t_mem = m["bytes"] / min(COPY_BW, bw_little)
    # the busiest SM runs ceil(ctas / SMS) CTAs' instructions
    t_issue = math.ceil(m["ctas"] / SMS) * e["num_warps"] * sass_iter * m.get("iterations", 1) / ISSUE_PER_CLK / CLOCK
    t = max(t_mem, t_issue)
    bound = "issue" if t_issue > t_mem else "bandwidth" if bw_little >= COPY_BW else "bytes in flight"
    return {"kind": "memory", "ctas_per_sm": occ, "resident_ctas": resident, "sass_per_iter": sass_iter,
            "little_bw": bw_little, "memory_s": t_mem, "issue_s": t_issue, "time_s": t, "bound": bound,
            "pct_of_copy_bw": 100 * m["bytes"] / t / COPY_BW}


def predict_variants(op: str, shape: dict, jobs: int = 1) -> dict[str, float]:
    """Predicted milliseconds of each forward variant of ``op`` at ``shape`` (M, N, D, L, dtype) on the
    report's device (an H200): a PREDICTION. folded = its stats pass + its first launchable GEMM config;
    materialised = its normalise pass + the cuBLAS GEMM, taken at the measured GEMM rate (PEAK_BF16,
    scaled by DOT_RATE for fp32). The bench prints these beside its CPU times, labelled."""
    if op != "multilevel_merge":
        raise ValueError(f"op: expected 'multilevel_merge', got {op!r}")
    import torch

    dname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(shape["dtype"])
    if dname is None:
        raise ValueError(f"shape: dtype must be bf16, fp16 or fp32, got {shape['dtype']}")
    M, N, D, L = (int(shape[k]) for k in ("M", "N", "D", "L"))
    entries = collect(modules=("comm_fast.kernels.multilevel_merge",),
                      shapes={"merge": [dict(name="bench", M=M, N=N, D=D, L=L, T=M)], "dtypes": [dname],
                              "tune_configs": 1})
    entries = [e for e in entries if e["kernel"] in ("merge_normalise", "merge_fwd") and e["variant"]
               and not e["name"].endswith("/accumulate")]
    times = {}
    for e, read in zip(entries, compile_all(entries, jobs=jobs)):
        p = predict(e, read)
        if p is None:
            continue
        times.setdefault(e["variant"], []).append(p["time_s"])
    result = {}
    if "folded" in times and len(times["folded"]) == 2:  # stats pass + GEMM
        result["folded"] = 1e3 * sum(times["folded"])
    if "materialised" in times:
        rate = PEAK_BF16 * (1.0 if dname != "fp32" else DOT_RATE["ieee"])
        result["materialised"] = 1e3 * (times["materialised"][0] + 2 * M * N * L * D / rate)
    return result


def _explain_issue(e: dict, p: dict) -> list[str]:
    """The issue lines of a GEMM's explanation: the every-iteration path, then the conditional blocks."""
    per = f"x {e['num_warps']} warps / {ISSUE_PER_CLK} per clk / {CLOCK / 1e9:g} GHz"
    hot, cond, every = p["sass_every_iteration"], p["sass_conditional"], p["conditional_every"]
    if not cond:
        return [f"  issue / tile = {p['k_steps']} steps x {hot} SASS/iter {per} = {p['tile_issue_s'] * 1e6:.2f} us"]
    runs = f"{p['k_steps']}/{every} runs" if every != 1 else f"{p['k_steps']} runs (how often it runs is not known: every iteration)"
    t_cond = p["tile_conditional_s"]
    if t_cond:
        return [f"  issue / tile = {p['k_steps']} steps x {hot} SASS/iter on the every-iteration path {per} = "
                f"{p['tile_issue_s'] * 1e6:.2f} us",
                f"  conditional block / tile = {runs} x {cond} SASS {per} = {t_cond * 1e6:.2f} us (serial: it waits for every MMA)"]
    return [f"  issue / tile = ({p['k_steps']} steps x {hot} SASS/iter + {runs} x {cond} SASS of conditional blocks) "
            f"{per} = {p['tile_issue_s'] * 1e6:.2f} us"]


def explain(e: dict, read: dict) -> str:
    """The arithmetic of one entry's prediction, line by line."""
    p = predict(e, read)
    m = e["model"]
    lines = [f"PREDICTION for {e['name']} ({e['config']}), first-order model, not a measurement:"]
    if p is None:
        return "\n".join(lines + ["  cannot launch (shared memory or occupancy): no prediction"])
    occ = p["ctas_per_sm"]
    lines.append(f"  resident CTAs/SM = min(regs: {REGS_PER_SM} // ({read['registers']} regs x {32 * e['num_warps']} "
                 f"threads), smem: {SMEM_PER_SM} // ({read['shared']} + {SMEM_RESERVED}), threads, {CTAS_PER_SM}) = {occ}")
    if p["kind"] == "gemm":
        rk = e.get("precision") or e["dtype"]
        rate = DOT_RATE[rk] * PEAK_BF16 / SMS
        lines += [
            f"  tiles = ceil({m['M']}/{m['BM']}) x ceil({m['N']}/{m['BN']}) = {p['tiles']}, "
            f"K steps = ceil({m['K']}/{m['BK']}) = {p['k_steps']}, waves = ceil({p['tiles']} / ({SMS} x {occ})) = {p['waves']}",
            f"  tensor cores / tile = 2 x {m['BM']} x {m['BN']} x {m['BK']} x {p['k_steps']} FLOP / "
            f"({DOT_RATE[rk]:g} x {PEAK_BF16 / 1e12:g} TFLOP/s / {SMS} SMs = {rate / 1e9:.1f} GFLOP/s) = {p['tile_tensor_core_s'] * 1e6:.2f} us",
            *_explain_issue(e, p),
            f"  memory / tile = {m['bytes']} B / {p['tiles']} tiles / ({COPY_BW / 1e12:g} TB/s / {SMS}) = {p['tile_memory_s'] * 1e6:.2f} us",
            f"  drain / tile = " + (f"{p['drain_steps']:g} steps x {L2_LATENCY * 1e9:g} ns (async_wait {{num = 0}} in the main loop) = "
                                    f"{p['tile_drain_s'] * 1e6:.2f} us" if p["tile_drain_s"] else "0 (no full drain in the main loop)"),
            f"  tile = {'tensor cores + issue (wgmma serialised: pendings = 0 every iteration)' if p['serialised_mma'] else 'max(tensor cores, issue)'}"
            + (" + conditional block (it waits for every MMA: tensor cores idle meanwhile)" if p["tile_conditional_s"] else "")
            + f"; max(that, memory) + drain = {p['tile_s'] * 1e6:.2f} us",
            f"  launch = {p['waves']} waves x {occ} CTAs/SM x {p['tile_s'] * 1e6:.2f} us = {p['time_s'] * 1e6:.1f} us "
            f"({p['bound']}-bound); HBM alone {p['launch_memory_s'] * 1e6:.1f} us",
            f"  predicted {m['flops'] / 1e9:.1f} GFLOP / {p['time_s'] * 1e6:.1f} us = "
            f"{m['flops'] / p['time_s'] / 1e12:.0f} TFLOP/s = {p['pct_of_bf16_peak']:.0f}% of the measured bf16 peak "
            f"({PEAK_BF16 / 1e12:g} TFLOP/s) -- PREDICTION",
            "  (max() assumes the pipeline overlaps loads, tensor cores and issue; bank conflicts, epilogue, L2 misses and the"
            " tensor-core pipe's refill after a full MMA wait are not modelled)"]
    else:
        lines += [
            f"  resident CTAs = min({m['ctas']}, {SMS} x {occ}) = {p['resident_ctas']}; Little's law: "
            f"{p['resident_ctas']} x {m['bytes_in_flight_per_cta']} B / {HBM_LATENCY * 1e9:g} ns = {p['little_bw'] / 1e12:.2f} TB/s",
            f"  memory = {m['bytes'] / 1e6:.1f} MB / min({COPY_BW / 1e12:g}, {p['little_bw'] / 1e12:.2f}) TB/s = "
            f"{p['memory_s'] * 1e6:.1f} us",
            f"  issue = ceil({m['ctas']} / {SMS}) CTAs x {e['num_warps']} warps x {p['sass_per_iter']:g} SASS/iter x "
            f"{m.get('iterations', 1)} iterations / {ISSUE_PER_CLK} per clk / {CLOCK / 1e9:g} GHz = {p['issue_s'] * 1e6:.1f} us",
            f"  predicted max(memory, issue) = {p['time_s'] * 1e6:.1f} us ({p['bound']}-bound) = "
            f"{p['pct_of_copy_bw']:.0f}% of the measured copy bandwidth ({COPY_BW / 1e12:g} TB/s) -- PREDICTION"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------

GATES = ("compiles", "no_spills", "smem_fits", "wgmma", "multi_buffered", "no_full_drain")


def gate_failures(e: dict, read: dict) -> list[tuple[str, str]]:
    """(gate, why) for each gate a launchable entry fails."""
    if not e["launchable"]:
        return []
    if "error" in read:
        return [("compiles", read["error"])]
    fails = []
    if read["spill_bytes"]:
        fails.append(("no_spills", f"{read['spill_bytes']} B of local memory per thread"))
    if not read["smem_fits"]:
        fails.append(("smem_fits", f"{read['shared']} B of shared memory > {SMEM_PER_BLOCK}"))
    if e["gemm"]:
        if e["dtype"] in ("bf16", "fp16") and read["mma"] != "wgmma":
            fails.append(("wgmma", f"16-bit GEMM compiled to {read['mma']}"))
        tt = read["ttgir"]
        if not tt["dots"]:
            fails.append(("multi_buffered", "no tl.dot found inside a loop"))
        for d in tt["dots"]:
            if not ((d["a_buffers"] or 0) >= 2 and (d["b_buffers"] or 0) >= 2):
                fails.append(("multi_buffered", f"dot operands A: {d['a_buffers']} buffer(s) ({d['a_source']}), "
                                                f"B: {d['b_buffers']} ({d['b_source']})"))
                break
        if 0 in tt["async_waits"]:
            fails.append(("no_full_drain", f"async_wait {{num = 0}} inside the main loop (waits {tt['async_waits']})"))
    return fails


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def run(preset: str = "h200", target: str = "sm_90", tune_configs: int | None = None, jobs: int = 2,
        only: str | None = None, keep_asm: bool = False, progress=None) -> dict:
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {sorted(TARGETS)}, got {target!r}")
    import triton

    t0 = time.perf_counter()
    entries = collect(preset, tune_configs)
    if only:
        entries = [e for e in entries if only in e["name"]]
        if not entries:
            raise ValueError(f"only: no entry name contains {only!r}")
    reads = compile_all(entries, TARGETS[target], jobs, keep_asm, progress)
    rows = []
    for e, r in zip(entries, reads):
        row = {k: v for k, v in e.items() if k != "fn"}
        row["fn"] = f"{e['fn'].__module__}.{e['fn'].__name__}"
        row["read"] = r
        row["prediction"] = predict(e, r)
        row["gate_failures"] = [list(f) for f in gate_failures(e, r)]
        rows.append(row)
    constants = {k: globals()[k] for k in ("SMEM_PER_BLOCK", "SMEM_PER_SM", "SMS", "PEAK_BF16", "COPY_BW", "CLOCK",
                                           "ISSUE_PER_CLK", "HBM_LATENCY", "L2_LATENCY", "DOT_RATE")}
    return {"target": target, "preset": preset, "tune_configs": tune_configs, "triton": triton.__version__,
            "constants": constants, "entries": rows, "seconds": round(time.perf_counter() - t0, 1),
            "compiles": len({_compile_key(e) for e in entries}),
            "note": "every predicted_* / prediction figure is a first-order PREDICTION from the constants, not a measurement"}


def _sass_column(read: dict, model: dict) -> str:
    """SASS per main-loop iteration: "every-iteration path + conditional / iterations per run" where a
    forward branch inside the loop jumps over a block."""
    paths, loop = read["sass"].get("main_loop_paths"), read["sass"]["main_loop"]
    if not loop:
        return ""
    if not paths or not paths["conditional"]:
        return str(loop["instructions"])
    return f"{paths['every_iteration']}+{paths['conditional']}/{model.get('conditional_every', 1)}"


def _waits_column(tt: dict, key: str) -> str:
    """The main loop's wait depths: those every iteration runs, then "if:" those only in its scf.if regions."""
    every = sorted(set(tt[key + "_every_iteration"]))
    cond = sorted(set((Counter(tt[key]) - Counter(tt[key + "_every_iteration"])).elements()))
    return ",".join(map(str, every)) + (" if:" + ",".join(map(str, cond)) if cond else "")


def _table(rows: list[dict]) -> str:
    head = ["entry", "regs", "spill", "smem KB", "fits", "mma", "bufs A/B", "waits", "pend", "SASS/it",
            "pred us", "pred %", "bound", "gates"]
    out = [head]
    for row in rows:
        r, p = row["read"], row["prediction"]
        if "error" in r:
            out.append([row["name"], "-", "-", "-", "-", "error", "", "", "", "", "", "", "", "compiles"])
            continue
        tt = r["ttgir"]
        bufs = ",".join(dict.fromkeys(f"{d['a_buffers']}/{d['b_buffers']}" for d in tt["dots"]))
        mma = r["mma"] + (f" {r['wgmma_form']}" if r["wgmma_form"] else "")
        pct = (p.get("pct_of_bf16_peak") if p and p["kind"] == "gemm" else p.get("pct_of_copy_bw")) if p else None
        out.append([row["name"], str(r["registers"]), str(r["spill_bytes"]), f"{r['shared'] / 1024:.1f}",
                    "yes" if r["smem_fits"] else "NO", mma if row["gemm"] else "-", bufs,
                    _waits_column(tt, "async_waits"), _waits_column(tt, "dot_pendings"),
                    _sass_column(r, row["model"]), f"{p['time_s'] * 1e6:.0f}" if p else "-",
                    (f"{pct:.0f}%" + (" pk" if p["kind"] == "gemm" else " bw")) if p else "-",
                    p["bound"] if p else "-", " ".join(g for g, _ in row["gate_failures"]) or "ok"])
    widths = [max(len(r[i]) for r in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in out)


def default_merge(rows: list[dict]) -> dict | None:
    """The default merge forward: the module's first variant, bf16, CLIP shape, best predicted config
    (what the autotuner is expected to pick)."""
    fwd = [r for r in rows if r["kernel"] == "merge_fwd" and r["dtype"] == "bf16" and r["shape"] == "clip"]
    if not fwd:
        return None
    first = [r for r in fwd if r["variant"] == fwd[0]["variant"] and r["prediction"]]
    return min(first, key=lambda r: r["prediction"]["time_s"]) if first else fwd[0]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _dump(rows: list[dict], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    names = {}
    for row in rows:
        asm = row["read"].get("asm")
        if not asm:
            continue
        base = safe_name(row["name"])
        if base in names:
            raise ValueError(f"dump: entries {names[base]!r} and {row['name']!r} give the same file name {base!r}")
        names[base] = row["name"]
        for ext, text in asm.items():
            with open(os.path.join(directory, f"{base}.{ext}"), "w") as f:
                f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comm_fast.kernel_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="sm_90", help="GPU target (only sm_90)")
    ap.add_argument("--preset", default="h200", help=f"shapes: one of {sorted(PRESETS)}")
    ap.add_argument("--json", metavar="FILE", help="write every field of every entry to FILE")
    ap.add_argument("--dump", metavar="DIR", help="write <entry>.ttgir, .ptx, .sass per entry into DIR")
    ap.add_argument("--explain", metavar="NAME", help="print the prediction's arithmetic of this entry "
                                                      "(default: the default merge forward)")
    ap.add_argument("--only", metavar="TEXT", help="only the entries whose name contains TEXT")
    ap.add_argument("--tune-configs", type=int, metavar="N",
                    default=int(os.environ.get("COMM_FAST_TUNE_CONFIGS", "0") or 0) or None,
                    help="keep the first N autotune configs (default: $COMM_FAST_TUNE_CONFIGS, else all)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    args = ap.parse_args(argv)
    if args.target not in TARGETS:
        ap.error(f"--target: expected one of {sorted(TARGETS)}, got {args.target!r}")
    if args.preset not in PRESETS:
        ap.error(f"--preset: expected one of {sorted(PRESETS)}, got {args.preset!r}")
    if args.jobs < 1:
        ap.error(f"--jobs: expected a positive number, got {args.jobs}")
    if args.tune_configs is not None and args.tune_configs < 1:
        ap.error(f"--tune-configs: expected a positive number, got {args.tune_configs}")
    for opt in ("json", "dump"):
        path = getattr(args, opt)
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if path and not os.path.isdir(parent):
            ap.error(f"--{opt}: the folder {parent!r} does not exist")
    if args.dump and os.path.exists(args.dump) and not os.path.isdir(args.dump):
        ap.error(f"--dump: {args.dump!r} exists and is not a folder")
    if args.explain:
        try:
            names = {e["name"] for e in collect(args.preset, args.tune_configs)}
        except ValueError as exc:
            ap.error(str(exc))
        if args.explain not in names:
            ap.error(f"--explain: no entry named {args.explain!r}")
    try:
        report = run(args.preset, args.target, args.tune_configs, args.jobs, args.only, keep_asm=bool(args.dump),
                     progress=_progress)
    except ValueError as exc:
        ap.error(str(exc))
    rows = report["entries"]
    print(f"kernel report: {len(rows)} entries, {report['compiles']} compiles for {report['target']} with triton "
          f"{report['triton']} in {report['seconds']} s; preset {report['preset']}"
          + (f", COMM_FAST_TUNE_CONFIGS={report['tune_configs']}" if report["tune_configs"] else ""))
    print("'pred' columns are a first-order PREDICTION (pk: % of the measured bf16 GEMM peak "
          f"{PEAK_BF16 / 1e12:g} TFLOP/s; bw: % of the measured copy bandwidth {COPY_BW / 1e12:g} TB/s), not measurements.")
    print(_table(rows))
    failing = [(row["name"], g, why) for row in rows for g, why in row["gate_failures"]]
    print(f"\ngates: {len(failing)} failure(s) in {len({n for n, _, _ in failing})} of {len(rows)} entries")
    for name, gate, why in failing:
        print(f"  {gate:15s} {name}: {why}")
    target = next((r for r in rows if r["name"] == args.explain), None) if args.explain else default_merge(rows)
    if target is not None:
        print("\n" + explain(target, target["read"]))
    if args.dump:
        _dump(rows, args.dump)
        for row in rows:
            row["read"].pop("asm", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
