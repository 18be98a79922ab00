#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py): on a CUDA machine with no network, from the
# repository root, with the wheels of bench/fetch_gpu_wheels.sh in .whl/ (carried along):
#     bash bench/gpu_check.sh            # ~8 minutes on one H100 / H200; one PASS/FAIL table
#     bash bench/gpu_check.sh --smoke    # the same on the CPU at tiny sizes
# Output also lands in $OUT (when set) or /tmp/gpu_check: gpu_check.txt, gpu_check.json, steps.json, logs.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
