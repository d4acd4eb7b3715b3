"""``comm-fast generate --model DIR --image PATH --prompt TEXT``: answer a question about an image."""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a saved COMMForCausalLM directory (e.g. a run's DIR/model)")
    parser.add_argument("--image", help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)


def run(args) -> int:
    import torch

    from comm_fast.data.dataset import load_images
    from comm_fast.mllm import COMMForCausalLM

    try:
        model = COMMForCausalLM.from_pretrained(args.model)
        images = load_images([args.image]) if args.image else None
    except (FileNotFoundError, ValueError) as exc:
        print(f"comm-fast generate: error: {exc}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    model.eval()
    extra = {"temperature": args.temperature} if args.sample else {}
    print(model.generate(images=images, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, **extra))
    return 0
