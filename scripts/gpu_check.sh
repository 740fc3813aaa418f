#!/usr/bin/env bash
# GPU checks for a CUDA machine (not run in CI): the gpu-marked equivalence tests, then the engine benchmark.
#
#   bash scripts/gpu_check.sh            # writes logs to $OUT (or ./gpu-check) when given
#
# Wheels in ./.whl (e.g. faiss-cpu, flash-attn built for the machine's torch) are installed first into
# /tmp/site without touching the machine's torch; tests that need flash-attn skip themselves without it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi
export PYTHONPATH=${PYTHONPATH:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -m gpu tests/core/test_gpu.py -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$out/gpu_tests.log"
python3 bench/engine.py --model tiny --tokens 128 --concurrency 32 2>&1 | tee "$out/bench_engine.log"
