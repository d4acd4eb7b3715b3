"""LoRA of the LLM through PEFT, as in LLaVA's LoRA recipe: low-rank adapters on the LLM's linear layers,
the merge heads, DINOv2 MLP and projector trained fully, CLIP and DINOv2 frozen.

    comm-fast train --model PRETRAIN/model --lora [--lora-r 128] [--lora-alpha 256] [--lora-dropout 0.05]
                    [--lora-targets q_proj ...] [--lora-bits 4]          # writes RUN/adapter
    comm-fast merge-lora --model RUN/adapter --out DIR                   # a plain COMMForCausalLM

The adapters go into ``model.llm`` in place with ``peft.functional.inject_adapter_in_model``, not through
``get_peft_model``, whose PeftModel wrapper would move the decoder under ``base_model.model``: ``model.llm``
stays the LlamaForCausalLM, so ``llm.model(...)``, ``llm.lm_head.weight`` (the chunked loss reads it, which is
why lm_head is never a target) and the decoder layers that FSDP wraps are where the rest of the code looks;
only the target Linear layers become PEFT's lora.Linear (the frozen weight in ``.base_layer``).

An adapter directory (a LoRA run's RUN/adapter, and each of its checkpoints) holds no frozen weight:
    adapter_config.json, adapter_model.safetensors  PEFT's adapter of the LLM, keyed as a PeftModel saves it
                                                    (``peft.PeftModel.from_pretrained(llm, DIR)`` loads it)
    trainable.safetensors                           the fully trained heads (COMMVisionTower.HEADS)
    lora.json                                       the LoRA options, how the base model is built again
                                                    (--model DIR, --llm/--clip/--dino, or a preset's seeded
                                                    random init), and a check of the base's weights
Merging, resuming and loading build the base again the way the run did and refuse one whose check differs.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import warnings

import torch

DEFAULT_R = 128                 # LLaVA's lora_r; alpha defaults to 2 r (LLaVA's 256 at r = 128)
DEFAULT_DROPOUT = 0.05
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_LR = 2e-4                  # LLaVA's finetune_lora.sh rate (pretrained weights; presets keep theirs)
BITS = (4,)
ADAPTER = "default"             # PEFT's adapter name in the live model (saved keys carry none)
PEFT_PREFIX = "base_model.model."  # a PeftModel's key prefix in front of the LLM's own names
ADAPTER_CONFIG, ADAPTER_WEIGHTS, INFO, HEADS = ("adapter_config.json", "adapter_model.safetensors", "lora.json",
                                                "trainable.safetensors")
FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, INFO, HEADS)
FLAGS = ("lora_alpha", "lora_dropout", "lora_targets", "lora_bits")


# -- options ----------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from comm_fast.cli import dropout_probability, positive_float, positive_int

    p.add_argument("--lora", action="store_true",
                   help=f"adapt the LLM with LoRA (PEFT) instead of training all of it; the heads, MLP and "
                        f"projector train fully (default r {DEFAULT_R})")
    p.add_argument("--lora-r", type=positive_int, help=f"LoRA rank (implies --lora; default {DEFAULT_R})")
    p.add_argument("--lora-alpha", type=positive_float, help="LoRA alpha, the update scaled by alpha / r (default 2 r)")
    p.add_argument("--lora-dropout", type=dropout_probability,
                   help=f"dropout on the LoRA input (default {DEFAULT_DROPOUT})")
    p.add_argument("--lora-targets", nargs="+", metavar="NAME",
                   help=f"the LLM's linear layers to adapt (default: {' '.join(TARGETS)})")
    p.add_argument("--lora-bits", type=int, choices=BITS,
                   help="QLoRA: the frozen LLM in 4-bit NF4 (bitsandbytes, CUDA)")


def options(args) -> dict | None:
    """The LoRA options of train's flags, or None when LoRA is off; ValueError naming the flag."""
    if not (args.lora or args.lora_r is not None):
        given = [f for f in FLAGS if getattr(args, f) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag}: a LoRA option, expected with --lora or --lora-r (LoRA is off)")
        return None
    r = args.lora_r or DEFAULT_R
    return {"r": r, "alpha": float(args.lora_alpha if args.lora_alpha is not None else 2 * r),
            "dropout": float(DEFAULT_DROPOUT if args.lora_dropout is None else args.lora_dropout),
            "targets": list(args.lora_targets or TARGETS), "bits": args.lora_bits}


def check_stage(stage: str, tune_llm: bool | None) -> None:
    """LoRA adapts the LLM: refused where the stage keeps the LLM frozen (pretrain's default, --no-tune-llm)."""
    if tune_llm is False:
        raise ValueError("--lora: LoRA adapts the LLM, but --no-tune-llm freezes it; drop one of them")
    if stage == "pretrain" and tune_llm is None:
        raise ValueError("--lora: expected --stage finetune (or --tune-llm): the pretrain stage keeps the LLM "
                         "frozen and trains the heads and projector only, so there is nothing to adapt")


def check_bits(bits: int | None, device) -> None:
    if bits is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--lora-bits {bits}: QLoRA needs bitsandbytes, which is not installed "
                         "(pip install bitsandbytes; it runs on CUDA); without --lora-bits LoRA trains on the "
                         "full-precision LLM")
    if torch.device(device).type != "cuda":
        raise ValueError(f"--lora-bits {bits}: QLoRA needs a CUDA device (bitsandbytes' 4-bit kernels), this run "
                         f"is on {torch.device(device).type}")


def linear_names(llm) -> list[str]:
    """The names of the decoder's linear layers (what --lora-targets may name; lm_head is not among them)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in llm.model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_targets(llm, targets: list[str]) -> None:
    known = linear_names(llm)
    for t in targets:
        if t == "lm_head":
            raise ValueError("--lora-targets: lm_head is not adapted (the loss reads its weight directly, as "
                             f"LLaVA leaves it out); expected some of {', '.join(known)}")
        if t not in known:
            raise ValueError(f"--lora-targets: expected names of the LLM's linear layers ({', '.join(known)}), "
                             f"got {t!r}")


def base_check(llm) -> str:
    """A fingerprint of the frozen LLM (the embedding's first row and the first row of each of decoder layer 0's
    weights): merging or resuming on another base is refused instead of giving wrong weights."""
    h = hashlib.sha256()
    rows = [("embed", llm.get_input_embeddings().weight)]
    rows += [(n, p) for n, p in llm.model.layers[0].named_parameters() if p.dim() == 2 and "lora_" not in n]
    for name, w in sorted(rows):
        h.update(name.replace(".base_layer", "").encode())
        h.update(w.detach()[0].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- the live model ---------------------------------------------------------------------------------
def lora_config(opts: dict):
    from peft import LoraConfig

    return LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                      target_modules=list(opts["targets"]), bias="none")


def apply(model, opts: dict, device="cpu") -> str:
    """Adapters into ``model.llm`` in place (4-bit base first with ``bits``); returns the base's check.
    ValueError naming the flag on bad options."""
    from peft.functional import inject_adapter_in_model

    check_targets(model.llm, opts["targets"])
    check_bits(opts.get("bits"), device)
    check = base_check(model.llm)
    if opts.get("bits"):
        quantize_4bit(model.llm)
    inject_adapter_in_model(lora_config(opts), model.llm, adapter_name=ADAPTER)
    return check


def setup(args, model, device) -> dict | None:
    """train's LoRA: the options of its flags checked, the adapters applied; returns what the run's adapter
    directories record (lora.json: the options, how to build the base again, its check), or None without LoRA."""
    opts = options(args)
    if opts is None:
        return None
    check_stage(args.stage, args.tune_llm)
    check = apply(model, opts, device)
    paths = {k: os.path.abspath(getattr(args, k)) if getattr(args, k) else None
             for k in ("model", "llm", "clip", "dino")}
    return {**opts, "base": {**paths, "preset": args.preset, "seed": args.seed}, "check": check,
            "attention_dropout": args.dropout}


def quantize_4bit(llm, compute_dtype=torch.bfloat16) -> None:
    """QLoRA's base: every linear layer of the decoder as bitsandbytes' NF4 Linear4bit (the weights are
    quantized when the model moves to CUDA). Written for CUDA with bitsandbytes; not run where this was built."""
    import bitsandbytes as bnb

    for parent in list(llm.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)


def adapted(model):
    """The COMM model under ``model`` (DDP unwrapped) when its LLM carries LoRA adapters, else None."""
    m = getattr(model, "module", model)
    return m if hasattr(getattr(m, "llm", None), "peft_config") else None


def is_adapter_param(name: str) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(f".{n}." in name for n in LoraLayer.adapter_layer_names)


def peft_key(name: str) -> str:
    """The saved key of an adapter parameter of the COMM model, as a PeftModel of the LLM names it
    (``llm.X.lora_A.default.weight`` -> ``base_model.model.X.lora_A.weight``)."""
    if not name.startswith("llm."):
        raise ValueError(f"{name}: not a parameter of the LLM")
    return PEFT_PREFIX + name[len("llm."):].replace(f".{ADAPTER}.", ".")


# -- adapter directories ----------------------------------------------------------------------------
def save(directory: str, model, weights: dict[str, torch.Tensor], info: dict) -> dict[str, torch.Tensor]:
    """Write the adapter files of ``weights`` (the trainable ones, by the model's names) into ``directory``;
    returns the rest (the heads), for the caller to write as trainable.safetensors."""
    from comm_fast._io import save_safetensors

    m = adapted(model)
    adapter = {peft_key(k): v for k, v in weights.items() if is_adapter_param(k)}
    m.llm.peft_config[ADAPTER].save_pretrained(directory)
    save_safetensors(adapter, os.path.join(directory, ADAPTER_WEIGHTS))
    with open(os.path.join(directory, INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return {k: v for k, v in weights.items() if not is_adapter_param(k)}


def save_model(directory: str, model, weights: dict[str, torch.Tensor], info: dict) -> None:
    """A run's RUN/adapter: the adapter files and the heads, written whole or not at all."""
    from comm_fast._io import atomic_directory, save_safetensors

    with atomic_directory(directory) as tmp:
        save_safetensors(save(tmp, model, weights, info), os.path.join(tmp, HEADS))


def read(directory: str, model) -> dict[str, torch.Tensor]:
    """The adapter weights of ``directory`` by the (adapted) model's parameter names; ValueError when they
    are not the model's adapters."""
    from safetensors.torch import load_file

    names = {peft_key(n): n for n, _ in adapted(model).named_parameters() if is_adapter_param(n)}
    saved = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    if set(saved) != set(names):
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise ValueError(f"{directory}: its adapter does not fit this model's (missing {missing[:3]}, unexpected "
                         f"{extra[:3]})")
    return {names[k]: v for k, v in saved.items()}


def read_info(directory: str, flag: str = "--model") -> dict:
    from comm_fast.models.loading import read_json

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{flag}: no such directory: {directory}")
    missing = [f for f in FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        plain = os.path.isfile(os.path.join(directory, "config.json"))
        raise ValueError(f"{flag}: {directory} holds no LoRA adapter (expected {', '.join(FILES)}, as comm-fast "
                         f"train --lora writes into RUN/adapter and its checkpoints; missing {', '.join(missing)})"
                         + ("; it is a plain model directory already" if plain else ""))
    return read_json(os.path.join(directory, INFO))


def build_base(info: dict, base: str | None = None, where: str = "adapter"):
    """The base COMMForCausalLM of an adapter, built the way its run built it (``base``: a model directory
    instead of the recorded --model); ValueError when its weights are not the ones the adapter was trained on."""
    from comm_fast.training.train import build_model, seed_all

    b = info["base"]
    if base is None and b["model"] and not os.path.isdir(b["model"]):
        raise FileNotFoundError(f"{where}: its base model {b['model']} (the run's --model) is not there any more; "
                                "pass --base DIR")
    seed_all(b["seed"])
    model, _ = build_model(argparse.Namespace(model=base or b["model"], preset=b["preset"], llm=b["llm"],
                                              clip=b["clip"], dino=b["dino"]))
    if base_check(model.llm) != info["check"]:
        source = base or b["model"] or (b["llm"] and "--llm/--clip/--dino") or f"preset {b['preset'] or 'tiny'}"
        raise ValueError(f"{where}: the base model ({source}) is not the one the adapter was trained on (its "
                         f"weights' check {base_check(model.llm)}, expected {info['check']}); pass the right --base")
    return model


def _load_heads(model, directory: str) -> None:
    from safetensors.torch import load_file

    heads = load_file(os.path.join(directory, HEADS))
    unexpected = model.load_state_dict(heads, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{directory}/{HEADS}: weights this model does not have: {unexpected[:3]}")


def load(directory: str, base: str | None = None):
    """The adapted model of an adapter directory (LoRA layers live, not merged), in eval mode."""
    from comm_fast.training.train import set_dropout

    info = read_info(directory)
    model = build_base(info, base, directory)
    apply(model, {**info, "bits": None})
    weights = read(directory, model)
    if model.load_state_dict(weights, strict=False).unexpected_keys:
        raise ValueError(f"{directory}: adapter weights the model does not have")
    _load_heads(model, directory)
    set_dropout(model, info["attention_dropout"])
    return model.eval()


def merge(directory: str, out: str, base: str | None = None) -> None:
    """A plain COMMForCausalLM in ``out``: the base with the adapter merged by PEFT (W + alpha/r B A) and
    the trained heads."""
    from peft import PeftModel
    from peft.functional import get_peft_model_state_dict
    from safetensors.torch import load_file

    from comm_fast.training.train import set_dropout

    info = read_info(directory)
    model = build_base(info, base, directory)
    _load_heads(model, directory)
    with warnings.catch_warnings():  # transformers' deprecation notes about PEFT's calls, not ours to act on
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(model.llm, directory)
    loaded, saved = get_peft_model_state_dict(peft_model), load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    if set(loaded) != set(saved) or any(not torch.equal(loaded[k], saved[k]) for k in saved):
        raise ValueError(f"{directory}: PEFT did not load the adapter as saved (keys differ: "
                         f"{sorted(set(loaded) ^ set(saved))[:3]})")
    model.llm = peft_model.merge_and_unload()
    set_dropout(model, info["attention_dropout"])
    model.save_pretrained(out)


# -- comm-fast merge-lora ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="an adapter directory: a LoRA run's RUN/adapter or one of its checkpoints")
    p.add_argument("--out", required=True, help="where the merged model goes (a plain COMMForCausalLM directory)")
    p.add_argument("--base", help="the base model directory, when it is no longer where the run found its --model")


def run(args) -> int:
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        print("comm-fast merge-lora: error: --out: expected a directory other than --model", file=sys.stderr)
        return 2
    try:
        merge(args.model, args.out, args.base)
    except (ValueError, FileNotFoundError) as exc:
        print(f"comm-fast merge-lora: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {args.model} into {args.out}")
    return 0
