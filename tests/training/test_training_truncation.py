"""Conversations longer than max_length: dropped and named by default, kept or refused on request.

Regression for the default model's trial run, where hundreds of conversations silently lost their
answer tokens at max_length 224 and ``validate`` only printed a count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.text.rendering import Renderer
from training.data import DataError, load_training_data


def _data(task, tiny_base, max_length, truncation):
    ckpt = load_checkpoint(tiny_base)
    return load_training_data(Renderer.for_checkpoint(ckpt), train_file=task.train_file, db_file=task.db_file,
                              max_length=max_length, truncation=truncation, progress=False)


@pytest.fixture(scope="module")
def lengths(synthetic_task, synthetic_base):
    data = _data(synthetic_task, synthetic_base, 4096, "keep")
    return sorted(len(e.ids) for e in data.train)


def test_drop_keep_and_error(synthetic_task, synthetic_base, lengths):
    limit = lengths[len(lengths) // 2] - 1  # at least half the conversations are longer
    longer = sum(n > limit for n in lengths)
    dropped = _data(synthetic_task, synthetic_base, limit, "drop")
    assert longer and len(dropped.train) == len(lengths) - longer and all(len(e.ids) <= limit for e in dropped.train)
    st = dropped.stats["train"]
    assert st["conversations_truncated"] == st["conversations_dropped"] == longer
    assert st["truncated_examples"] and str(synthetic_task.train_file) in st["truncated_examples"][0]
    kept = _data(synthetic_task, synthetic_base, limit, "keep")
    assert len(kept.train) == len(lengths) and max(len(e.ids) for e in kept.train) == limit
    with pytest.raises(DataError, match=r"train\.jsonl:\d+: \d+ tokens > max_length=\d+: \d+ target token"):
        _data(synthetic_task, synthetic_base, limit, "error")


def test_validate_warns_and_names_examples(synthetic_task, synthetic_base, lengths):
    limit = lengths[len(lengths) // 2] - 1
    res = subprocess.run([sys.executable, "-m", "training", "validate", "--base_model", str(synthetic_base),
                          "--train_file", str(synthetic_task.train_file), "--db_file", str(synthetic_task.db_file),
                          "--max_length", str(limit), "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "longer than max_length" in res.stderr and "were dropped (truncation: drop)" in res.stderr
    assert f"{synthetic_task.train_file}:" in res.stderr
