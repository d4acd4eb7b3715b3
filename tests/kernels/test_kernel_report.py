"""The kernel report's gates on what the GPU will run, read without a GPU (sm_90 ahead-of-time compiles).

One report run per module (subprocess without TRITON_INTERPRET, so the real @triton.jit objects are
compiled with the runtime's specialisation at the real sizes); each gate is its own test and names
the entries that fail it. Then the report's parsers and prediction arithmetic on small hand-made cases.
"""
import json
import os
import subprocess
import sys

import pytest

from comm_fast import kernel_report as kr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report(*args, timeout=1500):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "comm_fast.kernel_report", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    path = tmp_path_factory.mktemp("report") / "r.json"
    proc = _report("--json", str(path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(path.read_text())
    data["stdout"] = proc.stdout
    return data


def _failing(report, gate):
    return {e["name"]: why for e in report["entries"] for g, why in e["gate_failures"] if g == gate}


def test_every_module_provides_unique_entries(report):
    names = [e["name"] for e in report["entries"]]
    assert len(names) == len(set(names))
    assert len({kr.safe_name(n) for n in names}) == len(names)
    assert {e["module"] for e in report["entries"]} == set(kr.KERNEL_MODULES)
    for e in report["entries"]:
        assert e["name"].startswith(e["kernel"]) and e["dtype"] in kr.ESIZE


@pytest.mark.parametrize("gate", kr.GATES)
def test_gate(report, gate):
    failing = _failing(report, gate)
    assert not failing, f"{len(failing)} launchable entries fail {gate}:\n" + "\n".join(
        f"  {name}: {why}" for name, why in failing.items())


def test_every_dtype_and_precision_is_covered(report):
    for kernel in ("mlp_fc1", "mlp_dact"):
        got = {(e["dtype"], e["precision"]) for e in report["entries"] if e["kernel"] == kernel}
        assert got == {("bf16", None), ("fp16", None), ("fp32", "tf32"), ("fp32", "ieee")}, kernel
    # the folded merge takes 16-bit inputs only (fp32 goes through the materialised variant's cuBLAS GEMM)
    assert {(e["dtype"], e["precision"]) for e in report["entries"] if e["kernel"] == "merge_fwd"} == {
        ("bf16", None), ("fp16", None)}


@pytest.mark.parametrize("keep", [1, 2])
def test_tune_configs_keep_only_configs_that_launch(report, keep):
    """COMM_FAST_TUNE_CONFIGS=N launches the first N configs: each kernel keeps at least one, all of them fit."""
    full = {e["name"]: e for e in report["entries"]}
    kept = kr.collect("h200", tune_configs=keep)
    assert {e["name"] for e in kept} <= set(full)
    groups = {(e["kernel"], e["variant"], e["dtype"], e["precision"], e["shape"]) for e in full.values()}
    assert groups == {(e["kernel"], e["variant"], e["dtype"], e["precision"], e["shape"]) for e in kept}
    too_big = [e["name"] for e in kept if not full[e["name"]]["read"].get("smem_fits", False)]
    assert not too_big, f"COMM_FAST_TUNE_CONFIGS={keep} keeps configs over shared memory: {too_big}"


def test_table_and_predictions(report):
    out = report["stdout"]
    assert "PREDICTION" in out and "not measurements" in out and "gates:" in out
    assert "prediction" in report["note"].lower()
    for e in report["entries"]:
        r, p = e["read"], e["prediction"]
        assert e["name"] in out
        assert r["registers"] > 0 and r["sass"]["instructions"] > 0
        if r["smem_fits"]:
            assert p is not None and p["time_s"] > 0, e["name"]
            assert p["kind"] == e["model"]["kind"]
        if e["gemm"] and e["dtype"] != "fp32":
            assert r["sass"]["main_loop"]["mma"] > 0, e["name"]  # the main loop found holds the HGMMA


def test_dump_and_json_fields(report, tmp_path):
    proc = _report("--only", "merge_normalise/folded/bf16/clip", "--dump", str(tmp_path / "d"), "--json",
                   str(tmp_path / "r.json"), "--explain", "merge_normalise/folded/bf16/clip/4x1024w2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "d"))
    assert files == [f"merge_normalise_folded_bf16_clip_4x1024w2.{x}" for x in ("ptx", "sass", "ttgir")]
    assert "HGMMA" not in (tmp_path / "d" / files[1]).read_text() and ".version" in (tmp_path / "d" / files[0]).read_text()
    row = json.loads((tmp_path / "r.json").read_text())["entries"][0]
    for key in ("signature", "constexprs", "divisible", "ones", "num_warps", "num_stages", "model", "read", "prediction"):
        assert key in row
    assert "Little's law" in proc.stdout and "PREDICTION" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--target", "sm_80"], "--target"), (["--preset", "a100"], "--preset"), (["--jobs", "0"], "--jobs"),
    (["--tune-configs", "0"], "--tune-configs"), (["--json", "/no/such/folder/r.json"], "--json"),
    (["--only", "no-such-kernel"], "only"),
])
def test_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        kr.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Parsers and model on hand-made cases
# ---------------------------------------------------------------------------------------------

TTGIR_PIPELINED = """
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable> loc(#loc1)
    %b = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared1, #smem, mutable> loc(#loc2)
    %a0 = ttg.memdesc_index %a[%c0_i32] : !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable> -> !ttg.memdesc<128x64xbf16, #shared, #smem, mutable>
    %r:4 = scf.for %i = %c0_i32 to %n step %c1_i32 iter_args(%acc = %cst, %ai = %a0, %t = %tok, %k = %c0_i32) -> (tensor<128x128xf32, #mma>, !ttg.memdesc<128x64xbf16, #shared, #smem, mutable>, !ttg.async.token, i32)  : i32 {
      %w = ttg.async_wait %t {num = 2 : i32} loc(#loc3)
      %bi = ttg.memdesc_index %b[%k] : !ttg.memdesc<3x64x128xbf16, #shared1, #smem, mutable> -> !ttg.memdesc<64x128xbf16, #shared1, #smem, mutable>
      %d = ttng.warp_group_dot %ai, %bi, %acc {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x64xbf16, #shared, #smem, mutable> * !ttg.memdesc<64x128xbf16, #shared1, #smem, mutable> -> tensor<128x128xf32, #mma>
      %e:3 = ttng.warp_group_dot_wait %d, %ai, %bi {pendings = 1 : i32} : tensor<128x128xf32, #mma>
      scf.yield %e#0, %ai, %w, %k : tensor<128x128xf32, #mma>
    } loc(#loc4)
    %f = ttng.warp_group_dot_wait %r#0 {pendings = 0 : i32} : tensor<128x128xf32, #mma>
    %g = ttg.async_wait {num = 0 : i32}
"""

TTGIR_DRAINED = """
    %x = ttg.local_alloc : () -> !ttg.memdesc<1x128x64xbf16, #shared, #smem, mutable>
    %w = ttg.local_alloc : () -> !ttg.memdesc<2x64x128xbf16, #shared2, #smem, mutable>
    %x0 = ttg.memdesc_index %x[%c0_i32] : !ttg.memdesc<1x128x64xbf16, #shared, #smem, mutable> -> !ttg.memdesc<128x64xbf16, #shared, #smem, mutable>
    %r:2 = scf.for %i = %c0_i32 to %n step %c1_i32 iter_args(%acc = %cst, %k = %c0_i32) -> (tensor<128x128xf32, #mma>, i32)  : i32 {
      %t = ttg.async_wait %tok {num = 0 : i32}
      %xl = ttg.local_load %x0 token %t : !ttg.memdesc<128x64xbf16, #shared, #smem, mutable> -> tensor<128x64xbf16, #blocked>
      %xs = arith.mulf %xl, %scale : tensor<128x64xbf16, #blocked>
      %lo, %hi = tt.split %xs : tensor<128x32x2xbf16, #linear> -> tensor<128x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>>
      %wi = ttg.memdesc_index %w[%k] : !ttg.memdesc<2x64x128xbf16, #shared2, #smem, mutable> -> !ttg.memdesc<64x128xbf16, #shared2, #smem, mutable>
      %yh = tt.load %ptrs : tensor<64x128x!tt.ptr<bf16>, #blocked1>
      %ys = ttg.local_alloc %yh : (tensor<64x128xbf16, #blocked1>) -> !ttg.memdesc<64x128xbf16, #shared2, #smem>
      %d = ttng.warp_group_dot %hi, %wi, %acc {isAsync = true} : tensor<128x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * !ttg.memdesc<64x128xbf16, #shared2, #smem, mutable> -> tensor<128x128xf32, #mma>
      %d2 = ttng.warp_group_dot %lo, %ys, %d {isAsync = true} : tensor<128x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * !ttg.memdesc<64x128xbf16, #shared2, #smem> -> tensor<128x128xf32, #mma>
      %e:2 = ttng.warp_group_dot_wait %d2, %wi {pendings = 0 : i32} : tensor<128x128xf32, #mma>
      scf.yield %e#0, %k : tensor<128x128xf32, #mma>, i32
    }
"""


def test_parse_ttgir_pipelined_ss():
    got = kr.parse_ttgir(TTGIR_PIPELINED)
    assert got["dots"] == [{"op": "ttng.warp_group_dot", "form": "SS", "a_buffers": 3, "a_source": "smem",
                            "b_buffers": 3, "b_source": "smem"}]
    assert got["async_waits"] == [2] and got["dot_pendings"] == [1]  # the waits after the loop are not counted
    one = kr.parse_ttgir(TTGIR_PIPELINED.replace("3x64x128xbf16, #shared1, #smem, mutable> loc(#loc2)",
                                                 "64x128xbf16, #shared1, #smem, mutable> loc(#loc2)"))
    assert one["dots"][0]["b_buffers"] == 1  # an allocation without a leading buffer dimension is one buffer


def test_parse_ttgir_single_buffer_drain_rs():
    got = kr.parse_ttgir(TTGIR_DRAINED)
    assert [(d["form"], d["a_buffers"], d["b_buffers"]) for d in got["dots"]] == [("RS", 1, 2), ("RS", 1, 1)]
    assert got["dots"][0]["a_source"] == "registers from smem"
    assert got["dots"][1]["b_source"] == "smem (stored from registers)"
    assert got["async_waits"] == [0] and got["dot_pendings"] == [0]


def _entry(**kw):
    e = dict(name="k/x", kernel="k", variant="", dtype="bf16", shape="s", config="", num_warps=8, num_stages=3,
             launchable=True, gemm=True, precision=None,
             model=kr.gemm_model(16896, 1024, 8192, 128, 128, 64, 328204288))
    e.update(kw)
    return e


def _read(ttgir=TTGIR_PIPELINED, sass_iter=100, registers=128, shared=65536, spills=0):
    return {"registers": registers, "spill_bytes": spills, "shared": shared, "smem_fits": shared <= 232448,
            "mma": "wgmma", "ttgir": kr.parse_ttgir(ttgir), "sass": {"main_loop": {"instructions": sass_iter}}}


def test_gates_on_hand_made_cases():
    assert kr.gate_failures(_entry(), _read()) == []
    got = {g for g, _ in kr.gate_failures(_entry(), _read(TTGIR_DRAINED, shared=294912, spills=8))}
    assert got == {"multi_buffered", "no_full_drain", "smem_fits", "no_spills"}
    assert [g for g, _ in kr.gate_failures(_entry(), dict(_read(), mma="fma"))] == ["wgmma"]
    assert kr.gate_failures(_entry(dtype="fp32", precision="ieee"), dict(_read(), mma="fma")) == []
    assert kr.gate_failures(_entry(launchable=False), _read(TTGIR_DRAINED)) == []
    assert kr.gate_failures(_entry(), {"error": "CompilationError: x"}) == [("compiles", "CompilationError: x")]


def test_gemm_prediction_hand_computed():
    """M = 128·132, N = 1024, K = 8192 in 128x128x64 tiles, 128 registers x 256 threads, 64 KB smem:
    2 CTAs/SM (registers: 65536 / (128·256)), 1056 tiles, 4 waves, 128 K steps."""
    p = kr.predict(_entry(), _read())
    assert (p["ctas_per_sm"], p["tiles"], p["waves"], p["k_steps"]) == (2, 1056, 4, 128)
    t_tc = 2 * 128 * 128 * 64 * 128 / (790e12 / 132)    # 44.853 us
    t_issue = 128 * 100 * 8 / 4 / 1.83e9                 # 13.989 us
    t_mem = 328204288 / 1056 / (4.3e12 / 132)            # 9.541 us
    assert p["tile_tensor_core_s"] == pytest.approx(t_tc, rel=1e-12)
    assert p["tile_issue_s"] == pytest.approx(t_issue, rel=1e-12)
    assert p["tile_memory_s"] == pytest.approx(t_mem, rel=1e-12)
    assert p["time_s"] == pytest.approx(4 * 2 * t_tc, rel=1e-12) and p["bound"] == "tensor cores"
    assert p["time_s"] == pytest.approx(358.82e-6, rel=1e-4)
    assert p["pct_of_bf16_peak"] == pytest.approx(100.0, rel=1e-9)  # full waves, tensor-bound: the measured peak
    # a full drain each K step exposes one latency per step; pendings = 0 serialises issue and MMA
    drained = kr.predict(_entry(), _read(TTGIR_DRAINED))
    assert drained["time_s"] == pytest.approx(4 * 2 * (t_tc + t_issue + 128 * 250e-9), rel=1e-12)
    assert drained["bound"] == "mma+issue (serial)" and drained["tile_drain_s"] == pytest.approx(32e-6, rel=1e-12)
    assert drained["pct_of_bf16_peak"] == pytest.approx(100 * t_tc / (t_tc + t_issue + 128 * 250e-9), rel=1e-12)
    assert kr.predict(_entry(), _read(shared=300000)) is None
    tf32 = kr.predict(_entry(dtype="fp32", precision="tf32"), _read())
    assert tf32["tile_tensor_core_s"] == pytest.approx(2 * t_tc, rel=1e-12)


def test_memory_prediction_hand_computed():
    """264 CTAs of 8 KB in flight each: 264 · 8192 B / 800 ns = 2.70 TB/s < 4.3 TB/s copy."""
    e = _entry(gemm=False, num_warps=4, model=kr.memory_model(10**9, 264, 8192))
    p = kr.predict(e, _read(registers=64, shared=0))
    assert p["ctas_per_sm"] == 8 and p["resident_ctas"] == 264
    assert p["little_bw"] == pytest.approx(264 * 8192 / 800e-9, rel=1e-12)
    assert p["time_s"] == pytest.approx(1e9 / 2.70336e12, rel=1e-12) and p["bound"] == "bytes in flight"
    assert p["pct_of_copy_bw"] == pytest.approx(100 * 2.70336 / 4.3, rel=1e-12)
    assert p["issue_s"] == pytest.approx(2 * 4 * 100 / 4 / 1.83e9, rel=1e-12)  # 2 CTAs on the busiest SM
    # 4000 trips through a 100-instruction loop: issue-bound, 2 x 4 x 100 x 4000 / 4 / 1.83 GHz = 437.16 us
    e["model"] = kr.memory_model(10**9, 264, 8192, iterations=4000)
    p = kr.predict(e, _read(registers=64, shared=0))
    assert p["bound"] == "issue" and p["time_s"] == pytest.approx(437.158e-6, rel=1e-5)
    assert p["pct_of_copy_bw"] == pytest.approx(100 * 1e9 / p["time_s"] / 4.3e12, rel=1e-12)
    text = kr.explain(e, _read(registers=64, shared=0))
    assert "PREDICTION" in text and "2.70 TB/s" in text


def test_ctas_per_sm():
    assert kr.ctas_per_sm(255, 8, 99624) == 1      # registers: 256 x 256 = the whole register file
    assert kr.ctas_per_sm(128, 4, 0) == 4          # 65536 / (128 x 128)
    assert kr.ctas_per_sm(32, 1, 0) == 32          # the 32-CTA limit
    assert kr.ctas_per_sm(40, 4, 120000) == 1      # shared memory: 233472 // 121024


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, 0x8, PT ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24 ;
        /*0060*/                   NOP ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0080*/              @P1 BRA `(.L_x_1) ;
        /*0090*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*00a0*/                   EXIT ;
.L_x_3:
        /*00b0*/                   BRA `(.L_x_3);
"""


def test_parse_sass_main_loop():
    got = kr.parse_sass(SASS)
    assert got["loops"] == 2 and got["instructions"] == 11  # the NOP not counted; the trap self-branch no loop
    assert got["main_loop"] == {"start": 0x40, "end": 0x80, "instructions": 4, "mma": 1}
    no_mma = kr.parse_sass(SASS.replace("HGMMA.64x128x16.F32.BF16", "FFMA"))
    assert no_mma["main_loop"]["instructions"] == 4 and no_mma["main_loop"]["mma"] == 0  # the largest loop
    # an outer loop around both: the main loop is still the largest innermost one
    nested = kr.parse_sass(SASS.replace("        /*0090*/                   BRA `(.L_x_2) ;",
                                        "        /*0090*/              @P2 BRA `(.L_x_0) ;"))
    assert nested["loops"] == 3
    assert kr.parse_sass(SASS.replace("HGMMA.64x128x16.F32.BF16", "FFMA").replace(
        "        /*0090*/                   BRA `(.L_x_2) ;", "        /*0090*/              @P2 BRA `(.L_x_0) ;")
    )["main_loop"]["end"] == 0x80
    flat = kr.parse_sass("        /*0000*/                   LDC R1, c[0x0][0x28] ;\n        /*0010*/  EXIT ;\n")
    assert flat["main_loop"]["instructions"] == 2 and flat["main_loop"]["whole_kernel"]


# A loop whose layer-end block (loads, a full wgmma wait, FMAs) a forward branch jumps over
SASS_CONDITIONAL = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   DEPBAR.LE SB0, 0x2 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;
        /*0050*/                   ISETP.NE.AND P5, PT, R2, R3, PT ;
        /*0060*/               @P5 BRA `(.L_x_1) ;
        /*0070*/                   LDG.E R8, desc[UR4][R10.64] ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0090*/                   NOP ;
        /*00a0*/                   FFMA R12, R24, R8, R12 ;
        /*00b0*/                   FFMA R13, R25, R8, R13 ;
.L_x_1:
        /*00c0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00d0*/                   ISETP.NE.AND P0, PT, R2, R4, PT ;
        /*00e0*/              @!P0 BRA `(.L_x_2) ;
        /*00f0*/                   IADD3 R7, R7, 0x40, RZ ;
        /*0100*/                   BRA `(.L_x_0) ;
.L_x_2:
        /*0110*/                   EXIT ;
.L_x_3:
        /*0120*/                   BRA `(.L_x_3);
"""


def test_parse_sass_conditional_block():
    """15 instructions in the loop (the NOP not counted): 4 in the block the @P5 branch jumps over
    (0x70-0xb0), 11 on the every-iteration path; the loop-exit branch's target lies outside the loop."""
    got = kr.parse_sass(SASS_CONDITIONAL)
    assert got["main_loop"] == {"start": 0x10, "end": 0x100, "instructions": 15, "mma": 1}
    assert got["main_loop_paths"] == {"every_iteration": 11, "conditional": 4, "every_iteration_full_mma_wait": False,
                                      "blocks": [{"first": 0x70, "last": 0xb0, "instructions": 4, "full_mma_wait": True}]}
    # without the branch the block runs every iteration, and so does its full wait
    flat = kr.parse_sass(SASS_CONDITIONAL.replace("@P5 BRA `(.L_x_1)", "IADD3 R9, R9, 0x1, RZ"))
    assert flat["main_loop_paths"] == {"every_iteration": 15, "conditional": 0, "blocks": [],
                                       "every_iteration_full_mma_wait": True}
    # a branch inside the block stays in it; a second block after the join is its own run
    two = kr.parse_sass(SASS_CONDITIONAL.replace(
        "        /*00a0*/                   FFMA R12, R24, R8, R12 ;",
        "        /*0098*/               @P6 BRA `(.L_x_4) ;\n.L_x_4:\n        /*00a0*/                   FFMA R12, R24, R8, R12 ;"
    ).replace("        /*00d0*/                   ISETP.NE.AND P0, PT, R2, R4, PT ;",
              "        /*00c8*/               @P6 BRA `(.L_x_5) ;\n        /*00cc*/                   FMUL R9, R9, R9 ;\n"
              ".L_x_5:\n        /*00d0*/                   ISETP.NE.AND P0, PT, R2, R4, PT ;"))
    assert [(b["first"], b["last"], b["instructions"], b["full_mma_wait"]) for b in two["main_loop_paths"]["blocks"]] == [
        (0x70, 0xb0, 5, True), (0xcc, 0xcc, 1, False)]
    assert two["main_loop_paths"]["every_iteration"] == 12 and two["main_loop_paths"]["conditional"] == 6
    assert kr.parse_sass(SASS)["main_loop_paths"]["conditional"] == 0


# TTGIR_PIPELINED with a layer-end scf.if (a nested scf.if inside it) after the loop's wgmma wait
TTGIR_CONDITIONAL = TTGIR_PIPELINED.replace("""      scf.yield %e#0, %ai, %w, %k""", """      %c = arith.cmpi eq, %k, %last : i32
      %s = scf.if %c -> (tensor<128x128xf32, #mma>) {
        %f:3 = ttng.warp_group_dot_wait %e#0, %ai, %bi {pendings = 0 : i32, warpGroupLocal} : tensor<128x128xf32, #mma>
        %g = scf.if %c2 -> (tensor<128x128xf32, #mma>) {
          %h = ttg.async_wait %t {num = 0 : i32} loc(#loc6)
          scf.yield %f#0 : tensor<128x128xf32, #mma>
        } else {
          scf.yield %f#0 : tensor<128x128xf32, #mma>
        } loc(#loc7)
        scf.yield %g : tensor<128x128xf32, #mma>
      } else {
        scf.yield %acc : tensor<128x128xf32, #mma>
      } loc(#loc5)
      %w2 = ttg.async_wait %t {num = 1 : i32} loc(#loc8)
      scf.yield %e#0, %ai, %w2, %k""")


def test_parse_ttgir_conditional_waits():
    got = kr.parse_ttgir(TTGIR_CONDITIONAL)
    assert got["dot_pendings"] == [1, 0] and got["dot_pendings_every_iteration"] == [1]
    assert got["async_waits"] == [2, 0, 1] and got["async_waits_every_iteration"] == [2, 1]
    plain = kr.parse_ttgir(TTGIR_PIPELINED)
    assert plain["dot_pendings_every_iteration"] == [1] and plain["async_waits_every_iteration"] == [2]


def test_gemm_prediction_with_a_conditional_block():
    """_entry's GEMM (2 CTAs/SM, 4 waves, 128 K steps, tensor cores 44.853 us / tile) with 100 SASS every
    iteration and a 320-instruction block run every 16th step that waits for every MMA: the block's
    8 runs x 320 x 8 warps / 4 / 1.83 GHz = 2.798 us add to the tensor-core time; 100 SASS overlap.
    The block's async_wait {num = 0} exposes one L2 latency per run: 8 x 250 ns."""
    t_tc = 2 * 128 * 128 * 64 * 128 / (790e12 / 132)
    t_issue = 128 * 100 * 8 / 4 / 1.83e9
    t_cond = 8 * 320 * 8 / 4 / 1.83e9
    paths = {"every_iteration": 100, "conditional": 320, "every_iteration_full_mma_wait": False,
             "blocks": [{"first": 0, "last": 0, "instructions": 320, "full_mma_wait": True}]}
    read = _read(TTGIR_CONDITIONAL)
    read["sass"] = {"main_loop": {"instructions": 420}, "main_loop_paths": paths}
    e = _entry()
    e["model"] = dict(e["model"], conditional_every=16)
    p = kr.predict(e, read)
    assert not p["serialised_mma"] and p["tile_issue_s"] == pytest.approx(t_issue, rel=1e-12)
    assert p["tile_conditional_s"] == pytest.approx(t_cond, rel=1e-12)
    assert p["tile_drain_s"] == pytest.approx(8 * 250e-9, rel=1e-12)
    assert p["time_s"] == pytest.approx(4 * 2 * (t_tc + t_cond + 2e-6), rel=1e-12) and p["bound"] == "tensor cores"
    assert p["pct_of_bf16_peak"] == pytest.approx(100 * t_tc / (t_tc + t_cond + 2e-6), rel=1e-12)  # 90.2%
    text = kr.explain(e, read)
    assert p["sass_per_iter"] == 120 and "128/16 runs x 320 SASS" in text and "8 steps x 250 ns" in text
    # the TTGIR's pendings = 0 inside the scf.if alone marks the block serial too
    paths["blocks"][0]["full_mma_wait"] = False
    assert kr.predict(e, read)["time_s"] == pytest.approx(4 * 2 * (t_tc + t_cond + 2e-6), rel=1e-12)
    # a block without a full wait overlaps the MMAs like the rest: 100 + 320/16 SASS per step, tensor-bound
    read["ttgir"] = kr.parse_ttgir(TTGIR_PIPELINED)
    p = kr.predict(e, read)
    assert p["tile_issue_s"] == pytest.approx(t_issue + t_cond, rel=1e-12) and p["tile_conditional_s"] == 0
    assert p["time_s"] == pytest.approx(4 * 2 * t_tc, rel=1e-12)
    # how often it runs unknown (no conditional_every): counted every iteration, serially
    read["ttgir"] = kr.parse_ttgir(TTGIR_CONDITIONAL)
    p = kr.predict(_entry(), read)
    assert p["time_s"] == pytest.approx(4 * 2 * (t_tc + 16 * t_cond + 32e-6), rel=1e-12) and p["sass_per_iter"] == 420


def test_parse_resource_usage():
    text = " Function _k:\n  REG:194 STACK:0 SHARED:1024 LOCAL:16 CONSTANT[0]:656 TEXTURE:0\n"
    assert kr.parse_resource_usage(text) == {"registers": 194, "stack": 0, "static_shared": 1024, "local": 16,
                                             "spill_bytes": 16}
    spilled = "  REG:32 STACK:13800 SHARED:1024 LOCAL:0 CONSTANT[0]:656"  # ptxas spills into its stack frame
    assert kr.parse_resource_usage(spilled)["spill_bytes"] == 13800
    with pytest.raises(ValueError, match="resource usage"):
        kr.parse_resource_usage("nothing")


def test_entry_follows_the_runtime_specialisation():
    import triton
    import triton.language as tl

    @triton.jit
    def k(x_ptr, y_ptr, n, stride, one, big, eps, BLOCK: tl.constexpr):
        pass

    e = kr.entry(kernel="k", variant="v", dtype="bf16", shape="s", fn=k, config={"BLOCK": 64}, num_warps=4,
                 num_stages=2, gemm=False, model=kr.memory_model(1, 1, 1), constexprs={"BLOCK": 64},
                 args=dict(x_ptr=kr.ptr("bf16"), y_ptr=kr.ptr("fp32", aligned=False), n=4096, stride=24, one=1,
                           big=2**31 + 16, eps=1e-5))
    assert e["name"] == "k/v/bf16/s/block64w4s2" and e["config"] == "BLOCK=64 warps=4 stages=2"
    assert e["signature"] == {"x_ptr": "*bf16", "y_ptr": "*fp32", "n": "i32", "stride": "i32", "one": "i32",
                              "big": "i64", "eps": "fp32", "BLOCK": "constexpr"}
    assert e["divisible"] == ["x_ptr", "n", "big"] and e["ones"] == ["one"]
    with pytest.raises(ValueError, match="'eps'"):
        kr.entry(kernel="k", variant="", dtype="bf16", shape="s", fn=k, num_warps=4, num_stages=2, gemm=False,
                 model={}, constexprs={"BLOCK": 64}, args=dict(x_ptr=kr.ptr("bf16"), y_ptr=kr.ptr("bf16"), n=1,
                                                              stride=1, one=1, big=1))
    with pytest.raises(ValueError, match="not arguments"):
        kr.entry(kernel="k", variant="", dtype="bf16", shape="s", fn=k, num_warps=4, num_stages=2, gemm=False,
                 model={}, constexprs={"BLOCK": 64, "NOPE": 1}, args={})
    with pytest.raises(ValueError, match="dtype"):
        kr.entry(kernel="k", variant="", dtype="fp64", shape="s", fn=k, num_warps=4, num_stages=2, gemm=False,
                 model={}, constexprs={}, args={})


def test_collect_checks_the_protocol(monkeypatch):
    import types

    mod = types.ModuleType("fake_kernels")
    monkeypatch.setitem(sys.modules, "fake_kernels", mod)
    with pytest.raises(RuntimeError, match="no report_entries"):
        kr.collect(modules=["fake_kernels"])
    good = dict(name="k/a", kernel="k", variant="", dtype="bf16", shape="s", config="", fn=None, signature={},
                constexprs={}, divisible=[], num_warps=4, num_stages=3, launchable=True, gemm=False, model={})
    mod.report_entries = lambda shapes: [dict(good), dict(good)]
    with pytest.raises(ValueError, match="given by"):
        kr.collect(modules=["fake_kernels"])
    mod.report_entries = lambda shapes: [dict(good, name="other/a")]
    with pytest.raises(ValueError, match="does not start with"):
        kr.collect(modules=["fake_kernels"])
    mod.report_entries = lambda shapes: [{k: v for k, v in good.items() if k != "model"}]
    with pytest.raises(ValueError, match="lacks"):
        kr.collect(modules=["fake_kernels"])
    with pytest.raises(ValueError, match="preset"):
        kr.collect("a100")


PREDICT_VARIANTS = """
import json, torch
from comm_fast import kernel_report as kr
print("RESULT" + json.dumps([kr.predict_variants("multilevel_merge", dict(M=256, N=128, D=64, L=3, dtype=d))
                             for d in (torch.bfloat16, torch.float32)]))
"""


def test_predict_variants_for_the_bench():
    """The bench's per-variant prediction: folded (16-bit only) and materialised, whose GEMM is taken at
    the measured GEMM rate, so it can never come out faster than that GEMM alone."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PREDICT_VARIANTS], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    bf16, fp32 = json.loads(lines[-1][len("RESULT"):])
    gemm_ms = 2 * 256 * 128 * 3 * 64 / kr.PEAK_BF16 * 1e3
    assert set(bf16) == {"folded", "materialised"} and set(fp32) == {"materialised"}
    assert bf16["materialised"] > gemm_ms and fp32["materialised"] > gemm_ms / kr.DOT_RATE["ieee"]
    assert bf16["folded"] > 0
    with pytest.raises(ValueError, match="op: expected 'multilevel_merge'"):
        kr.predict_variants("fused_mlp", {})
