"""Published normalisation constants of the two encoders, defined once for the whole package.

CLIP: OpenAI's preprocessing (openai/CLIP ``_transform``; transformers' OPENAI_CLIP_MEAN / _STD).
DINOv2: ImageNet's (facebookresearch/dinov2 ``make_normalize_transform``; transformers'
IMAGENET_DEFAULT_MEAN / _STD). The ops, the reference and the C++/CUDA kernels (which receive them
as arguments) all read these.
"""
from __future__ import annotations

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)


def pad_colour(mean) -> tuple[int, int, int]:
    """The colour LLaVA-1.5 and Shikra pad images with (expand2square): the mean as uint8, truncated."""
    return tuple(int(m * 255) for m in mean)
