#!/usr/bin/env bash
# Download, here (with PyPI), the wheels bench/gpu_check.py installs on the GPU machine, which has no
# network: into .whl/ (git-ignored; carry it with the run). The device image (Python 3.12, x86_64)
# already has torch, transformers, tokenizers, safetensors, pyarrow, pandas, xxhash, fsspec, typer,
# rich, matplotlib, pyyaml and pytest; it lacks datasets and its dill / multiprocess, and has an
# older sentence-transformers. Versions: those tripletctl is tested with here.
#     bash bench/fetch_gpu_wheels.sh            # ~1.7 MB
#     PYARROW=1 bash bench/fetch_gpu_wheels.sh  # also pyarrow 26 (55 MB: the tree then nears the 64 MiB a run carries),
#                                                # should datasets refuse the image's pyarrow (gpu_check's env row says)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
packages=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 sentence-transformers==6.2.0)
if [[ "${PYARROW:-0}" == 1 ]]; then packages+=(pyarrow==26.0.1); fi
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
ls -l .whl
