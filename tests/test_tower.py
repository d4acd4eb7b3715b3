"""COMMVisionTower against the reference composition on transformers' models; save/load round trip."""
import weakref

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from comm_fast import COMMVisionConfig, COMMVisionTower
from comm_fast.reference import COMMReference

from hf_models import hf_clip, hf_dinov2, hf_dinov2_reg, randomise, rel_err

BASE = dict(clip_layers=(1, 2, 3), dino_layers=(2, 3), out_dim=48, clip_image_size=56, dino_image_size=56)


def _build(tmp_path, dino=hf_dinov2, **overrides):
    clip_hf, dino_hf = hf_clip(), dino()
    clip_hf.save_pretrained(tmp_path / "clip")
    dino_hf.save_pretrained(tmp_path / "dino")
    tower = COMMVisionTower.from_pretrained(tmp_path / "clip", tmp_path / "dino", **{**BASE, **overrides})
    for name in tower.HEADS:  # random heads, LayerNorms and α included
        randomise(getattr(tower, name), std=0.2)
    ref = COMMReference(tower.config, clip_hf, dino_hf).load_merge_weights(tower)
    return tower.eval(), ref.eval()


@pytest.mark.parametrize("overrides", [
    {},
    {"combine": "add", "layer_weights": "softmax"},
    {"per_layer_linear": False, "mlp_activation": "quick_gelu"},
    {"dino_layers": (0, 3), "clip_layers": (3, 1)},
])
@pytest.mark.parametrize("grad", [False, True], ids=["streaming", "buffered"])
def test_tower_matches_reference(tmp_path, seed, overrides, grad):
    tower, ref = _build(tmp_path, **overrides)
    clip_px, dino_px = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    with torch.set_grad_enabled(grad):
        out = tower(clip_px, dino_px)
        expected = ref(clip_px, dino_px)
    assert out.shape == (2, 16, 48)
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("dino", [hf_dinov2, hf_dinov2_reg])  # with registers: CLS + 4 registers dropped
@pytest.mark.parametrize("grad", [False, True], ids=["streaming", "buffered"])
def test_tower_resamples_dino_grid_onto_clip_grid(tmp_path, seed, dino, grad):
    tower, ref = _build(tmp_path, dino=dino, dino_image_size=70, grid_resample="bicubic")
    clip_px, dino_px = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 70, 70)  # 4x4 vs 5x5 grids
    with torch.set_grad_enabled(grad):
        assert rel_err(tower(clip_px, dino_px), ref(clip_px, dino_px)) <= 1e-5


def test_fresh_merge_heads_start_as_documented(tmp_path):
    """docs/architecture.md: α and β start at 1/L, the merge LayerNorms as identity."""
    clip_hf, dino_hf = hf_clip(), hf_dinov2()
    clip_hf.save_pretrained(tmp_path / "clip")
    dino_hf.save_pretrained(tmp_path / "dino")
    tower = COMMVisionTower.from_pretrained(tmp_path / "clip", tmp_path / "dino", **BASE)
    for head, layers in ((tower.clip_merge, BASE["clip_layers"]), (tower.dino_merge, BASE["dino_layers"])):
        assert torch.equal(head.alpha, torch.full((len(layers),), 1 / len(layers)))
        assert torch.equal(head.ln_weight, torch.ones_like(head.ln_weight))
        assert torch.equal(head.ln_bias, torch.zeros_like(head.ln_bias))


def test_tower_backward_matches_reference(tmp_path, seed):
    # float64: each α grad is one long cancelling dot product, so in fp32 a relative check of a
    # two-entry vector fails about once in a thousand seeds (fp32 accuracy is the kernel tests' job)
    tower, ref = (m.double() for m in _build(tmp_path))
    for p in (*tower.clip.parameters(), *tower.dino.parameters(), *ref.clip_model.parameters(),
              *ref.dino_model.parameters()):
        p.requires_grad_(False)  # encoders frozen, as in both training stages
    clip_px, dino_px = (torch.randn(2, 3, 56, 56, dtype=torch.float64) for _ in range(2))
    g = torch.randn(2, 16, 48, dtype=torch.float64)
    (tower(clip_px, dino_px) * g).sum().backward()
    (ref(clip_px, dino_px) * g).sum().backward()
    pairs = [(tower.clip_merge.alpha, ref.alpha), (tower.dino_merge.alpha, ref.beta),
             (tower.projector.weight, ref.projector.weight), (tower.dino_mlp.fc1.weight, ref.dino_mlp[0].weight)]
    pairs += [(tower.clip_merge.weight.grad[i], lln.linear.weight) for i, lln in enumerate(ref.clip_lln)]
    pairs += [(tower.dino_merge.ln_weight.grad[i], lln.norm.weight) for i, lln in enumerate(ref.dino_lln)]
    for ours, theirs in pairs:
        ours = ours.grad if isinstance(ours, torch.nn.Parameter) else ours
        assert ours.dtype == torch.float64 and rel_err(ours, theirs.grad) <= 1e-10


@pytest.mark.parametrize("grad", [False, True], ids=["streaming", "buffered"])
def test_tower_under_bf16_autocast(tmp_path, seed, grad):
    """Training on a GPU runs under bf16 autocast: the tower computes in bf16 like the reference does
    there (every Linear in bf16), and its fp32 heads get fp32 grads."""
    tower, ref = _build(tmp_path)
    clip_px, dino_px = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    seen = []
    tower.clip_merge.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = tower(clip_px, dino_px), ref(clip_px, dino_px)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert seen == ([] if not grad else [torch.bfloat16])  # buffered: the hidden states are stored in bf16
    assert rel_err(out.float(), expected.float()) <= 2e-2  # a few bf16 ulps
    if grad:
        out.float().sum().backward()
        assert tower.projector.weight.grad.dtype == torch.float32
        assert torch.isfinite(tower.clip_merge.weight.grad).all() and tower.dino_mlp.fc1.weight.grad.abs().sum() > 0


def test_state_dict_names_follow_the_contract(tmp_path, seed):
    tower, _ = _build(tmp_path)
    keys = set(tower.state_dict())
    for prefix in ("clip_merge", "dino_merge"):
        assert {f"{prefix}.{n}" for n in ("ln_weight", "ln_bias", "weight", "bias", "alpha")} <= keys
    assert tower.clip_merge.weight.shape == (3, 64, 64) and tower.dino_merge.alpha.shape == (2,)
    assert {"dino_mlp.fc1.weight", "dino_mlp.fc1.bias", "dino_mlp.fc2.weight", "dino_mlp.fc2.bias",
            "projector.weight", "projector.bias"} <= keys
    assert all(k.startswith(("clip.", "dino.", "clip_merge.", "dino_merge.", "dino_mlp.", "projector."))
               for k in keys)


def test_save_pretrained_round_trip(tmp_path, seed):
    tower, _ = _build(tmp_path, layer_weights="softmax")
    tower.save_pretrained(tmp_path / "tower")
    tower.save_pretrained(tmp_path / "tower")  # overwriting an existing save works too
    loaded = COMMVisionTower.from_pretrained(tmp_path / "tower").eval()
    assert loaded.config == tower.config
    for k, v in tower.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    px = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(px, px), tower(px, px), rtol=0, atol=0)


def test_saved_tower_accepts_hugging_face_encoder_keys(tmp_path, seed):
    tower, ref = _build(tmp_path)
    sd = {k: v for k, v in tower.state_dict().items() if not k.startswith(("clip.", "dino."))}
    sd.update({"clip." + k: v for k, v in ref.clip_model.state_dict().items()})
    sd.update({"dino." + k: v for k, v in ref.dino_model.state_dict().items()})
    sd = {k: v for k, v in sd.items() if "position_ids" not in k}
    converted = COMMVisionTower.convert_state_dict(sd)
    for k, v in tower.state_dict().items():
        assert torch.equal(converted[k], v), k


def test_config_round_trip_and_validation():
    cfg = COMMVisionConfig(clip_layers=[1, 5], out_dim=32)
    assert COMMVisionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="combine"):
        COMMVisionConfig(combine="stack")
    with pytest.raises(ValueError, match="clip_layers"):
        COMMVisionConfig(clip_layers=[1, 1])
    with pytest.raises(ValueError, match="unknown COMMVisionConfig fields"):
        COMMVisionConfig.from_dict({}, clip_layer=(1,))
    with pytest.raises(ValueError, match="config.clip"):
        COMMVisionTower(COMMVisionConfig())


def test_bad_tower_inputs(tmp_path, seed):
    tower, _ = _build(tmp_path)
    with pytest.raises(ValueError, match="dino_pixels: batch 1 differs from clip_pixels' 2"):
        tower(torch.randn(2, 3, 56, 56), torch.randn(1, 3, 56, 56))
    with pytest.raises(TypeError, match="dino_pixels: expected normalised floating-point pixels, got dtype torch.uint8"):
        tower(torch.randn(2, 3, 56, 56), torch.zeros(2, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(TypeError, match="clip_pixels: expected a torch.Tensor"):
        tower([[0.0]], torch.randn(2, 3, 56, 56))
    with pytest.raises(ValueError, match="clip_pixels: image size 50x56 is not a positive multiple of the patch size"):
        tower(torch.randn(2, 3, 50, 56), torch.randn(2, 3, 56, 56))
    with pytest.raises(ValueError, match="clip_path: expected a CLIP checkpoint"):  # the two swapped
        COMMVisionTower.from_pretrained(tmp_path / "dino", tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="dino_path: no such checkpoint"):
        COMMVisionTower.from_pretrained(tmp_path / "clip", tmp_path / "missing")
    with pytest.raises(ValueError, match="not a saved COMMVisionTower"):
        COMMVisionTower.from_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="dino_layers: index 7 past the encoder's 3 blocks"):
        COMMVisionTower.from_pretrained(tmp_path / "clip", tmp_path / "dino", **{**BASE, "dino_layers": (7,)})
    with pytest.raises(ValueError, match="clip_layers: index 4 past the encoder's 3 blocks"):  # 0..3 exist
        COMMVisionTower.from_pretrained(tmp_path / "clip", tmp_path / "dino", **{**BASE, "clip_layers": (1, 4)})


def test_streaming_inference_memory_does_not_grow_with_merged_layers(tmp_path, seed):
    """Under no_grad at most one hidden state per encoder is alive: merging 6 layers costs no more
    peak memory than merging 2, while the buffered (autograd) path holds all of them."""
    from comm_fast.bench import peak_memory_mb

    clip_hf, dino_hf = hf_clip(num_hidden_layers=6), hf_dinov2(num_hidden_layers=6)
    clip_hf.save_pretrained(tmp_path / "clip")
    dino_hf.save_pretrained(tmp_path / "dino")
    px = torch.randn(32, 3, 112, 112)  # 65 tokens x 64 channels x 32 images = 532 kB per hidden state
    one_state_mb = 32 * 65 * 64 * 4 / 2**20

    def peak(layers, grad):
        tower = COMMVisionTower.from_pretrained(tmp_path / "clip", tmp_path / "dino", clip_layers=layers,
                                                dino_layers=layers, out_dim=32, clip_image_size=112,
                                                dino_image_size=112).eval()
        with torch.set_grad_enabled(grad):
            tower(px, px)  # warm the position-embedding cache
            # the heap also serves the interpreter and the thread pool: noise only adds, so the least of three
            return min(peak_memory_mb(lambda: tower(px, px), torch.device("cpu")) for _ in range(3))

    streaming_growth = peak((1, 2, 3, 4, 5, 6), False) - peak((5, 6), False)
    buffered_growth = peak((1, 2, 3, 4, 5, 6), True) - peak((5, 6), True)
    assert streaming_growth < 0.5 * one_state_mb, streaming_growth
    assert buffered_growth > 3.5 * one_state_mb, buffered_growth  # the measurement sees hidden states


def test_inference_merge_variants(tmp_path, seed):
    """inference_merge picks the no-grad variant ("auto" streams); both match the reference and the tower
    records which ran (comm_fast.info()["tower"])."""
    from comm_fast import _backend, info

    tower, ref = _build(tmp_path)
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = ref(px, px)
        for variant in ("auto", "stream", "buffered"):
            tower.inference_merge = variant
            assert rel_err(tower(px, px), expected) <= 1e-5
            assert _backend.last_used()["tower"]["backend"] == ("stream" if variant == "auto" else variant)
        assert info()["tower"]["last_used"] == {"backend": "buffered", "reason": "requested (inference_merge)"}
        tower.inference_merge = "fused"
        with pytest.raises(ValueError, match="inference_merge: expected one of .*'auto', 'stream', 'buffered'.* got 'fused'"):
            tower(px, px)


def test_streaming_merge_accumulates_in_the_gemm(tmp_path, seed):
    """Under no_grad each merged layer's term goes into the merge output by the GEMM itself (addmm_ into
    it, beta = 1): no add pass over a tensor of the merge output's size, one GEMM per merged layer."""
    from comm_fast import _backend

    tower, _ = _build(tmp_path)
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        tower(px, px)
    merge_out = ([2 * 16, 64], [2, 16, 64])  # 2 images x 16 patch tokens x 64 channels (both encoders)
    calls = [e.name for e in prof.events() if e.input_shapes and e.input_shapes[0] in merge_out]
    assert calls.count("aten::addmm_") == len(BASE["clip_layers"]) + len(BASE["dino_layers"])
    assert "aten::add_" not in calls and "aten::add" not in calls, calls
    assert _backend.last_used()["tower"] == {"backend": "stream", "reason": tower.inference_variant()[1]}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages allocated by ops inside the mode that are still referenced by a tensor,
    sampled after every op: live bytes counted from the tensors, whatever the allocator keeps."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, dict]] = {}  # storage address -> (bytes, {id: weakref of a tensor on it})
        self.peak = 0

    def _forget(self, ptr, key):
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1].pop(key, None)
            if not entry[1]:
                del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.live and ptr in inputs:
                continue  # a view or in-place result of a tensor from outside (a parameter, the input)
            refs = self.live.setdefault(ptr, (t.untyped_storage().nbytes(), {}))[1]
            refs[id(t)] = weakref.ref(t, lambda _, ptr=ptr, key=id(t): self._forget(ptr, key))
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return out


def test_inference_memory_is_independent_of_the_merged_depth(tmp_path, seed):
    """No-grad inference holds two hidden states per encoder (the ping-pong buffers) and one merge output,
    however many blocks run and are merged: merging blocks 1..6 of a 6-block pair keeps no more tensors
    alive than merging 1..2 of a 2-block pair. The autograd (buffered) path does hold them all."""
    px = torch.randn(4, 3, 56, 56)
    state = 4 * 17 * 64 * 4  # one hidden state: 4 images x 17 tokens x 64 channels, fp32

    def peak(depth, grad):
        clip_hf, dino_hf = hf_clip(num_hidden_layers=depth), hf_dinov2(num_hidden_layers=depth)
        clip_hf.save_pretrained(tmp_path / f"clip{depth}")
        dino_hf.save_pretrained(tmp_path / f"dino{depth}")
        layers = tuple(range(1, depth + 1))
        tower = COMMVisionTower.from_pretrained(tmp_path / f"clip{depth}", tmp_path / f"dino{depth}", out_dim=32,
                                                clip_layers=layers, dino_layers=layers, clip_image_size=56,
                                                dino_image_size=56).eval()
        for p in tower.parameters():
            p.requires_grad_(not grad or p in set(tower.clip_merge.parameters()))
        with torch.set_grad_enabled(grad), LiveBytes() as mode:
            tower(px, px)
        return mode.peak

    streaming = peak(6, False) - peak(2, False)
    assert abs(streaming) < 0.5 * state, (streaming, state)
    assert peak(6, True) - peak(2, True) > 3.5 * state  # the count sees hidden states kept alive


def test_peak_rss_sees_what_a_call_touches():
    """The bench's peak-RSS measure (VmHWM after a clear_refs reset) counts pages a call touches, even
    when freed before it returns, and not what the process held before."""
    from comm_fast.bench import peak_rss_mb

    held = torch.ones(32 * 2**20 // 4)  # 32 MB resident before the reset: not counted
    quiet = peak_rss_mb(lambda: None)
    touched = peak_rss_mb(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MB, freed inside
    del held
    assert quiet["extra_peak_rss_mb"] < 8, quiet
    assert 60 < touched["extra_peak_rss_mb"] < 100, touched


@pytest.mark.parametrize("dino", [hf_dinov2, hf_dinov2_reg])
def test_reference_from_tower_rebuilds_the_transformers_models(tmp_path, seed, dino):
    tower, ref = _build(tmp_path, dino=dino)
    twin = COMMReference.from_tower(tower).eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(twin(px, px), ref(px, px), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_tower_compiles_fullgraph(tmp_path, seed, grad):
    """torch.compile(fullgraph=True) traces the whole tower, ops included, with no graph break
    (aot_eager on CPU; tests/kernels and -m gpu cover inductor on a GPU)."""
    tower, _ = _build(tmp_path, dino_image_size=70)  # grids differ: pos-embed interpolation and resampling
    for p in (*tower.clip.parameters(), *tower.dino.parameters()):
        p.requires_grad_(False)
    compiled = torch.compile(tower, fullgraph=True, backend="aot_eager")
    clip_px, dino_px = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 70, 70)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(compiled(clip_px, dino_px), tower(clip_px, dino_px), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["streaming", "buffered"])
def test_tower_through_triton_kernels(tmp_path, seed, grad, monkeypatch):
    """The tower's merges and MLP on the Triton kernels (the interpreter here, compiled on a GPU)."""
    from comm_fast import _backend

    monkeypatch.setenv("COMM_FAST_BACKEND", "triton")
    tower, ref = _build(tmp_path, dino_image_size=70)
    clip_px, dino_px = torch.randn(1, 3, 56, 56), torch.randn(1, 3, 70, 70)
    with torch.set_grad_enabled(grad):
        out = tower(clip_px, dino_px)
        expected = ref(clip_px, dino_px)
    assert rel_err(out, expected) <= 1e-5
    used = _backend.last_used()
    assert used["fused_mlp"]["backend"] == "triton"
    assert used["multilevel_merge"]["backend"] == "triton"  # streaming too: the GEMM accumulates (out=)


@pytest.mark.gpu
def test_tower_forward_replays_in_a_cuda_graph_and_compiles_reduce_overhead(tmp_path, seed):
    """Inference on CUDA without host syncs: after one warm-up call (merge variant chosen, derived weights
    and patch tables cached) the tower's forward is captured in a CUDA graph, and a replay on new inputs
    equals eager; torch.compile(mode="reduce-overhead") (CUDA graphs through inductor) runs and agrees."""
    tower, _ = _build(tmp_path, dino_image_size=70)
    tower = tower.cuda().to(torch.bfloat16)
    clip_px = torch.randn(2, 3, 56, 56, device="cuda", dtype=torch.bfloat16)
    dino_px = torch.randn(2, 3, 70, 70, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            tower(clip_px, dino_px)  # warm-up on a side stream, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = tower(clip_px, dino_px)
        new_clip, new_dino = torch.randn_like(clip_px), torch.randn_like(dino_px)
        clip_px.copy_(new_clip)
        dino_px.copy_(new_dino)
        graph.replay()
        eager = tower(new_clip, new_dino)
        assert rel_err(static_out.float(), eager.float()) <= 5e-3  # the same kernels (cuBLAS may pick another algorithm)
        compiled = torch.compile(tower, mode="reduce-overhead")
        for _ in range(3):  # recorded on the second call, replayed after
            out = compiled(new_clip, new_dino)
        assert rel_err(out.float(), eager.float()) <= 2e-2


# -- squaring images (config.aspect) and one encoder alone -------------------------------------------
def test_aspect_default_validation_and_saved_configs():
    from comm_fast import COMMConfig

    assert COMMVisionConfig().aspect == "pad" and COMMVisionConfig.from_dict({}).aspect == "pad"
    for aspect in ("pad", "crop"):
        cfg = COMMVisionConfig(aspect=aspect)
        assert COMMVisionConfig.from_dict(cfg.to_dict()).aspect == aspect
    old = COMMVisionConfig().to_dict()
    del old["aspect"]  # saved before the field existed: such a model was trained on center crops
    assert COMMVisionConfig.from_dict(old).aspect == "crop"
    assert COMMVisionConfig.from_dict(old, aspect="pad").aspect == "pad"
    model = COMMConfig.preset("tiny").to_dict()
    assert model["vision"]["aspect"] == "pad"
    del model["vision"]["aspect"]
    assert COMMConfig.from_dict(model).vision.aspect == "crop"
    with pytest.raises(ValueError, match=r"aspect: expected one of \('crop', 'pad'\), got 'square'"):
        COMMVisionConfig(aspect="square")


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_encode_squares_images_as_the_config_says(tmp_path, seed, aspect):
    from comm_fast import ops

    tower, _ = _build(tmp_path, aspect=aspect)
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (40, 90, 3), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (70, 50, 3), dtype=torch.uint8, generator=g)]
    with torch.no_grad():
        got = tower.encode(images)
        want = {a: tower(*ops.joint_preprocess(images, 56, 56, aspect=a)) for a in ("pad", "crop")}
    torch.testing.assert_close(got, want[aspect], rtol=0, atol=0)
    assert rel_err(want["pad"], want["crop"]) > 1e-2  # the two differ on non-square images


def test_training_preprocess_squares_images_as_the_config_says(tmp_path, seed):
    from PIL import Image

    from comm_fast import ops
    from comm_fast.data.dataset import load_images
    from comm_fast.training.train import preprocess

    rng = np.random.default_rng(seed)
    paths = []
    for k, size in enumerate([(40, 90), (77, 77)]):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    for aspect in ("pad", "crop"):
        cfg = COMMVisionConfig(clip_image_size=28, dino_image_size=42, aspect=aspect)
        got = preprocess(paths, cfg)
        want = ops.joint_preprocess(load_images(paths), 28, 42, aspect=aspect)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_encoder_alone(tmp_path, seed, monkeypatch):
    """A tower of one branch: P_a·v1 + b (CLIP alone) and P_b·MLP(v2) (DINOv2 alone) add up to COMM's
    P([v1; MLP(v2)]) + b with the same weights (COMM's own output is checked against the reference above);
    the encoder of the branch that is off is never run, and its heads do not exist."""
    both, _ = _build(tmp_path)
    sd = both.state_dict()
    dc = both.clip.config.hidden_size
    towers = {}
    for branch, layers in (("clip", dict(dino_layers=())), ("dino", dict(clip_layers=()))):
        config = COMMVisionConfig.from_dict(both.config.to_dict(), **layers)
        assert config.branches == (branch,)
        tower = COMMVisionTower(config).eval()
        own = {k: v for k, v in sd.items() if k in tower.state_dict()}
        w = sd["projector.weight"]
        own["projector.weight"] = w[:, :dc] if branch == "clip" else w[:, dc:]
        own["projector.bias"] = sd["projector.bias"] if branch == "clip" else torch.zeros_like(sd["projector.bias"])
        tower.load_state_dict(own, strict=True)
        off = "dino" if branch == "clip" else "clip"
        assert not any(k.startswith(f"{off}_") for k in tower.state_dict())
        heads = ("clip_merge", "projector") if branch == "clip" else ("dino_merge", "dino_mlp", "projector")
        assert tower.HEADS == heads
        towers[branch] = tower
    clip_px, dino_px = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            expected = both(clip_px, dino_px)
            parts = {}
            for branch, tower in towers.items():
                off = tower.dino if branch == "clip" else tower.clip
                with monkeypatch.context() as m:
                    for name in ("forward", "iter_hidden_states"):
                        m.setattr(type(off), name, lambda *a, **k: pytest.fail("the branch that is off ran"))
                    parts[branch] = tower(clip_px, dino_px)
        assert parts["clip"].shape == expected.shape == (2, 16, 48)
        assert rel_err(parts["clip"] + parts["dino"], expected) <= 1e-5
    with pytest.raises(ValueError, match="clip_layers, dino_layers: both empty"):
        COMMVisionConfig(clip_layers=(), dino_layers=())
