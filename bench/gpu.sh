#!/usr/bin/env bash
# ResNet50 at 512 x 256 on one CUDA GPU: fp32 vs bf16 + channels_last (+ torch.compile), batch 8 and
# larger. Under 10 minutes, no network, uses the python3 that holds torch on the node.
#   bash bench/gpu.sh [OUT_DIR]      (results: OUT_DIR/gpu_bench.json, table on stdout)
set -euo pipefail
out="${1:-bench/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" "$(dirname "$0")/gpu.py" --json "$out/gpu_bench.json" "${@:2}"
