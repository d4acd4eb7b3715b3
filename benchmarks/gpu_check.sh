#!/usr/bin/env bash
# One-shot GPU check (DESIGN §6): on a GPU machine with no network, build the CUDA extension in
# place, run the GPU tests, the benchmark suite at the real sizes and a short training profile,
# then write results.json and results.md into the directory given as $1. Each step is time-boxed
# (20 + 120 + 100 + 120 + 40 + 80 s: under 8 minutes in all, 90 s more if the CUDA build fails). The
# benchmark saves its rows as it goes (a failing subject is a row with its error); pytest writes its
# junit report when stopped; an interrupted profile leaves its log only.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Needs python with torch (CUDA), triton, transformers, safetensors, pytest and nvcc; installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-16} TRITON_DEFAULT_FP_FUSION=1
step() { echo "== $(date +%T) $*"; }

step "environment"
$PY - <<'PY' | tee "$OUT/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton absent")
PY

# Each step is cut off with SIGINT first (pytest and the benchmark then still write what they have).
box() { local seconds=$1; shift; timeout -s INT -k 15 "$seconds" "$@"; }

step "build the extension (C++ + CUDA) in place"
box 120 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then  # e.g. nvcc and torch disagree on the CUDA version: keep the C++ part at least
    echo "CUDA build failed (rc=$rc); building the C++ part only" | tee -a "$OUT/status.txt"
    COMM_FAST_NO_CUDA=1 box 90 $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
    rc=$?
fi
echo "build rc=$rc" | tee -a "$OUT/status.txt"
box 20 $PY -m comm_fast.info | tee "$OUT/info.txt"

step "GPU tests (autotuning limited to two configs per kernel: fewer compiles)"
COMM_FAST_TUNE_CONFIGS=2 box 100 $PY -m pytest tests -m gpu -q -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$OUT/status.txt"
tail -5 "$OUT/gpu-tests.log"

step "benchmarks at the real sizes (the tower's cold torch.compile of two ViT-L encoders is left out)"
box 120 $PY -m comm_fast.cli bench --preset h200 --skip tower --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    --no-progress > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/status.txt"
box 40 $PY -m comm_fast.cli bench --preset h200 --ops tower --no-compile --json "$OUT/bench-tower.json" \
    --no-progress >> "$OUT/bench.log" 2>&1
echo "bench tower rc=$?" | tee -a "$OUT/status.txt"

step "training profile"
box 80 $PY -m comm_fast.cli profile-train --preset 1b --steps 6 --baseline --json "$OUT/profile.json" \
    > "$OUT/profile.log" 2>&1
echo "profile rc=$?" | tee -a "$OUT/status.txt"

step "summary"
$PY benchmarks/summarize.py "$OUT"
