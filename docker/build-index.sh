#!/usr/bin/env bash
# One-shot index build (the compose file's index-build service; installed as onegen-build-index).
#  - no checkpoint in $ONEGEN_CHECKPOINT: prepare the default model (SmolLM2-135M + the OneGen adapter baked
#    into the image) and its index (python -m server.prepare_default): the index committed next to the adapter is
#    copied when it matches (dtype auto = bfloat16), else built over the Wikipedia sample;
#  - an index that already matches the checkpoint: nothing to do (pass --force to rebuild);
#  - otherwise: python -m index_builder build over $ONEGEN_CORPUS.
set -euo pipefail
ckpt=${ONEGEN_CHECKPOINT:-/models/checkpoint}
out=${ONEGEN_INDEX:-/index/current}
corpus=${ONEGEN_CORPUS:-/data/corpus.jsonl}
force=${1:-}

if [ ! -f "$ckpt/onegen.json" ] || [ -f "$ckpt/default_model.sha256" ]; then
    echo "onegen-build-index: no checkpoint in $ckpt; preparing the default model and its index"
    python -m server.prepare_default --root /opt/onegen-default --base-dir /models/smollm2-135m-instruct \
        --checkpoint-dir "$ckpt" --index-dir "$out" \
        --device "${ONEGEN_DEVICE:-auto}" --dtype "${ONEGEN_DTYPE:-auto}" ${force:+--force}
    exit 0
fi
if [ -z "$force" ] && [ -f "$out/manifest.json" ] \
    && python -m index_builder verify "$out" --checkpoint "$ckpt" >/dev/null 2>&1; then
    echo "onegen-build-index: $out already matches $ckpt (run with --force to rebuild)"
    exit 0
fi
if [ ! -f "$corpus" ]; then
    echo "onegen-build-index: no corpus at $corpus (mount a directory holding corpus.jsonl: ONEGEN_CORPUS_DIR)" >&2
    exit 1
fi
exec python -m index_builder build --checkpoint "$ckpt" --corpus "$corpus" --out "$out" --overwrite \
    --device "${ONEGEN_DEVICE:-auto}"
