"""comm_fast.ops patch ops: backend dispatch, fallbacks, validation, and the results of every backend."""
import warnings

import numpy as np
import pytest
import torch

from comm_fast import _backend, _ext
from comm_fast.ops import interpolate_pos_embed, joint_preprocess, patch, resample_tokens

BUILT = _ext.load()[0] is not None
needs_ext = pytest.mark.skipif(not BUILT, reason="comm_fast._C is not built")


def last(op):
    return _backend.last_used()[op]


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend the compiled module is missing (and that no warning was issued yet)."""
    monkeypatch.setattr(_ext, "load", lambda: (None, "comm_fast._C is not built (test)"))
    monkeypatch.setattr(_ext, "has_cuda", lambda: False)
    monkeypatch.setattr(_backend, "_warned", set())


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("COMM_FAST_BACKEND", raising=False)


# ---- dispatch ----

@needs_ext
def test_auto_uses_cpp_on_cpu_and_matches_torch(seed):
    t = torch.randn(2, 37 * 37, 16)
    for mode in patch.RESAMPLE_MODES:
        got = resample_tokens(t, (37, 37), (24, 24), mode)
        assert last("resample_tokens")["backend"] == "cpp"
        torch.testing.assert_close(got, resample_tokens(t, (37, 37), (24, 24), mode, backend="torch"),
                                   atol=2e-5, rtol=2e-5)
        assert last("resample_tokens")["backend"] == "torch"
    pos = torch.randn(1, 1 + 37 * 37, 16)
    for mode in patch.POS_EMBED_MODES:
        got = interpolate_pos_embed(pos, (37, 37), (24, 24), mode=mode)
        assert last("interpolate_pos_embed")["backend"] == "cpp"
        torch.testing.assert_close(got, interpolate_pos_embed(pos, (37, 37), (24, 24), mode=mode, backend="torch"),
                                   atol=2e-5, rtol=2e-5)
    images = torch.randint(0, 256, (2, 100, 140, 3), dtype=torch.uint8)
    clip, dino = joint_preprocess(images, 64, 48)
    assert last("joint_preprocess")["backend"] == "cpp"
    clip_t, dino_t = joint_preprocess(images, 64, 48, backend="torch")
    assert "torch composition" in last("joint_preprocess")["reason"]
    for a, b, std in ((clip, clip_t, patch.CLIP_STD), (dino, dino_t, patch.DINO_STD)):
        assert a.shape == b.shape
        d = (a - b).abs() * torch.tensor(std).view(1, 3, 1, 1)  # back to [0, 1] units
        assert (d <= 2 / 255 + 1e-6).float().mean() >= 0.999


@needs_ext
def test_describe_is_truthful():
    table = patch.describe()
    assert set(table) == {"interpolate_pos_embed", "resample_tokens", "joint_preprocess"}
    for entry in table.values():
        assert entry["cpu"]["backend"] == "cpp"
        assert entry["cuda"]["backend"] == ("cuda" if _ext.has_cuda() else "torch")


def test_explicit_backend_is_honoured_or_refused():
    t = torch.randn(1, 9, 4)
    resample_tokens(t, (3, 3), (2, 2), backend="torch")
    assert last("resample_tokens")["backend"] == "torch"
    with pytest.raises(ValueError, match="backend"):
        resample_tokens(t, (3, 3), (2, 2), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        resample_tokens(t, (3, 3), (2, 2), backend="cuda")  # CPU tensor
    with pytest.raises(ValueError, match="backend"):
        resample_tokens(t, (3, 3), (2, 2), backend="bogus")
    with pytest.raises(ValueError, match="backend"):
        joint_preprocess([np.zeros((8, 8, 3), np.uint8)], 4, 4, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        interpolate_pos_embed(torch.randn(10, 4), (3, 3), (2, 2), backend="cuda")


def test_environment_backend_that_does_not_fit_falls_back_to_auto(monkeypatch):
    monkeypatch.setenv("COMM_FAST_BACKEND", "triton")  # meant for the merge ops
    resample_tokens(torch.randn(1, 9, 4), (3, 3), (2, 2))
    entry = last("resample_tokens")
    assert entry["backend"] == ("cpp" if BUILT else "torch") and "COMM_FAST_BACKEND=triton" in entry["reason"]
    monkeypatch.setenv("COMM_FAST_BACKEND", "torch")
    resample_tokens(torch.randn(1, 9, 4), (3, 3), (2, 2))
    assert last("resample_tokens")["backend"] == "torch"
    assert patch.describe()["resample_tokens"]["cpu"]["backend"] == "torch"


def test_missing_extension_falls_back_with_one_warning(no_extension, seed):
    t = torch.randn(1, 16, 4)
    with pytest.warns(RuntimeWarning, match="torch path"):
        resample_tokens(t, (4, 4), (2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resample_tokens(t, (4, 4), (2, 2))  # warned once only
    entry = last("resample_tokens")
    assert entry["backend"] == "torch" and "fallback" in entry["reason"]
    with pytest.warns(RuntimeWarning):
        clip, dino = joint_preprocess([np.zeros((20, 30, 3), np.uint8)], 16, 16)
    assert clip.shape == dino.shape == (1, 3, 16, 16)
    assert "fallback" in last("joint_preprocess")["reason"]
    for entry in patch.describe().values():
        assert entry["cpu"]["backend"] == "torch" and "not built" in entry["cpu"]["reason"]
    with pytest.raises(RuntimeError, match="unavailable"):
        resample_tokens(t, (4, 4), (2, 2), backend="cpp")


# ---- results through the public ops ----

@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area"])
def test_resample_into_poisoned_slot(seed, backend, mode):
    if backend == "auto" and not BUILT:
        pytest.skip("extension not built")
    b, c = 2, 8
    t = torch.randn(b, 9 * 13, c)
    buf = torch.full((b, 30, 2 * c), float("nan"))
    slot = buf[..., c:]
    ret = resample_tokens(t, (9, 13), (6, 5), mode, out=slot, backend=backend)
    assert ret.data_ptr() == slot.data_ptr()
    torch.testing.assert_close(slot, resample_tokens(t, (9, 13), (6, 5), mode, backend="torch"), atol=2e-5, rtol=2e-5)
    assert torch.isnan(buf[..., :c]).all()


def test_pos_embed_unchanged_grid_is_returned_as_is():
    pos = torch.randn(1, 1 + 24 * 24, 8)
    for mode in patch.POS_EMBED_MODES:
        assert interpolate_pos_embed(pos, (24, 24), (24, 24), mode=mode) is pos


@needs_ext
def test_pos_embed_prefix_tokens_and_dtype(seed):
    pos = torch.randn(1 + 4 + 16 * 16, 12, dtype=torch.bfloat16)
    out = interpolate_pos_embed(pos, (16, 16), (24, 24), mode="antialias", num_prefix_tokens=5)
    assert out.shape == (5 + 24 * 24, 12) and out.dtype == torch.bfloat16
    assert torch.equal(out[:5], pos[:5])


MIXED = [(480, 640), (640, 480), (333, 500), (100, 77), (1000, 337)]


def _processor_pixels(images, size):
    transformers = pytest.importorskip("transformers")
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_normalize=False)
    clip = transformers.CLIPImageProcessorPil(**kw)(images, return_tensors="np")["pixel_values"]
    dino = transformers.BitImageProcessorPil(**kw)(images, return_tensors="np")["pixel_values"]
    return torch.from_numpy(np.stack(clip)), torch.from_numpy(np.stack(dino))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_joint_preprocess_matches_processors_at_336(seed, backend):
    if backend == "auto" and not BUILT:
        pytest.skip("extension not built")
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in MIXED]
    clip_ref, dino_ref = _processor_pixels(images, 336)
    clip, dino = joint_preprocess(images, 336, 336, backend=backend)
    for ours, ref, mean, std in ((clip, clip_ref, patch.CLIP_MEAN, patch.CLIP_STD),
                                 (dino, dino_ref, patch.DINO_MEAN, patch.DINO_STD)):
        ours = ours * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        within = ((ours - ref).abs() <= 2 / 255 + 1e-6).float().mean().item()
        assert within >= 0.999, f"{backend}: {within:.5f} of values within 2/255"


@needs_ext
def test_joint_preprocess_input_forms_agree(seed):
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (3, 90, 120, 3), dtype=np.uint8)
    ref = joint_preprocess(list(hwc), 64, 64)
    forms = [hwc, torch.from_numpy(hwc), torch.from_numpy(hwc).permute(0, 3, 1, 2),
             torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous(), [torch.from_numpy(x) for x in hwc],
             [torch.from_numpy(x).permute(2, 0, 1) for x in hwc], tuple(hwc)]
    for form in forms:
        out = joint_preprocess(form, 64, 64)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    readonly = hwc.copy()
    readonly.setflags(write=False)
    assert torch.equal(joint_preprocess(readonly, 64, 64)[0], ref[0])
    clip, dino = joint_preprocess([hwc[0], hwc[1][:50, :70]], 32, 40, dtype=torch.bfloat16)
    assert clip.shape == (2, 3, 32, 32) and dino.shape == (2, 3, 40, 40) and clip.dtype == torch.bfloat16


# ---- bad input ----

@pytest.mark.parametrize("call,exc,match", [
    (lambda: resample_tokens(torch.randn(1, 10, 4), (3, 3), (2, 2)), ValueError, "tokens"),
    (lambda: resample_tokens(torch.randn(1, 9, 4), (3, 3), (0, 2)), ValueError, "dst_hw"),
    (lambda: resample_tokens(torch.randn(1, 9, 4), (3, -3), (2, 2)), ValueError, "src_hw"),
    (lambda: resample_tokens(torch.randn(1, 9, 4), (3, 3), (2, 2), "nearest"), ValueError, "mode"),
    (lambda: resample_tokens(torch.randn(1, 9, 4), (3, 3), "2x2"), ValueError, "dst_hw"),
    (lambda: resample_tokens(torch.ones(1, 9, 4, dtype=torch.int32), (3, 3), (2, 2)), TypeError, "tokens"),
    (lambda: resample_tokens(torch.randn(9, 4), (3, 3), (2, 2)), TypeError, "tokens"),
    (lambda: resample_tokens(torch.randn(1, 9, 4), (3, 3), (2, 2), out=torch.empty(1, 5, 4)), ValueError, "out"),
    (lambda: resample_tokens(torch.randn(1, 9, 4), (3, 3), (2, 2), out=torch.empty(1, 4, 8)[..., ::2]),
     ValueError, "out"),
    (lambda: interpolate_pos_embed(torch.randn(1, 10, 4), (3, 3), (2, 2), num_prefix_tokens=2), ValueError, "pos"),
    (lambda: interpolate_pos_embed(torch.randn(1, 10, 4), (3, 3), (2, 2), mode="cubic"), ValueError, "mode"),
    (lambda: interpolate_pos_embed(torch.randn(1, 10, 4), (3, 3), (0, 2)), ValueError, "dst_hw"),
    (lambda: interpolate_pos_embed(torch.randn(1, 10, 4), (3, 3), (2, 2), num_prefix_tokens=-1), ValueError,
     "num_prefix_tokens"),
    (lambda: interpolate_pos_embed(torch.ones(10, 4, dtype=torch.long), (3, 3), (2, 2)), TypeError, "pos"),
    (lambda: joint_preprocess([np.zeros((8, 8, 3), np.float32)]), TypeError, "uint8"),
    (lambda: joint_preprocess([torch.zeros(8, 8, 3)]), TypeError, "uint8"),
    (lambda: joint_preprocess([np.zeros((8, 8, 3), np.int16)]), TypeError, "uint8"),
    (lambda: joint_preprocess([np.zeros((8, 8, 2), np.uint8)]), ValueError, "3 channels"),
    (lambda: joint_preprocess([np.zeros((8, 8), np.uint8)]), ValueError, "images\\[0\\]"),
    (lambda: joint_preprocess([np.zeros((0, 8, 3), np.uint8)]), ValueError, "empty"),
    (lambda: joint_preprocess([]), ValueError, "images"),
    (lambda: joint_preprocess(np.zeros((2, 8, 8, 2), np.uint8)), ValueError, "images"),
    (lambda: joint_preprocess(np.zeros((0, 8, 8, 3), np.uint8)), ValueError, "images"),
    (lambda: joint_preprocess("cat.png"), TypeError, "images"),
    (lambda: joint_preprocess([np.zeros((8, 8, 3), np.uint8)], clip_size=0), ValueError, "clip_size"),
    (lambda: joint_preprocess([np.zeros((8, 8, 3), np.uint8)], dino_size=-3), ValueError, "dino_size"),
    (lambda: joint_preprocess([np.zeros((8, 8, 3), np.uint8)], dtype=torch.int32), TypeError, "dtype"),
])
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
