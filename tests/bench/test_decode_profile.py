"""bench/decode_profile.py on a tiny model: the floor, the step time and the split of operator time are written,
to results/quick/ for any checkpoint but the default one."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import decode_profile  # noqa: E402

from onegen_core.testing import build_tiny_checkpoint  # noqa: E402


def test_decode_profile_reports_floor_step_and_operator_split(tmp_path):
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", arch="llama")
    out = tmp_path / "profile.txt"
    decode_profile.main(["--checkpoint", str(ckpt), "--dtype", "float32", "--steps", "4", "--out", str(out)])
    text = out.read_text()
    assert "floor" in text and "ms/token" in text
    assert "decode step at batch 1" in text and "x the floor" in text
    assert "linears" in text and "attention" in text and "outside operators" in text
    assert "Self CPU" in text  # the profiler's table


def test_only_the_default_model_at_the_default_size_writes_the_committed_results(tmp_path):
    results = BENCH / "results"
    assert decode_profile.result_path(str(decode_profile.DEFAULT_CHECKPOINT), 48) == results / "decode_profile.txt"
    assert decode_profile.result_path(str(decode_profile.DEFAULT_CHECKPOINT), 8).parent == results / "quick"
    assert decode_profile.result_path(str(tmp_path), 48).parent == results / "quick"
