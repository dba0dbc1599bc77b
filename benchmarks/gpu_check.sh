#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU: a short BreastMNIST federation on CUDA that
# prints the device, throughput and AUC and fails unless the hospitals trained on the GPU.
# Needs a CUDA build of torch: make install TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
# Details: benchmarks/gpu_check.py. Writes benchmarks/results/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec timeout "${GPU_CHECK_TIMEOUT:-900}" "$PYTHON" -m benchmarks.gpu_check "$@"
