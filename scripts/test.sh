#!/usr/bin/env bash
# The test command: the CPU test suite (gpu/slow markers deselected), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 -m pytest -q "$@"
