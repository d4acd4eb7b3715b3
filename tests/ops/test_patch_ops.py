"""comm_fast.ops patch ops: backend dispatch, fallbacks, validation, and the results of every backend."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comm_fast import _backend, _ext, constants, reference
from comm_fast.ops import interpolate_pos_embed, joint_preprocess, patch, resample_tokens

# The published normalisation constants, written out here and never read from the package:
# OpenAI CLIP's (openai/CLIP's _transform) and ImageNet's, which DINOv2 uses.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

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
    for a, b, std in ((clip, clip_t, CLIP_STD), (dino, dino_t, DINO_STD)):
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
    for ours, ref, mean, std in ((clip, clip_ref, CLIP_MEAN, CLIP_STD), (dino, dino_ref, DINO_MEAN, DINO_STD)):
        ours = ours * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        within = ((ours - ref).abs() <= 2 / 255 + 1e-6).float().mean().item()
        assert within >= 0.999, f"{backend}: {within:.5f} of values within 2/255"


# ---- the normalisation constants and the reference preprocessing ----

def test_normalisation_constants_are_the_published_ones():
    assert (constants.CLIP_MEAN, constants.CLIP_STD) == (CLIP_MEAN, CLIP_STD)
    assert (constants.DINO_MEAN, constants.DINO_STD) == (DINO_MEAN, DINO_STD)
    for module in (patch, reference):  # one definition, used by the ops and the reference
        assert (module.CLIP_MEAN, module.CLIP_STD, module.DINO_MEAN, module.DINO_STD) == (
            constants.CLIP_MEAN, constants.CLIP_STD, constants.DINO_MEAN, constants.DINO_STD)


def test_normalisation_constants_match_transformers():
    transformers = pytest.importorskip("transformers")
    iu = transformers.image_utils
    assert constants.CLIP_MEAN == tuple(iu.OPENAI_CLIP_MEAN) and constants.CLIP_STD == tuple(iu.OPENAI_CLIP_STD)
    assert constants.DINO_MEAN == tuple(iu.IMAGENET_DEFAULT_MEAN) and constants.DINO_STD == tuple(iu.IMAGENET_DEFAULT_STD)
    clip = transformers.CLIPImageProcessorPil()  # its defaults are CLIP's
    assert clip.do_normalize and tuple(clip.image_mean) == constants.CLIP_MEAN
    assert tuple(clip.image_std) == constants.CLIP_STD


def _normalising_processors(clip_size, dino_size):
    """CLIP's processor with its defaults; DINOv2's (a Bit processor with ImageNet's constants, as
    facebook/dinov2-* configure it), do_normalize=True; the constants come from transformers."""
    transformers = pytest.importorskip("transformers")
    iu = transformers.image_utils
    kw = lambda s: dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_normalize=True)
    return (transformers.CLIPImageProcessorPil(**kw(clip_size)),
            transformers.BitImageProcessorPil(**kw(dino_size), image_mean=iu.IMAGENET_DEFAULT_MEAN,
                                              image_std=iu.IMAGENET_DEFAULT_STD))


def _within(ours, ref, std, what):
    """At least 99.9% of values within 2/255 before normalisation (the resize's rounding)."""
    d = (ours - ref).abs() * torch.tensor(std).view(-1, 1, 1)
    within = (d <= 2 / 255 + 1e-6).float().mean().item()
    assert within >= 0.999, f"{what}: only {within:.5f} of values within 2/255 (max {d.max().item() * 255:.1f}/255)"


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("sizes", [(64, 64), (64, 48)])
def test_joint_preprocess_normalised_like_the_processors(seed, backend, sizes):
    """The public op against the processors with do_normalize=True: catches constants swapped or
    mistyped in the package, and an output normalised with the other encoder's table."""
    if backend == "auto" and not BUILT:
        pytest.skip("extension not built")
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(90, 120), (130, 70), (64, 64)]]
    clip, dino = joint_preprocess(images, *sizes, backend=backend)
    for ours, proc, std in zip((clip, dino), _normalising_processors(*sizes), (CLIP_STD, DINO_STD)):
        want = torch.from_numpy(np.stack(proc(images, return_tensors="np")["pixel_values"]))
        if backend == "auto":  # the extension's resize is Pillow's arithmetic
            torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        else:
            for i in range(len(images)):
                _within(ours[i], want[i], std, f"image {i}")


def _photo_like(rng, h, w):
    """A smooth uint8 image (upsampled coarse noise plus a little grain): on white noise the one-pass
    float resize of the reference and Pillow's two uint8 passes differ by up to ~8/255 in 0.2% of values."""
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 8))).float()
    x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    return (x + torch.from_numpy(rng.normal(0, 4, (h, w, 3))).float()).round().clamp(0, 255).to(torch.uint8).numpy()


def _expand2square(image: np.ndarray, colour) -> np.ndarray:
    """LLaVA-1.5's expand2square, as its code writes it, on PIL images."""
    from PIL import Image

    pil_img = Image.fromarray(image)
    width, height = pil_img.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), colour)
    result.paste(pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return np.asarray(result)


def _published_colours():
    iu = pytest.importorskip("transformers").image_utils  # LLaVA: tuple(int(x * 255) for x in image_mean)
    return tuple(int(x * 255) for x in iu.OPENAI_CLIP_MEAN), tuple(int(x * 255) for x in iu.IMAGENET_DEFAULT_MEAN)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("sizes", [(64, 64), (64, 48)])
def test_joint_preprocess_pad_matches_expand2square_then_processors(seed, backend, sizes):
    """aspect="pad" against the PIL composition: expand2square with each encoder's mean colour, then
    that encoder's processor (do_normalize=True)."""
    if backend == "auto" and not BUILT:
        pytest.skip("extension not built")
    rng = np.random.default_rng(seed)
    shapes = [(90, 120), (130, 70), (64, 64), (91, 120), (64, 97)]  # even and odd paddings
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    clip, dino = joint_preprocess(images, *sizes, aspect="pad", backend=backend)
    for ours, proc, colour, std in zip((clip, dino), _normalising_processors(*sizes), _published_colours(),
                                       (CLIP_STD, DINO_STD)):
        want = torch.from_numpy(np.stack(proc([_expand2square(im, colour) for im in images],
                                              return_tensors="np")["pixel_values"]))
        if backend == "auto":
            torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        else:
            for i in range(len(images)):
                _within(ours[i], want[i], std, f"image {i}")
    crop, _ = joint_preprocess(images, *sizes, backend=backend)
    assert not torch.equal(crop[0], clip[0]) and torch.equal(crop[2], clip[2])  # square images are not padded


@pytest.mark.parametrize("h, w", [(3, 4), (4, 3), (5, 8), (8, 5), (6, 6)])
def test_pad_offsets_and_colours_exactly_at_scale_one(seed, h, w):
    """Resized to its own padded side, an image comes out as LLaVA's expand2square of it, normalised, to
    float rounding: the odd paddings (1 and 3 rows or columns) pin PIL's rounded-down offset, and the exact
    comparison each encoder's pad colour (CLIP's and DINOv2's differ by one grey level per channel)."""
    iu = pytest.importorskip("transformers").image_utils
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    side = max(h, w)
    stats = ((iu.OPENAI_CLIP_MEAN, iu.OPENAI_CLIP_STD), (iu.IMAGENET_DEFAULT_MEAN, iu.IMAGENET_DEFAULT_STD))
    wants = []
    for (mean, std), colour in zip(stats, _published_colours()):
        square = torch.from_numpy(_expand2square(image, colour).copy()).double().permute(2, 0, 1) / 255
        wants.append((square - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    for backend in ["auto", "torch"] if BUILT else ["torch"]:
        for ours, want in zip(joint_preprocess([image], side, side, aspect="pad", backend=backend), wants):
            torch.testing.assert_close(ours[0].double(), want, atol=1e-5, rtol=0, msg=lambda m: f"{backend}: {m}")
    for (mean, std), want in zip(stats, wants):
        ours = reference.preprocess_image(torch.from_numpy(image), side, mean, std, pad=True)
        torch.testing.assert_close(ours.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("size", [64, 40])
def test_reference_preprocess_image_matches_processors(seed, size, pad):
    """comm_fast.reference.preprocess_image (the torch composition) against both processors (after
    expand2square when padding)."""
    rng = np.random.default_rng(seed)
    images = [_photo_like(rng, h, w) for h, w in [(90, 120), (130, 70), (50, 50)]]
    for proc, (mean, std), colour in zip(_normalising_processors(size, size),
                                         ((reference.CLIP_MEAN, reference.CLIP_STD),
                                          (reference.DINO_MEAN, reference.DINO_STD)), _published_colours()):
        inputs = [_expand2square(im, colour) for im in images] if pad else images
        want = np.stack(proc(inputs, return_tensors="np")["pixel_values"])
        for i, im in enumerate(images):
            ours = reference.preprocess_image(torch.from_numpy(im), size, mean, std, pad=pad)
            assert ours.shape == (3, size, size)
            _within(ours, torch.from_numpy(want[i]), std, f"image {i} {im.shape}")


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
    (lambda: joint_preprocess([np.zeros((8, 8, 3), np.uint8)], aspect="letterbox"), ValueError, "aspect"),
])
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- torch.library registration: torch.compile, opcheck, autograd ----

def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compile_fullgraph_matches_eager(seed, backend):
    if backend == "auto" and not BUILT:
        pytest.skip("extension not built")
    t = torch.randn(2, 9 * 13, 8)
    pos = torch.randn(1, 1 + 9 * 13, 8)
    images = torch.randint(0, 256, (2, 40, 52, 3), dtype=torch.uint8)

    def fn(t, pos, images):
        buf = torch.full((2, 30, 16), float("nan"))
        resample_tokens(t, (9, 13), (6, 5), "bicubic", out=buf[..., 8:], backend=backend)
        clip, dino = joint_preprocess(images, 24, 28, backend=backend)
        return (resample_tokens(t, (9, 13), (6, 5), "bilinear", backend=backend),
                resample_tokens(t, (9, 13), (6, 5), "area", backend=backend), buf,
                interpolate_pos_embed(pos, (9, 13), (6, 5), "dinov2_offset", backend=backend),
                interpolate_pos_embed(pos[0], (9, 13), (6, 5), "antialias", backend=backend), clip, dino)

    want = fn(t, pos, images)
    got = _compiled(fn)(t, pos, images)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isnan(got[2][..., :8]).all()
    expected = "cpp" if backend == "auto" else "torch"
    assert {last(op)["backend"] for op in patch._OPS} == {expected}  # recorded by the compiled run too


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_opcheck_cpu(seed, backend):
    if backend == "cpp" and not BUILT:
        pytest.skip("extension not built")
    ops = torch.ops.comm_fast
    for args in [(torch.randn(2, 9 * 13, 6, requires_grad=True), 9, 13, 6, 5, m) for m in patch.RESAMPLE_MODES]:
        torch.library.opcheck(ops.resample_tokens.default, (*args, backend))
        out = torch.full((2, 30, 12), float("nan"))[..., 3:9]
        torch.library.opcheck(ops.resample_tokens_out.default, (args[0].detach(), *args[1:], out, backend))
    for mode in patch.POS_EMBED_MODES:
        pos = torch.randn(1, 2 + 9 * 13, 6, requires_grad=True)
        torch.library.opcheck(ops.interpolate_pos_embed.default, (pos, 9, 13, 6, 5, mode, 2, backend))
        torch.library.opcheck(ops.interpolate_pos_embed.default, (pos[0].detach(), 9, 13, 6, 5, mode, 2, backend))
    images = list(torch.randint(0, 256, (2, 30, 41, 3), dtype=torch.uint8).unbind(0))
    for aspect in patch.ASPECTS:
        torch.library.opcheck(ops.joint_preprocess.default, (images, True, 16, 20, torch.float32, aspect, backend))


@pytest.mark.parametrize("mode", patch.RESAMPLE_MODES)
@pytest.mark.parametrize("src,dst", [((9, 13), (6, 5)), ((4, 5), (7, 9))])
def test_resample_gradcheck_float64(seed, mode, src, dst):
    """The registered backward (the op's adjoint) against finite differences, exact in float64."""
    t = torch.randn(1, src[0] * src[1], 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: resample_tokens(x, src, dst, mode, backend="torch"), (t,))
    # pos-embed interpolation computes in fp32 whatever the dtype: finite differences with a wide step
    pos = torch.randn(1 + src[0] * src[1], 2, dtype=torch.float64, requires_grad=True)
    pmode = {"bilinear": "hf", "bicubic": "antialias", "area": "dinov2_offset"}[mode]
    torch.autograd.gradcheck(lambda x: interpolate_pos_embed(x, src, dst, pmode, backend="torch"), (pos,),
                             eps=1e-2, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("mode", patch.RESAMPLE_MODES)
def test_resample_grad_matches_interpolate(seed, mode, backend):
    if backend == "auto" and not BUILT:
        pytest.skip("extension not built")
    src, dst = (9, 13), (6, 5)
    t = torch.randn(2, src[0] * src[1], 8, requires_grad=True)
    w = torch.randn(2, dst[0] * dst[1], 8)
    (resample_tokens(t, src, dst, mode, backend=backend) * w).sum().backward()
    x = t.detach().reshape(2, *src, 8).permute(0, 3, 1, 2).requires_grad_()
    y = F.adaptive_avg_pool2d(x, dst) if mode == "area" else F.interpolate(x, size=dst, mode=mode, align_corners=False)
    (y.permute(0, 2, 3, 1).reshape(2, -1, 8) * w).sum().backward()
    torch.testing.assert_close(t.grad, x.grad.permute(0, 2, 3, 1).reshape(2, -1, 8))
    # out= with grad: the slot is written through a differentiable copy, and the buffer carries the graph
    t.grad = None
    buf = torch.zeros(2, dst[0] * dst[1], 16)
    resample_tokens(t, src, dst, mode, out=buf[..., 8:], backend=backend)
    (buf[..., 8:] * w).sum().backward()
    torch.testing.assert_close(t.grad, x.grad.permute(0, 2, 3, 1).reshape(2, -1, 8))


@needs_ext
@pytest.mark.parametrize("mode", patch.POS_EMBED_MODES)
def test_pos_embed_grad_matches_torch_path(seed, mode):
    pos = torch.randn(1, 1 + 9 * 13, 8, requires_grad=True)
    w = torch.randn(1, 1 + 6 * 5, 8)
    (interpolate_pos_embed(pos, (9, 13), (6, 5), mode) * w).sum().backward()
    assert last("interpolate_pos_embed")["backend"] == "cpp"
    ref = pos.detach().clone().requires_grad_()
    p = ref[:, 1:].reshape(1, 9, 13, 8).permute(0, 3, 1, 2)
    if mode == "dinov2_offset":
        g = F.interpolate(p, scale_factor=((6 + 0.1) / 9, (5 + 0.1) / 13), mode="bicubic", align_corners=False)
    else:
        g = F.interpolate(p, size=(6, 5), mode="bicubic", align_corners=False, antialias=mode == "antialias")
    (torch.cat([ref[:, :1], g.permute(0, 2, 3, 1).reshape(1, 30, 8)], 1) * w).sum().backward()
    torch.testing.assert_close(pos.grad, ref.grad)


def test_compile_with_grad_matches_eager(seed):
    t = torch.randn(2, 9 * 13, 8, requires_grad=True)
    pos = torch.randn(1, 1 + 9 * 13, 8, requires_grad=True)

    def fn(t, pos):
        return (resample_tokens(t, (9, 13), (6, 5)).square().sum()
                + interpolate_pos_embed(pos, (9, 13), (6, 5), "dinov2_offset").square().sum())

    fn(t, pos).backward()
    want = (t.grad.clone(), pos.grad.clone())
    t.grad = pos.grad = None
    _compiled(fn)(t, pos).backward()
    torch.testing.assert_close((t.grad, pos.grad), want)
