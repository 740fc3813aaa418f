#!/usr/bin/env bash
# One-shot index build (the compose file's index-build service; installed as onegen-build-index).
#  - no checkpoint in $ONEGEN_CHECKPOINT: prepare the DEMO checkpoint (random weights) and its index;
#  - an index that already matches the checkpoint: nothing to do (pass --force to rebuild);
#  - otherwise: python -m index_builder build over $ONEGEN_CORPUS.
set -euo pipefail
ckpt=${ONEGEN_CHECKPOINT:-/models/checkpoint}
out=${ONEGEN_INDEX:-/index/current}
corpus=${ONEGEN_CORPUS:-/data/corpus.jsonl}
force=${1:-}

if [ ! -f "$ckpt/onegen.json" ] || [ -f "$ckpt/ONEGEN_DEMO.txt" ]; then
    echo "onegen-build-index: no checkpoint in $ckpt; preparing the DEMO checkpoint (random weights, not a trained model)"
    exec python -m server.prepare_default --checkpoint-dir "$ckpt" --index-dir "$out" ${force:+--force}
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
