"""``comm_fast.info()`` / ``python -m comm_fast.info`` / ``comm-fast info``: which backend each op uses, and why."""
from __future__ import annotations

import json
import platform

import torch

from comm_fast import _backend, _ext


def info() -> dict:
    from comm_fast.models import llm_kernels
    from comm_fast.models import packing
    from comm_fast.models.attention import attention_backend
    from comm_fast.ops import merge, patch
    from comm_fast.tower import INFERENCE_RULE

    ext, ext_reason = _ext.load()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ops = {**merge.describe(), **patch.describe()}
    last = _backend.last_used()
    for name, entry in ops.items():
        entry = dict(entry)
        entry["last_used"] = last.get(name)
        ops[name] = entry
    attn, attn_reason = attention_backend()
    kernels, kernels_reason = llm_kernels.resolve("auto", "cuda" if torch.cuda.is_available() else "cpu")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "requested_backend": _backend.requested(None),
        "triton_interpret": _backend.triton_interpreting(),
        "extension": {"loaded": ext is not None, "cuda": _ext.has_cuda(), "reason": ext_reason},
        "attention": {"backend": attn, "reason": attn_reason},
        "packed_attention": {**packing.describe(), "last_used": last.get(packing.OP)},
        "llm_kernels": {"auto": kernels, "reason": kernels_reason, "liger": llm_kernels.liger_available()[1],
                        "last_used": {k: last[k] for k in (llm_kernels.LOSS_OP, llm_kernels.LAYERS_OP) if k in last}},
        "ops": ops,
        "tower": {"inference_merge": INFERENCE_RULE, "last_used": last.get("tower")},
    }


def format_info(data: dict) -> str:
    lines = [
        f"comm_fast on {data['device']} (python {data['python']}, torch {data['torch']}, "
        f"triton {data['triton'] or 'absent'}, CUDA {'yes' if data['cuda_available'] else 'no'})",
        f"requested backend: {data['requested_backend']}"
        + ("  [TRITON_INTERPRET=1]" if data["triton_interpret"] else ""),
        f"extension: {'loaded' if data['extension']['loaded'] else 'MISSING'}"
        f"{' with CUDA' if data['extension']['cuda'] else ''} - {data['extension']['reason']}",
        f"attention: {data['attention']['backend']} - {data['attention']['reason']}",
        _packed_line(data["packed_attention"]),
        f"LLM kernels (training, auto): {data['llm_kernels']['auto']} - {data['llm_kernels']['reason']}"
        + "".join(f"; last ran {k}: {v['backend']}" for k, v in data["llm_kernels"]["last_used"].items()),
        f"{'op':<24}{'cpu':<10}{'cuda':<10}why (cpu | cuda)",
    ]
    for name, e in data["ops"].items():
        lines.append(f"{name:<24}{e['cpu']['backend']:<10}{e['cuda']['backend']:<10}"
                     f"{e['cpu']['reason']} | {e['cuda']['reason']}")
        if e.get("last_used"):
            lines.append(f"{'':<24}last ran: {e['last_used']['backend']} ({e['last_used']['reason']})")
        for key, v in e.get("variants", {}).items():  # multilevel_merge: the forward variant per shape
            lines.append(f"{'':<24}variant {v['variant']} for {key}: {v['reason']}")
    tower = data["tower"]
    lines.append(f"tower inference: {tower['inference_merge']}")
    if tower.get("last_used"):
        lines.append(f"{'':<24}last ran: {tower['last_used']['backend']} ({tower['last_used']['reason']})")
    return "\n".join(lines)


def _packed_line(p: dict) -> str:
    line = (f"packed rows ({p['llm_attention']}, requested {p['requested']}): cpu {p['cpu']['backend']}, "
            f"cuda {p['cuda']['backend']} - {p['cuda']['reason']}")
    return line + (f"; last ran: {p['last_used']['backend']}" if p.get("last_used") else "")


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0

