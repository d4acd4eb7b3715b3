"""``comm-fast generate --model DIR --image PATH --prompt TEXT``: answer a question about an image.

    [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--max-new-tokens N] [--sample [--temperature T]]
    [--num-beams B] [--stream]

Defaults: cuda in bfloat16 where a GPU is present, else cpu in float32; greedy decoding (``--num-beams``: beam
search); ``--stream`` prints the answer as it is made (transformers' TextStreamer).
"""
from __future__ import annotations

import sys

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    from comm_fast.cli import positive_float, positive_int

    parser.add_argument("--model", required=True, help="a saved COMMForCausalLM directory (e.g. a run's DIR/model)")
    parser.add_argument("--image", help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float,
                        help="sampling temperature (with --sample; default: the model's generation default, 1.0)")
    parser.add_argument("--num-beams", type=positive_int, default=1, help="beam search with B beams (1: none)")
    parser.add_argument("--stream", action="store_true", help="print the answer token by token as it is made")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: bfloat16 on cuda, float32 on cpu)")


def _error(message: str) -> int:
    print(f"comm-fast generate: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    import torch

    from comm_fast.data.dataset import load_images
    from comm_fast.mllm import COMMForCausalLM

    if args.temperature is not None and not args.sample:
        return _error("--temperature: applies to sampling only; add --sample (greedy decoding has no temperature)")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return _error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        return _error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error(f"--device: {args.device} asked for, but no CUDA device is available here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        model = COMMForCausalLM.from_pretrained(args.model, dtype=dtype)
        images = load_images([args.image]) if args.image else None
    except (FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    model = model.to(device).eval()
    extra = {"temperature": args.temperature} if args.temperature is not None else {}
    if args.num_beams > 1:
        extra["num_beams"] = args.num_beams
    if args.stream:
        from transformers import TextStreamer

        extra["streamer"] = TextStreamer(model.processor)
    answer = model.generate(images=images, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                            do_sample=args.sample, **extra)
    if not args.stream:  # the streamer printed it already
        print(answer)
    return 0
