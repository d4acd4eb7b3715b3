"""Data: tokenizers, the Vicuna-v1 conversation template, LLaVA JSON datasets, packing, synthetic data."""
from comm_fast.data.boxes import format_box, parse_boxes
from comm_fast.data.conversation import tokenize_conversation
from comm_fast.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "load_tokenizer", "format_box", "parse_boxes", "tokenize_conversation"]
