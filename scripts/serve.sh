#!/usr/bin/env bash
# The serve command: install, prepare the default model and index if none is given, start the server.
#
#   bash scripts/serve.sh                                   # the DEMO model on http://127.0.0.1:8000
#   ONEGEN_CHECKPOINT=ckpt ONEGEN_INDEX=idx bash scripts/serve.sh   # your checkpoint and index
#   bash scripts/serve.sh --port 9000 --api-key KEY         # extra flags go to `python -m server`
#
# Until a real default model ships, the default is a clearly labelled DEMO: a tiny model with random
# weights and an index over a small built-in corpus, built locally under .cache/onegen-default.
# Set ONEGEN_SKIP_INSTALL=1 to skip the pip step.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} PYTHONUNBUFFERED=1

if [ -z "${ONEGEN_SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q torch==2.13.0 && python3 -m pip install -q -e .
fi

if [ -z "${ONEGEN_CHECKPOINT:-}" ]; then
    echo "serve.sh: no ONEGEN_CHECKPOINT given: serving the DEMO model (random weights, NOT a trained model)" >&2
    eval "$(python3 -m server.prepare_default)"  # sets ONEGEN_CHECKPOINT and ONEGEN_INDEX
    export ONEGEN_CHECKPOINT ONEGEN_INDEX
fi

exec python3 -m server "$@"
