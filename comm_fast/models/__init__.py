"""Model layer: exact CLIP / DINOv2 encoders (the tower and the MLLM live in comm_fast.tower / comm_fast.mllm)."""
from comm_fast.models.clip import CLIPVisionEncoder
from comm_fast.models.dinov2 import DINOv2Encoder
from comm_fast.models.vit import ViTConfig, ViTEncoder

__all__ = ["CLIPVisionEncoder", "DINOv2Encoder", "ViTConfig", "ViTEncoder"]
