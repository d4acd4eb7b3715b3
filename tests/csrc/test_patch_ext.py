"""The csrc extension's functions (comm_fast._C) against F.interpolate / adaptive_avg_pool2d and the
transformers PIL image processors; its table cache; the sm_90 compile check of every .cu file; CUDA
vs CPU, CUDA-graph capture and sync-free first calls on a GPU.

The kernels take the normalisation constants as arguments: these tests pass transformers' own
published values (OPENAI_CLIP_*, IMAGENET_DEFAULT_*), never comm_fast's."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comm_fast import _ext
from comm_fast.ops import patch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_C, _WHY = _ext.load()
needs_ext = pytest.mark.skipif(_C is None, reason=f"extension not built: {_WHY}")

GRIDS = [((37, 37), (24, 24)), ((24, 24), (37, 37)), ((16, 16), (24, 24)), ((9, 13), (6, 5)),
         ((1, 1), (1, 1)), ((1, 1), (3, 2)), ((5, 7), (1, 1))]


def ref_resample(t, src, dst, mode, scale_factor=None, antialias=False):
    """F.interpolate on the NCHW view in fp32 (what the kernels must reproduce)."""
    b, _, c = t.shape
    x = t.float().reshape(b, *src, c).permute(0, 3, 1, 2)
    if mode == "area":
        y = F.adaptive_avg_pool2d(x, dst)
    elif scale_factor is not None:
        y = F.interpolate(x, scale_factor=scale_factor, mode=mode, align_corners=False)
    else:
        y = F.interpolate(x, size=dst, mode=mode, align_corners=False, antialias=antialias)
    return y.permute(0, 2, 3, 1).reshape(b, -1, c)


def tol(dtype):
    return {torch.float32: 2e-5, torch.float64: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


# every grid x mode x dtype, for the CPU kernel here and the CUDA kernel below
RESAMPLE_CASES = [(src, dst, mode, dtype) for dtype in (torch.float32, torch.bfloat16)
                  for mode in ("bilinear", "bicubic", "area", "bicubic_aa") for src, dst in GRIDS]


@needs_ext
@pytest.mark.parametrize("src,dst,mode,dtype", RESAMPLE_CASES)
def test_resample_matches_interpolate(seed, src, dst, mode, dtype):
    t = torch.randn(3, src[0] * src[1], 40).to(dtype)
    got = _C.resample_tokens(t, *src, *dst, mode)
    ref_mode = "bicubic" if mode == "bicubic_aa" else mode
    want = ref_resample(t, src, dst, ref_mode, antialias=mode == "bicubic_aa")
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.to(dtype).float(), atol=tol(dtype), rtol=tol(dtype))


@needs_ext
@pytest.mark.parametrize("src,dst", [((37, 37), (24, 24)), ((16, 16), (24, 24)), ((9, 13), (6, 5))])
def test_resample_scale_factor_path(seed, src, dst):
    t = torch.randn(2, src[0] * src[1], 16)
    sf = ((dst[0] + 0.1) / src[0], (dst[1] + 0.1) / src[1])
    got = _C.resample_tokens(t, *src, *dst, "bicubic", None, *sf)
    torch.testing.assert_close(got, ref_resample(t, src, dst, "bicubic", scale_factor=sf), atol=2e-5, rtol=2e-5)


@needs_ext
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area"])
def test_resample_into_channel_slot(seed, mode):
    """out= a channel slice of a NaN-poisoned [B, N, 2C] buffer: the slot is written, nothing else."""
    b, c, src, dst = 2, 24, (9, 13), (6, 5)
    t = torch.randn(b, src[0] * src[1], c)
    buf = torch.full((b, dst[0] * dst[1], 2 * c + 3), float("nan"))
    slot = buf[..., c:2 * c]
    ret = _C.resample_tokens(t, *src, *dst, mode, slot)
    assert ret.data_ptr() == slot.data_ptr()
    torch.testing.assert_close(slot, ref_resample(t, src, dst, mode), atol=2e-5, rtol=2e-5)
    assert torch.isnan(buf[..., :c]).all() and torch.isnan(buf[..., 2 * c:]).all()


@needs_ext
def test_resample_strided_input(seed):
    """Tokens that are themselves a channel slice (non-contiguous batch/token strides)."""
    big = torch.randn(2, 37 * 37, 64)
    t = big[..., 16:48]
    got = _C.resample_tokens(t, 37, 37, 24, 24, "bilinear")
    torch.testing.assert_close(got, ref_resample(t.contiguous(), (37, 37), (24, 24), "bilinear"), atol=2e-5, rtol=2e-5)


@needs_ext
@pytest.mark.parametrize("mode", ["hf", "dinov2_offset", "antialias"])
@pytest.mark.parametrize("src,dst", [((37, 37), (24, 24)), ((24, 24), (37, 37)), ((16, 16), (24, 24)),
                                     ((9, 13), (6, 5)), ((1, 1), (2, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_pos_embed_matches_torch_path(seed, mode, src, dst, dtype, prefix):
    pos = torch.randn(1, prefix + src[0] * src[1], 32).to(dtype)
    got = _C.interpolate_pos_embed(pos, *src, *dst, mode, prefix)
    want = patch.interpolate_pos_embed(pos, src, dst, mode=mode, num_prefix_tokens=prefix, backend="torch")
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got[:, :prefix], pos[:, :prefix])
    torch.testing.assert_close(got.float(), want.float(), atol=tol(dtype), rtol=tol(dtype))
    got2 = _C.interpolate_pos_embed(pos[0], *src, *dst, mode, prefix)  # [P + H*W, D] layout
    assert got2.shape == want.shape[1:] and torch.equal(got2, got[0])


@needs_ext
def test_dinov2_offset_differs_from_size_based():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    a = _C.interpolate_pos_embed(pos, 37, 37, 24, 24, "dinov2_offset", 1)
    b = _C.interpolate_pos_embed(pos, 37, 37, 24, 24, "hf", 1)
    assert (a - b).abs().max() > 1e-2


@needs_ext
@pytest.mark.parametrize("call", [
    lambda: _C.resample_tokens(torch.randn(1, 10, 4), 3, 3, 2, 2, "bilinear"),
    lambda: _C.resample_tokens(torch.randn(1, 9, 4), 3, 3, 0, 2, "bilinear"),
    lambda: _C.resample_tokens(torch.randn(1, 9, 4), 3, 3, 2, 2, "nearest"),
    lambda: _C.resample_tokens(torch.randn(1, 9, 4), 3, 3, 2, 2, "bilinear", torch.empty(1, 5, 4)),
    lambda: _C.resample_tokens(torch.randn(1, 9, 4), 3, 3, 2, 2, "bilinear", torch.empty(1, 4, 4).double()),
    lambda: _C.resample_tokens(torch.randn(1, 9, 4), 3, 3, 2, 2, "bilinear", torch.empty(1, 4, 8)[..., ::2]),
    lambda: _C.resample_tokens(torch.randn(1, 9, 4), 3, 3, 2, 2, "bilinear", torch.empty(1, 1, 4).expand(1, 4, 4)),
    lambda: _C.resample_tokens(torch.randint(0, 9, (1, 9, 4)), 3, 3, 2, 2, "bilinear"),
    lambda: _C.interpolate_pos_embed(torch.randn(1, 10, 4), 3, 3, 2, 2, "hf", 2),
    lambda: _C.interpolate_pos_embed(torch.randn(1, 10, 4), 3, 3, 2, 2, "cubic", 1),
    lambda: _C.joint_preprocess([], 8, 8, torch.float32, [0] * 3, [1] * 3, [0] * 3, [1] * 3),
    lambda: _C.joint_preprocess([torch.zeros(4, 4, 3)], 8, 8, torch.float32, [0] * 3, [1] * 3, [0] * 3, [1] * 3),
    lambda: _C.joint_preprocess([torch.zeros(4, 4, 2, dtype=torch.uint8)], 8, 8, torch.float32, [0] * 3, [1] * 3,
                                [0] * 3, [1] * 3),
    lambda: _C.joint_preprocess([torch.zeros(0, 4, 3, dtype=torch.uint8)], 8, 8, torch.float32, [0] * 3, [1] * 3,
                                [0] * 3, [1] * 3),
    lambda: _C.joint_preprocess([torch.zeros(4, 4, 3, dtype=torch.uint8)], 0, 8, torch.float32, [0] * 3, [1] * 3,
                                [0] * 3, [1] * 3),
    lambda: _C.joint_preprocess([torch.zeros(4, 6, 3, dtype=torch.uint8)], 8, 8, torch.float32, [0] * 3, [1] * 3,
                                [0] * 3, [1] * 3, [1, 2], [1, 2, 3]),
    lambda: _C.joint_preprocess([torch.zeros(4, 6, 3, dtype=torch.uint8)], 8, 8, torch.float32, [0] * 3, [1] * 3,
                                [0] * 3, [1] * 3, [1, 2, 3], []),
    lambda: _C.joint_preprocess([torch.zeros(4, 6, 3, dtype=torch.uint8)], 8, 8, torch.float32, [0] * 3, [1] * 3,
                                [0] * 3, [1] * 3, [1, 2, 256], [1, 2, 3]),
])
def test_extension_rejects_bad_arguments(call):
    with pytest.raises((RuntimeError, ValueError)):
        call()


# ---- joint_preprocess against the transformers PIL processors ----

MIXED_SIZES = [(480, 640), (640, 480), (333, 500), (1000, 337), (100, 77), (336, 336), (337, 1000), (7, 9)]


def published():
    """(clip_mean, clip_std, dino_mean, dino_std) as transformers defines them."""
    iu = pytest.importorskip("transformers.image_utils")
    return iu.OPENAI_CLIP_MEAN, iu.OPENAI_CLIP_STD, iu.IMAGENET_DEFAULT_MEAN, iu.IMAGENET_DEFAULT_STD


def processors(size):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_normalize=False)
    return transformers.CLIPImageProcessorPil(**kw), transformers.BitImageProcessorPil(**kw)


def unnormalise(x, mean, std):
    return x.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def assert_close_to_pil(ours, theirs, exact=False):
    d = (ours - theirs).abs()
    within = (d <= 2 / 255 + 1e-6).float().mean().item()
    assert within >= 0.999, f"only {within:.5f} of values within 2/255 (max |diff| {d.max().item() * 255:.1f}/255)"
    if exact:  # the C++/CUDA resize is Pillow's own arithmetic
        assert d.max().item() < 1e-5, f"max |diff| {d.max().item() * 255:.2f}/255"


@needs_ext
@pytest.mark.parametrize("size", [336, 224])
def test_joint_preprocess_matches_processors(seed, size):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in MIXED_SIZES]
    clip_proc, dino_proc = processors(size)
    clip_ref = torch.from_numpy(np.stack(clip_proc(images, return_tensors="np")["pixel_values"]))
    dino_ref = torch.from_numpy(np.stack(dino_proc(images, return_tensors="np")["pixel_values"]))
    cm, cs, dm, ds = published()
    clip, dino = _C.joint_preprocess([torch.from_numpy(im) for im in images], size, size, torch.float32, cm, cs, dm, ds)
    assert clip.shape == dino.shape == (len(images), 3, size, size) and clip.dtype == torch.float32
    assert_close_to_pil(unnormalise(clip, cm, cs), clip_ref, exact=True)
    assert_close_to_pil(unnormalise(dino, dm, ds), dino_ref, exact=True)


@needs_ext
@pytest.mark.parametrize("sizes", [(96, 96), (96, 80), (72, 96)])
def test_joint_preprocess_normalised_like_the_processors(seed, sizes):
    """Each output normalised with its own encoder's constants, whether the two share one resize
    (equal sizes) or not: against CLIPImageProcessorPil's defaults and the DINOv2 processor
    (BitImageProcessorPil with ImageNet's constants), do_normalize=True."""
    transformers = pytest.importorskip("transformers")
    cm, cs, dm, ds = published()
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(120, 160), (150, 100), (97, 97)]]
    kw = lambda s: dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_normalize=True)
    clip_proc = transformers.CLIPImageProcessorPil(**kw(sizes[0]))
    dino_proc = transformers.BitImageProcessorPil(**kw(sizes[1]), image_mean=dm, image_std=ds)
    assert tuple(clip_proc.image_mean) == tuple(cm) and tuple(clip_proc.image_std) == tuple(cs)  # its defaults
    clip, dino = _C.joint_preprocess([torch.from_numpy(im) for im in images], *sizes, torch.float32, cm, cs, dm, ds)
    for ours, proc in ((clip, clip_proc), (dino, dino_proc)):
        want = torch.from_numpy(np.stack(proc(images, return_tensors="np")["pixel_values"]))
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@needs_ext
def test_joint_preprocess_layouts_and_sizes_agree(seed):
    """[B,H,W,3] views, [B,3,H,W] views and different clip/dino sizes give the same pixels."""
    imgs = torch.randint(0, 256, (3, 200, 260, 3), dtype=torch.uint8)
    args = (torch.float32, *published())
    a_clip, a_dino = _C.joint_preprocess(list(imgs.unbind(0)), 112, 96, *args)
    chw = imgs.permute(0, 3, 1, 2).contiguous()
    b_clip, b_dino = _C.joint_preprocess([x.permute(1, 2, 0) for x in chw.unbind(0)], 112, 96, *args)
    assert torch.equal(a_clip, b_clip) and torch.equal(a_dino, b_dino)
    c_clip, _ = _C.joint_preprocess(list(imgs.unbind(0)), 112, 112, *args)
    assert torch.equal(a_clip, c_clip)
    assert a_dino.shape == (3, 3, 96, 96)
    bf_clip, _ = _C.joint_preprocess(list(imgs.unbind(0)), 112, 96, torch.bfloat16, *args[1:])
    torch.testing.assert_close(bf_clip.float(), a_clip, atol=2e-2, rtol=1e-2)


# ---- the table cache ----

@needs_ext
def test_table_cache_is_reused_and_keyed():
    """Tables are built once per (kind, sizes, mode, scale factors / constants, device) and reused."""
    _C.table_cache_clear()
    stats = _C.table_cache_stats
    assert stats() == {"builds": 0, "hits": 0, "entries": 0}
    t = torch.randn(2, 9 * 13, 8)
    a = _C.resample_tokens(t, 9, 13, 6, 5, "bilinear")
    assert stats() == {"builds": 1, "hits": 0, "entries": 1}
    assert torch.equal(_C.resample_tokens(t, 9, 13, 6, 5, "bilinear"), a)
    _C.resample_tokens(t.double(), 9, 13, 6, 5, "bilinear", torch.empty(2, 30, 8, dtype=torch.float64))
    assert stats() == {"builds": 1, "hits": 2, "entries": 1}  # dtype and out= do not matter
    for i, call in enumerate([
        lambda: _C.resample_tokens(t, 9, 13, 6, 5, "bicubic"),                  # mode
        lambda: _C.resample_tokens(t, 9, 13, 5, 6, "bilinear"),                 # destination sizes
        lambda: _C.resample_tokens(t.reshape(2, 13, 9, 8).flatten(1, 2), 13, 9, 6, 5, "bilinear"),  # source
        lambda: _C.resample_tokens(t, 9, 13, 6, 5, "bicubic", None, 6.1 / 9, 5.1 / 13),  # scale factors
    ], start=2):
        call()
        assert stats()["builds"] == i, i
        call()
        assert stats()["builds"] == i, f"rebuilt: {i}"
    pos = torch.randn(1, 1 + 9 * 13, 8)
    builds = stats()["builds"]
    _C.interpolate_pos_embed(pos, 9, 13, 6, 5, "hf", 1)  # the bicubic tables above
    _C.interpolate_pos_embed(pos, 9, 13, 6, 5, "dinov2_offset", 1)  # the scale-factor ones above
    assert stats()["builds"] == builds
    _C.interpolate_pos_embed(pos, 9, 13, 6, 5, "antialias", 1)
    assert stats()["builds"] == builds + 1
    # joint_preprocess: one crop plan per (image size, side), one normalisation table per constants
    _C.table_cache_clear()
    consts = [(0.5,) * 3, (0.25,) * 3, (0.4,) * 3, (0.1,) * 3]
    images = [torch.zeros(40, 50, 3, dtype=torch.uint8), torch.zeros(30, 30, 3, dtype=torch.uint8),
              torch.zeros(40, 50, 3, dtype=torch.uint8)]
    _C.joint_preprocess(images, 16, 16, torch.float32, *consts)
    assert stats() == {"builds": 3, "hits": 1, "entries": 3}
    _C.joint_preprocess(images, 16, 12, torch.bfloat16, *consts)
    assert stats()["builds"] == 5  # side 12 for both sizes; side 16 and the constants reused
    _C.joint_preprocess(images[:1], 16, 16, torch.float32, consts[2], consts[3], consts[0], consts[1])
    assert stats()["builds"] == 6  # swapped constants: a table of their own
    clip, dino = _C.joint_preprocess(images[:1], 16, 16, torch.float32, consts[2], consts[3], consts[0], consts[1])
    assert stats()["builds"] == 6
    assert torch.allclose(clip, torch.tensor(-4.0)) and torch.allclose(dino, torch.tensor(-2.0))  # (0 - m) / s


# ---- compile check of the CUDA sources for Hopper (no GPU, no link) ----

def _nvcc():
    found = shutil.which("nvcc")
    for cand in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if not found and os.path.exists(cand):
            found = cand
    return found


CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the sm_90 compile check needs the CUDA toolkit")
@pytest.mark.parametrize("cu", CU_FILES, ids=os.path.basename)
def test_cuda_sources_compile_for_sm90(cu, tmp_path):
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]
    cmd = [_nvcc(), "-arch=sm_90", "-std=c++17", "-O3", *incs, "-DCOMM_FAST_WITH_CUDA=1", "-Xcompiler", "-fPIC",
           "-c", cu, "-o", str(tmp_path / "out.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(os.path.realpath(_nvcc())), "cuobjdump")
    if os.path.exists(cuobjdump):  # the object carries Hopper SASS
        listing = subprocess.run([cuobjdump, "-lelf", str(tmp_path / "out.o")], capture_output=True, text=True)
        assert listing.returncode == 0 and "sm_90" in listing.stdout, listing.stdout + listing.stderr


def test_cuda_host_code_compiles_against_this_torch():
    """csrc/patch_cuda_host.cpp is only built with CUDA torch; check its syntax here with the macro set."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DCOMM_FAST_WITH_CUDA=1", *[f"-I{p}" for p in include_paths()],
           os.path.join(ROOT, "csrc", "patch_cuda_host.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


# ---- CUDA kernels against the CPU ones ----

needs_cuda_ext = pytest.mark.skipif(not _ext.has_cuda(), reason="comm_fast._C built without CUDA")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("src,dst,mode,dtype", RESAMPLE_CASES)
def test_cuda_resample_matches_cpu(seed, src, dst, mode, dtype):
    t = torch.randn(3, src[0] * src[1], 72).to(dtype)
    cpu = _C.resample_tokens(t, *src, *dst, mode)
    buf = torch.full((3, dst[0] * dst[1], 160), float("nan"), device="cuda", dtype=dtype)
    gpu = _C.resample_tokens(t.cuda(), *src, *dst, mode, buf[..., 8:80])
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=tol(dtype), rtol=tol(dtype))
    assert torch.isnan(buf[..., :8]).all() and torch.isnan(buf[..., 80:]).all()


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("mode", ["hf", "dinov2_offset", "antialias"])
def test_cuda_pos_embed_matches_cpu(seed, mode):
    pos = torch.randn(1, 5 + 37 * 37, 64)
    cpu = _C.interpolate_pos_embed(pos, 37, 37, 24, 24, mode, 5)
    gpu = _C.interpolate_pos_embed(pos.cuda(), 37, 37, 24, 24, mode, 5)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("sizes", [(336, 336), (224, 336)])
def test_cuda_joint_preprocess_matches_cpu(seed, sizes):
    rng = np.random.default_rng(seed)
    images = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in MIXED_SIZES]
    args = (torch.float32, *published())
    for fills in ((), ((122, 116, 104), (123, 116, 103))):  # crop, and pad to a square
        cpu = _C.joint_preprocess(images, *sizes, *args, *fills)
        gpu = _C.joint_preprocess([im.cuda() for im in images], *sizes, *args, *fills)
        for a, b in zip(gpu, cpu):
            assert a.is_cuda
            torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=0)
    batch = torch.from_numpy(rng.integers(0, 256, (4, 3, 120, 90), dtype=np.uint8))
    cpu = _C.joint_preprocess([x.permute(1, 2, 0) for x in batch], *sizes, *args)
    gpu = _C.joint_preprocess([x.permute(1, 2, 0) for x in batch.cuda()], *sizes, *args)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=0)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_first_calls_do_not_synchronise(seed):
    """With a cold table cache each op's first call queues its table upload (pinned memory, stream
    ordered): no pageable copy, no synchronisation, which sync-debug mode would turn into an error."""
    _C.table_cache_clear()
    t = torch.randn(4, 37 * 37, 1024, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(1, 1 + 37 * 37, 1024, device="cuda")
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, device="cuda") for h, w in MIXED_SIZES[:3]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = (_C.resample_tokens(t, 37, 37, 24, 24, "bilinear"),
               _C.interpolate_pos_embed(pos, 37, 37, 24, 24, "dinov2_offset", 1),
               *_C.joint_preprocess(images, 336, 224, torch.float32, *published()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert _C.table_cache_stats()["builds"] == 2 + 2 * 3 + 1
    want = (_C.resample_tokens(t.cpu(), 37, 37, 24, 24, "bilinear"),
            _C.interpolate_pos_embed(pos.cpu(), 37, 37, 24, 24, "dinov2_offset", 1),
            *_C.joint_preprocess([im.cpu() for im in images], 336, 224, torch.float32, *published()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda_ext
def test_patch_ops_replay_in_cuda_graph(seed):
    """The public patch ops captured in a CUDA graph: a replay on new inputs equals eager."""
    c = 72
    t = torch.randn(3, 37 * 37, c, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(1, 1 + 37 * 37, c, device="cuda")
    images = torch.randint(0, 256, (4, 120, 90, 3), dtype=torch.uint8, device="cuda")
    buf = torch.full((3, 24 * 24, 2 * c), float("nan"), device="cuda", dtype=torch.bfloat16)

    def run():
        patch.resample_tokens(t, (37, 37), (24, 24), "bilinear", out=buf[..., c:])
        return (patch.resample_tokens(t, (37, 37), (24, 24), "bicubic"),
                patch.resample_tokens(t[..., 1:], (37, 37), (24, 24), "area"),  # unaligned: the scalar path
                patch.interpolate_pos_embed(pos, (37, 37), (24, 24), "dinov2_offset"),
                *patch.joint_preprocess(images, 64, 48))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds and uploads every table
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for x in (t, pos):
        x.copy_(torch.randn_like(x))
    images.copy_(torch.randint_like(images, 0, 256))
    buf.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [x.clone() for x in captured] + [buf.clone()]
    buf.fill_(float("nan"))
    eager = list(run()) + [buf]
    for a, b in zip(replayed, eager):
        assert torch.equal(a, b)
    assert torch.isnan(buf[..., :c]).all() and patch._backend.last_used()["resample_tokens"]["backend"] == "cuda"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
