"""verify: fingerprints and re-encoded vectors; a mismatched checkpoint is refused everywhere, naming both."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest

from index_builder.cli import main
from index_builder.errors import VerifyError
from index_builder.tools import verify
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import FingerprintMismatchError, IndexStore


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint_factory):
    """Same architecture and tokenizer, other random weights: a different fingerprint."""
    return tiny_checkpoint_factory("llama", seed=1)


def test_verify_passes_on_a_fresh_build(flat_index, tiny_checkpoint, capsys):
    report = verify(flat_index, load_checkpoint(tiny_checkpoint), sample=16)
    assert report.ok and report.exact and report.checked == 16 and report.max_abs_diff < 1e-5
    assert main(["verify", str(flat_index), "--checkpoint", str(tiny_checkpoint), "--sample", "8"]) == 0
    out = capsys.readouterr().out
    assert "matches the checkpoint" in out and out.strip().endswith("ok")


def test_mismatched_checkpoint_is_named_by_verify_and_the_engine(flat_index, tiny_checkpoint, other_checkpoint,
                                                                  capsys):
    good = load_checkpoint(tiny_checkpoint).fingerprint
    bad = load_checkpoint(other_checkpoint).fingerprint
    assert good != bad
    with pytest.raises(VerifyError) as e:
        verify(flat_index, load_checkpoint(other_checkpoint))
    assert good in str(e.value) and bad in str(e.value)
    assert main(["verify", str(flat_index), "--checkpoint", str(other_checkpoint)]) == 1
    err = capsys.readouterr().err
    assert good in err and bad in err and "Traceback" not in err
    with pytest.raises(FingerprintMismatchError) as e:
        IndexStore.open(flat_index, expected_fingerprint=bad)
    assert good in str(e.value) and bad in str(e.value)
    from onegen_core.engine import Engine

    with pytest.raises(FingerprintMismatchError) as e:
        Engine.from_checkpoint(other_checkpoint, index_dir=flat_index)
    assert good in str(e.value) and bad in str(e.value)


def test_a_tampered_vector_fails_verification(flat_index, tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(flat_index, broken)
    index = faiss.read_index(str(broken / "index.faiss"))
    vecs = index.reconstruct_n(0, index.ntotal)
    vecs[7] = -vecs[7]  # still unit length, now the wrong vector
    tampered = faiss.IndexFlatIP(index.d)
    tampered.add(vecs)
    faiss.write_index(tampered, str(broken / "index.faiss"))
    report = verify(broken, load_checkpoint(tiny_checkpoint), sample=index.ntotal)
    assert not report.ok and len(report.failures) == 1
    assert "1 of 60 re-encoded vectors differ" in report.failures[0] and "7 ('d7'" in report.failures[0]
    assert main(["verify", str(broken), "--checkpoint", str(tiny_checkpoint), "--sample", "60"]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_verify_checks_quantised_indexes_through_their_codec(tiny_checkpoint, tmp_path):
    from ib_data import make_records, write_jsonl

    from index_builder import BuildConfig, build_index

    corpus = write_jsonl(tmp_path / "c.jsonl", make_records(300, seed=2, max_words=10))
    build_index(BuildConfig(checkpoint=tiny_checkpoint, corpus=[corpus], out=tmp_path / "pq", index="ivfpq",
                            device="cpu", progress=False, shard_size=300))
    ckpt = load_checkpoint(tiny_checkpoint)
    report = verify(tmp_path / "pq", ckpt, sample=40)
    assert report.ok and not report.exact and report.checked == 40
    stored = faiss.read_index(str(tmp_path / "pq" / "index.faiss"))
    assert isinstance(faiss.downcast_index(stored), faiss.IndexIVFPQ)
    # a vector replaced by another document's code is caught even through the quantiser
    ivf = faiss.extract_index_ivf(stored)
    ivf.make_direct_map()
    vecs = np.stack([stored.reconstruct(i) for i in range(stored.ntotal)])
    shuffled = faiss.clone_index(stored)
    shuffled.reset()  # keeps the trained quantisers
    shuffled.add(np.roll(vecs, 1, axis=0))
    faiss.write_index(shuffled, str(tmp_path / "pq" / "index.faiss"))
    report = verify(tmp_path / "pq", ckpt, sample=40)
    assert not report.ok and not report.exact and "re-encoded vectors differ" in report.failures[0]
