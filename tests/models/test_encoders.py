"""Our CLIP / DINOv2 encoders against transformers' models, layer by layer, fp32, random weights."""
import pytest
import torch

from comm_fast.models import CLIPVisionEncoder, DINOv2Encoder

from hf_models import hf_clip, hf_dinov2, hf_dinov2_reg, rel_err

# trained resolution (56 -> 4x4 grid), another square one, and a non-square one
RESOLUTIONS = [(56, 56), (84, 84), (42, 70)]


def _parity(ours, theirs, hw, layers, clip=False):
    pixels = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = theirs(pixel_values=pixels, output_hidden_states=True,
                     **({"interpolate_pos_encoding": True} if clip else {})).hidden_states
        out = ours(pixels, layers)
    assert out.shape == (len(layers), *ref[0].shape)
    for k, idx in enumerate(layers):
        err = rel_err(out[k], ref[idx])
        assert err <= 1e-5, f"hidden state {idx} at {hw}: relative error {err:.2e}"


@pytest.mark.parametrize("hw", RESOLUTIONS)
def test_clip_matches_transformers(tmp_path, seed, hw):
    hf = hf_clip()
    hf.save_pretrained(tmp_path)
    ours = CLIPVisionEncoder.from_pretrained(tmp_path).eval()
    _parity(ours, hf, hw, [0, 1, 2, 3], clip=True)


@pytest.mark.parametrize("hw", RESOLUTIONS)
def test_dinov2_matches_transformers(tmp_path, seed, hw):
    hf = hf_dinov2()
    hf.save_pretrained(tmp_path)
    ours = DINOv2Encoder.from_pretrained(tmp_path).eval()
    assert ours.config.pos_interp == "hf"
    _parity(ours, hf, hw, [3, 0, 2])  # any order, embeddings included


@pytest.mark.parametrize("hw", RESOLUTIONS)
def test_dinov2_registers_matches_transformers(tmp_path, seed, hw):
    hf = hf_dinov2_reg()
    hf.save_pretrained(tmp_path)
    ours = DINOv2Encoder.from_pretrained(tmp_path).eval()
    assert ours.config.pos_interp == "antialias" and ours.config.num_register_tokens == 4
    _parity(ours, hf, hw, [1, 2, 3])


def test_dinov2_swiglu_matches_transformers(tmp_path, seed):
    hf = hf_dinov2(use_swiglu_ffn=True)
    hf.save_pretrained(tmp_path)
    ours = DINOv2Encoder.from_pretrained(tmp_path).eval()
    assert ours.config.activation == "swiglu"
    _parity(ours, hf, (70, 42), [1, 3])


def test_forward_stops_at_deepest_requested_block(tmp_path, seed):
    hf_dinov2().save_pretrained(tmp_path)
    ours = DINOv2Encoder.from_pretrained(tmp_path).eval()
    ran = []
    for i, block in enumerate(ours.blocks, start=1):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        ours(torch.randn(1, 3, 56, 56), [2])
    assert ran == [1, 2]


def test_forward_writes_into_preallocated_buffer(tmp_path, seed):
    hf_clip().save_pretrained(tmp_path)
    ours = CLIPVisionEncoder.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 56, 56)
    buf = torch.full((2, 2, 17, 64), float("nan"))
    with torch.no_grad():
        out = ours(pixels, [1, 3], out=buf)
        ref = ours(pixels, [1, 3])
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_position_embedding_cached_per_resolution(tmp_path, seed):
    hf_dinov2().save_pretrained(tmp_path)
    ours = DINOv2Encoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = ours.position_embedding((6, 6))
        b = ours.position_embedding((6, 6))
        c = ours.position_embedding((3, 5))
        assert a is b and c.shape == (1, 16, 64)
        ours.pos_embed.mul_(2)  # a weight update invalidates the cache
        d = ours.position_embedding((6, 6))
    assert d is not a
    torch.testing.assert_close(d, 2 * a)


def _mae_2d_sincos(dim, grid):
    """MAE's get_2d_sincos_pos_embed (models_mae / util/pos_embed.py), numpy, without the CLS row."""
    import numpy as np

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


@pytest.mark.parametrize("cls", [CLIPVisionEncoder, DINOv2Encoder])
def test_random_init_position_embedding_is_maes_sincos_and_tells_patches_apart(cls, seed):
    """A random-initialised encoder knows where its patches are: on a uniform image its patch tokens differ."""
    from comm_fast.models import ViTConfig

    family = "clip" if cls is CLIPVisionEncoder else "dinov2"
    enc = cls(ViTConfig(family=family, hidden_size=32, num_layers=2, num_heads=2, mlp_hidden=64, patch_size=14,
                        image_size=56, layer_norm_eps=1e-6, layerscale=family == "dinov2")).eval()
    pos = enc.pos_embed.detach()[0]
    assert torch.equal(pos[0], torch.zeros(32))  # CLS
    torch.testing.assert_close(pos[1:].double(), torch.from_numpy(_mae_2d_sincos(32, 4)), atol=1e-6, rtol=0)
    with torch.no_grad():
        tokens = enc(torch.full((1, 3, 56, 56), 0.3), [2])[0, 0, 1:]
    assert torch.cdist(tokens, tokens).add(torch.eye(16) * 1e9).min() > 1e-2
