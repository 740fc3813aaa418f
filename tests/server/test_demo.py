"""The demo checkpoint + index (random weights) that the server tests serve."""

from __future__ import annotations

import json

import pytest

from onegen_core.formats.checkpoint import load_checkpoint
from server.demo import DEMO_CORPUS, DEMO_MARKER, prepare_demo


def test_demo_is_labelled_matches_its_index_and_is_reused(demo_assets):
    ckpt, index = demo_assets
    assert "NOT A TRAINED MODEL" in (ckpt / DEMO_MARKER).read_text()
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["checkpoint_fingerprint"] == load_checkpoint(ckpt).fingerprint
    assert manifest["count"] == len(DEMO_CORPUS)
    stamps = {p.name: p.stat().st_mtime_ns for p in [*ckpt.iterdir(), *index.iterdir()]}
    assert prepare_demo(ckpt.parent, checkpoint_dir=ckpt, index_dir=index) == (ckpt, index)
    assert {p.name: p.stat().st_mtime_ns for p in [*ckpt.iterdir(), *index.iterdir()]} == stamps


def test_refuses_to_overwrite_a_directory_that_is_not_the_demo(tmp_path):
    precious = tmp_path / "my-checkpoint"
    precious.mkdir()
    (precious / "onegen.json").write_text("{}")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        prepare_demo(tmp_path, checkpoint_dir=precious)
    assert (precious / "onegen.json").read_text() == "{}"
