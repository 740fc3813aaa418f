"""OneGen db.jsonl entries of several units: the index holds the vectors training computes for them.

Regression: training encoded unit k of an entry after units 0 .. k-1 in one forward while the index
builder encoded every fragment alone under the document template, so a checkpoint trained on such
data was served against vectors it was never trained to match. Both now read the entry through
``onegen_core.text.documents``; this builds an index with the real CLI and compares every vector with
the one training's own forward (``OneGenModel.hidden``, via evaluation's ``encode_units``) gives.
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import faiss
import numpy as np
import pytest
import torch

from index_builder.cli import main
from index_builder.tools import verify
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import IndexStore
from onegen_core.text.documents import parse_entry, split_units
from onegen_core.text.rendering import Renderer

DB = [
    {"uid": "caps", "messages": [{"role": "user", "content": "Paris is the capital of France.[RD] Berlin is the "
                                  "capital of Germany.[RD] Rome is the capital of Italy.[RD]"}]},
    {"uid": "two", "messages": [{"role": "user", "content": "The river flows to the sea.[RD]"},
                                {"role": "assistant", "content": " Zorblat lives in Quenta and works as a baker.[RD]"}]},
    {"uid": "one", "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog.[RD]"}]},
    {"uid": "plain", "messages": [{"role": "user", "content": "Mirelle was born in Odrin and plays the harp."}]},
    {"id": "line", "text": "Madrid is the capital of Spain.", "title": "Spain"},
]


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("db-entries")
    db = tmp / "db.jsonl"
    db.write_text("".join(json.dumps(e) + "\n" for e in DB))
    out = tmp / "index"
    assert main(["build", "--checkpoint", str(tiny_checkpoint), "--corpus", str(db), "--out", str(out),
                 "--device", "cpu", "--quiet", "--shard-size", "3"]) == 0  # an entry's units straddle shards
    return db, out


def _training_vectors(tiny_checkpoint, db, tmp_path) -> dict[str, np.ndarray]:
    """Unit name -> the normalised vector training's forward computes at the unit's [RD]."""
    from transformers import AutoModelForCausalLM

    from training.data import load_training_data
    from training.evaluate import encode_units
    from training.modeling import OneGenModel

    renderer = Renderer.for_checkpoint(load_checkpoint(tiny_checkpoint))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a"}]}) + "\n")
    corpus = load_training_data(renderer, train_file=train, db_file=db).corpus
    model = OneGenModel(AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)).eval()
    vecs = encode_units(model, corpus, np.arange(corpus.num_units), batch_size=4,
                        pad_id=renderer.tokenizer.pad_token_id, device=torch.device("cpu")).numpy()
    names = []  # training's units are in file order, each entry's in its order
    for line in db.read_text().splitlines():
        entry = parse_entry(json.loads(line))
        names += split_units(entry, "[RD]").names(entry.id)
    assert len(names) == corpus.num_units
    return dict(zip(names, vecs, strict=True))


def test_index_vectors_are_the_vectors_training_computes(built, tiny_checkpoint, tmp_path):
    db, out = built
    with sqlite3.connect(out / "docstore.sqlite") as con:
        ids = [r[0] for r in con.execute("SELECT doc_id FROM documents ORDER BY vector_id")]
    assert ids == ["caps-0", "caps-1", "caps-2", "two-0", "two-1", "one-0", "plain", "line"]
    index = faiss.read_index(str(out / "index.faiss"))
    stored = np.stack([index.reconstruct(i) for i in range(index.ntotal)])
    trained = _training_vectors(tiny_checkpoint, db, tmp_path)
    assert sorted(trained) == sorted(ids)
    np.testing.assert_allclose(stored, np.stack([trained[i] for i in ids]), atol=1e-5, rtol=0)
    # not what encoding a later unit alone gives: the old builder's vectors
    from onegen_core.retrieval.encoder import Encoder

    alone = Encoder.from_checkpoint(tiny_checkpoint, dtype="float32", device="cpu").encode_documents(
        [" Berlin is the capital of Germany.", " Zorblat lives in Quenta and works as a baker."])
    assert np.abs(alone - stored[[1, 4]]).max() > 1e-2


def test_manifest_records_the_resolved_dtype_and_verify_re_encodes_units(built, tiny_checkpoint, tmp_path):
    _, out = built
    m = json.loads((out / "manifest.json").read_text())
    assert m["encode_dtype"] == "float32" and m["extra"]["builder"]["dtype"] == "float32"  # auto on the CPU
    report = verify(out, load_checkpoint(tiny_checkpoint), sample=8)
    assert report.ok and report.checked == 8 and report.max_abs_diff < 1e-5, report
    # a manifest written before the field existed still opens, and verify falls back to the builder's setting
    old = tmp_path / "old"
    shutil.copytree(out, old)
    del m["encode_dtype"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert IndexStore.open(old).manifest.encode_dtype is None
    assert verify(old, load_checkpoint(tiny_checkpoint), sample=8).ok


def test_unindexable_parts_of_an_entry_are_reported(tiny_checkpoint, tmp_path, capsys):
    db = tmp_path / "db.jsonl"
    db.write_text(json.dumps({"uid": "e", "messages": [{"role": "user", "content": "A.[RD] [RD]B.[RD] tail"}]}) + "\n")
    args = ["build", "--checkpoint", str(tiny_checkpoint), "--corpus", str(db), "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "fragment 1 ('e-1'): empty text" in err and "after its last '[RD]'" in err
    assert main([*args, "--out", str(tmp_path / "idx"), "--skip-invalid"]) == 0
    with sqlite3.connect(tmp_path / "idx" / "docstore.sqlite") as con:
        assert [r[0] for r in con.execute("SELECT doc_id FROM documents ORDER BY vector_id")] == ["e-0", "e-2"]
    rejected = [json.loads(x)["id"] for x in (tmp_path / "idx" / "rejected.jsonl").read_text().splitlines()]
    assert rejected == ["e-1", "e-3"]
    # unit 2 is still encoded after units 0 and 1, as training encodes it
    renderer = Renderer.for_checkpoint(load_checkpoint(tiny_checkpoint))
    from onegen_core.retrieval.encoder import Encoder
    from onegen_core.text.documents import render_units

    seq, positions = render_units(renderer, ["A.", " ", "B."])
    enc = Encoder.from_checkpoint(tiny_checkpoint, dtype="float32", device="cpu")
    want = enc.encode_at_positions([seq], [[positions[0], positions[2]]]).numpy()
    index = faiss.read_index(str(tmp_path / "idx" / "index.faiss"))
    np.testing.assert_allclose(index.reconstruct_n(0, 2), want, atol=1e-5)
