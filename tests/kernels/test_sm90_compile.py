"""Every Triton kernel compiled ahead of time for Hopper (sm_90) without a GPU.

Runs in a subprocess without TRITON_INTERPRET so the real @triton.jit objects are compiled.
The GEMM kernels' bf16 PTX must use the Hopper tensor-core instruction (wgmma).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import json, sys
    import triton, triton.language as tl
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from comm_fast.kernels import layernorm_weighted_sum as lnws, multilevel_merge as mm, fused_mlp as mlp

    FP32_PTRS = {"mean_ptr", "rstd_ptr", "scale_ptr", "s1_ptr", "s_ptr", "p_ptr", "q_ptr", "bsum_ptr"}

    def compile_(fn, consts, dtype="bf16", warps=4, stages=3):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name == "tab_ptr":
                sig[name] = "*i64"
            elif name in FP32_PTRS:
                sig[name] = "*fp32"
            elif name.endswith("_ptr"):
                sig[name] = "*" + dtype
            elif name == "eps":
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        return k.asm["ptx"]

    f32 = tl.float32
    gemm = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, ACC=f32, DOT_ACC=False, PRECISION="ieee")
    mlp_gemm = dict(BLOCK_M=64, BLOCK_N=128, K_BYTES=128, GROUP_M=8, ACC=f32, DOT_ACC=False, PRECISION="ieee")
    row = dict(BLOCK_M=4, BLOCK_D=1024, ALIGN=8, ACC=f32)
    jobs = {
        "lnws_fwd": (lnws._lnws_fwd_kernel, dict(row, EVEN_D=True), "bf16", 2),
        "ln_backward/lnws": (lnws.ln_backward_kernel, dict(row, ITERS=4, HAS_SCALE=True, HAS_STATS=False,
                                                            STORE_DH=True, PARTIALS=True), "bf16", 4),
        "ln_backward/merge": (lnws.ln_backward_kernel, dict(row, ITERS=4, HAS_SCALE=False, HAS_STATS=True,
                                                             STORE_DH=True, PARTIALS=False), "bf16", 4),
        "merge_stats": (mm._stats_kernel, row, "bf16", 4),
        "merge_fwd": (mm._merge_fwd_kernel, dict(gemm, ALIGN=8), "bf16", 8),
        "merge_fwd/fp16": (mm._merge_fwd_kernel, dict(gemm, ALIGN=8), "fp16", 8),
        "merge_fwd/fp32-tf32": (mm._merge_fwd_kernel, dict(gemm, ALIGN=4, DOT_ACC=True, PRECISION="tf32"), "fp32", 8),
        "merge_dw": (mm._merge_dw_kernel, dict(gemm, BLOCK_M=64, BLOCK_K=128, ALIGN=8), "bf16", 8),
        "merge_dg": (mm._merge_dg_kernel, dict(gemm, BLOCK_N=64, BLOCK_K=128), "bf16", 8),
        "mlp_fc1_bias_gelu": (mlp._mm_kernel, dict(mlp_gemm, EPI=2, ACT=0, STORE_AUX=True), "bf16", 4),
        "mlp_fc1_bias_gelu_nopre": (mlp._mm_kernel, dict(mlp_gemm, EPI=2, ACT=0, STORE_AUX=False), "bf16", 4),
        "mlp_dact_gelu_tanh": (mlp._mm_kernel, dict(mlp_gemm, EPI=3, ACT=1, STORE_AUX=True), "bf16", 4),
    }
    result = {}
    for name, (fn, consts, dtype, warps) in jobs.items():
        try:
            ptx = compile_(fn, consts, dtype, warps)
            result[name] = {"ok": True, "wgmma": "wgmma" in ptx}
        except Exception as exc:
            result[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    print("RESULT" + json.dumps(result))
''')

GEMMS_BF16 = ["merge_fwd", "merge_fwd/fp16", "merge_dw", "merge_dg", "mlp_fc1_bias_gelu", "mlp_fc1_bias_gelu_nopre",
              "mlp_dact_gelu_tanh"]


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT"):])


def test_every_kernel_compiles_for_sm90(compiled):
    failed = {k: v["error"] for k, v in compiled.items() if not v["ok"]}
    assert not failed, failed
    assert len(compiled) == 12


@pytest.mark.parametrize("name", GEMMS_BF16)
def test_gemm_kernels_use_wgmma(compiled, name):
    assert compiled[name]["ok"], compiled[name]
    assert compiled[name]["wgmma"], f"{name}: no wgmma in the sm_90 PTX"
