"""Checkpoint formats the encoders read, and the errors for bad checkpoints and bad pixels."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from comm_fast.models import CLIPVisionEncoder, DINOv2Encoder

from hf_models import SMALL, hf_clip, hf_dinov2, hf_dinov2_reg, randomise, rel_err


def _hidden(model, pixels, **kw):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True, **kw).hidden_states


def _assert_parity(ours, hidden_states, pixels, layers=(0, 1, 2, 3)):
    with torch.no_grad():
        out = ours.eval()(pixels, list(layers))
    for k, idx in enumerate(layers):
        assert rel_err(out[k], hidden_states[idx]) <= 1e-5, idx


def test_sharded_safetensors(tmp_path, seed):
    hf = hf_dinov2()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    px = torch.randn(1, 3, 56, 56)
    _assert_parity(DINOv2Encoder.from_pretrained(tmp_path), _hidden(hf, px), px)


def test_pytorch_model_bin(tmp_path, seed):
    hf = hf_clip()
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    px = torch.randn(1, 3, 56, 56)
    _assert_parity(CLIPVisionEncoder.from_pretrained(tmp_path), _hidden(hf, px), px)


def test_vision_half_of_full_clip_model(tmp_path, seed):
    vision = dict(SMALL, intermediate_size=128)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    full = randomise(CLIPModel(CLIPConfig(vision_config=vision, text_config=text)))
    full.save_pretrained(tmp_path)
    px = torch.randn(2, 3, 84, 84)
    ref = _hidden(full.vision_model, px, interpolate_pos_encoding=True)
    _assert_parity(CLIPVisionEncoder.from_pretrained(tmp_path), ref, px)


def _to_torch_hub(hf_sd: dict, chunked: bool = False) -> dict:
    """Hugging Face Dinov2 names to facebookresearch/dinov2's (optionally with block chunks)."""
    out = {}
    for k, v in hf_sd.items():
        k = (k.replace("embeddings.cls_token", "cls_token").replace("embeddings.position_embeddings", "pos_embed")
             .replace("embeddings.register_tokens", "register_tokens").replace("embeddings.mask_token", "mask_token")
             .replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
             .replace("encoder.layer.", "blocks.").replace("attention.output.dense", "attn.proj")
             .replace(".layer_scale1.lambda1", ".ls1.gamma").replace(".layer_scale2.lambda1", ".ls2.gamma")
             .replace("layernorm.", "norm."))
        out[k] = v
    for key in [k for k in out if ".attention.attention.query." in k]:
        parts = [out.pop(key.replace("query", n)) for n in ("query", "key", "value")]
        out[key.replace("attention.attention.query", "attn.qkv")] = torch.cat(parts)
    if chunked:  # dinov2's BlockChunk layout: blocks.<chunk>.<global index>
        out = {(f"blocks.0.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v for k, v in out.items()}
    return out


@pytest.mark.parametrize("chunked", [False, True])
def test_original_dinov2_pth(tmp_path, seed, chunked):
    hf = hf_dinov2()
    hf.save_pretrained(tmp_path / "hf")
    torch.save(_to_torch_hub(load_file(tmp_path / "hf" / "model.safetensors"), chunked), tmp_path / "dinov2.pth")
    ours = DINOv2Encoder.from_pretrained(tmp_path / "dinov2.pth")
    cfg = ours.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.patch_size, cfg.image_size) == (64, 3, 1, 14, 56)
    assert cfg.pos_interp == "dinov2_offset"
    # at the trained resolution no interpolation happens: exact parity with the same weights
    # (the head count is read as hidden // 64; here the HF model has 4 heads, so override it)
    ours = DINOv2Encoder(type(cfg)(**{**cfg.to_dict(), "num_heads": 4}))
    ours.load_state_dict(DINOv2Encoder.from_pretrained(tmp_path / "dinov2.pth").state_dict())
    px = torch.randn(1, 3, 56, 56)
    _assert_parity(ours, _hidden(hf, px), px)
    # elsewhere the original's offset interpolation: scale_factor (g + 0.1) / M drives the mapping
    grid = ours.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(6.1 / 4, 3.1 / 4), mode="bicubic", align_corners=False)
    got = ours.position_embedding((6, 3))[:, 1:].reshape(1, 6, 3, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want)


def test_pos_interp_override(tmp_path, seed):
    hf = hf_dinov2_reg()
    hf.save_pretrained(tmp_path)
    assert DINOv2Encoder.from_pretrained(tmp_path).config.pos_interp == "antialias"
    assert DINOv2Encoder.from_pretrained(tmp_path, pos_interp="hf").config.pos_interp == "hf"
    with pytest.raises(ValueError, match="pos_interp"):
        DINOv2Encoder.from_pretrained(tmp_path, pos_interp="nearest")


# -- bad checkpoints ------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        CLIPVisionEncoder.from_pretrained(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    hf_clip().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        CLIPVisionEncoder.from_pretrained(tmp_path)


def test_corrupt_config(tmp_path):
    hf_clip().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "clip_vision_model", ')
    with pytest.raises(ValueError, match=r"config\.json: corrupt JSON"):
        CLIPVisionEncoder.from_pretrained(tmp_path)


def test_corrupt_safetensors(tmp_path):
    hf_clip().save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # cut off mid-write
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt"):
        CLIPVisionEncoder.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    hf_dinov2().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("encoder.layer.1.norm2.weight")
    sd["encoder.layer.0.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        DINOv2Encoder.from_pretrained(tmp_path)
    assert "blocks.1.norm2.weight" in str(err.value) and "blocks.0.extra.weight" in str(err.value)


def test_wrong_family(tmp_path):
    hf_dinov2().save_pretrained(tmp_path / "dino")
    hf_clip().save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="expected a CLIP checkpoint.*'dinov2'"):
        CLIPVisionEncoder.from_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match="expected a DINOv2 checkpoint.*'clip_vision_model'"):
        DINOv2Encoder.from_pretrained(tmp_path / "clip")


def test_shape_mismatch_is_named(tmp_path):
    hf_clip().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: expected \(96, 64\), got \(128, 64\)"):
        CLIPVisionEncoder.from_pretrained(tmp_path)


# -- bad pixels -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    hf_clip().save_pretrained(path)
    return CLIPVisionEncoder.from_pretrained(path).eval()


@pytest.mark.parametrize("pixels, error, message", [
    (torch.randn(1, 3, 50, 56), ValueError, r"50x56 is not a positive multiple of the patch size 14"),
    (torch.randn(1, 4, 56, 56), ValueError, r"expected shape \[B, 3, H, W\], got \(1, 4, 56, 56\)"),
    (torch.randn(3, 56, 56), ValueError, r"expected shape \[B, 3, H, W\]"),
    (torch.zeros(1, 3, 56, 56, dtype=torch.uint8), TypeError, r"floating-point pixels, got dtype torch.uint8"),
    ([[0.0]], TypeError, r"expected a torch.Tensor"),
])
def test_bad_pixels(encoder, pixels, error, message):
    with pytest.raises(error, match=message):
        encoder(pixels, [1])


@pytest.mark.parametrize("layers, message", [([], "at least one"), ([4], r"0\.\.3"), ([1, 1], "duplicate")])
def test_bad_layers(encoder, layers, message):
    with pytest.raises(ValueError, match=message):
        encoder(torch.randn(1, 3, 56, 56), layers)
