#!/usr/bin/env bash
# Measures the project on one GPU in one run and writes docs/benchmarks/gpu.json; see docs/gpu.md.
#   bash benchmarks/gpu.sh --wheels .whl                  on the GPU machine, after benchmarks/prepare_gpu.sh
#   bash benchmarks/gpu.sh --smoke --out /tmp/gpu.json    the same steps at toy sizes on the CPU
# Every option is benchmarks/gpu.py's (--help). PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
