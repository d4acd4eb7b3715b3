#!/usr/bin/env bash
# The GPU harvest in two calls of at most five minutes each on a cold machine (benchmarks/README.md):
#
#   bash benchmarks/gpu_check.sh part1 OUT_DIR   # build, info, GPU tests, patch-op / merge / LN-sum / MLP rows
#   bash benchmarks/gpu_check.sh part2 OUT_DIR   # merge sweep (all configs), tower, profile, report vs measured
#
# Each step is time-boxed (SIGINT, then SIGKILL) and recorded in OUT_DIR/<part>.json as it ends; both
# parts into one OUT_DIR give one results.{json,md}. Needs python with torch (CUDA), triton, transformers,
# pytest and nvcc; installs nothing, reaches no network. COMM_FAST_GPU_CHECK_DRY=1 rehearses it on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
