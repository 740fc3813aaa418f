"""Named indexes and index versions in the engine (issue #20 items 3-4, the engine's half).

A version is loaded off the engine's thread and checked against what it would replace (fingerprint,
dimension, encode dtype, readable files); a pruned version keeps serving until it is swapped out; a
sequence searches the index its ``RetrievalParams.index`` names, and a batch that mixes indexes gives
each request exactly what it gets alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from core_test_data import CORPUS, PROMPTS, retrieve_batches, step_until

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import (
    CURRENT,
    INDEX_FILE,
    VERSIONS,
    Document,
    FingerprintMismatchError,
    IndexError_,
    version_name,
    write_index_dir,
)
from onegen_core.retrieval.encoder import Encoder
from onegen_core.retrieval.registry import UnknownIndex, VersionStamp, load_index

CPU = torch.device("cpu")
CONFIG = EngineConfig(num_kv_blocks=256, block_size=8)


def publish(root: Path, number: int, vectors: np.ndarray, docs: list[Document], fingerprint: str,
            **kw) -> Path:
    """Write ``root/versions/NNNNNN`` and point ``CURRENT`` at it (temporary file + rename, as update does)."""
    out = write_index_dir(root / VERSIONS / version_name(number), vectors, docs, checkpoint_fingerprint=fingerprint,
                          **kw)
    tmp = root / (CURRENT + ".tmp")
    tmp.write_text(version_name(number) + "\n")
    os.replace(tmp, root / CURRENT)
    return out


def _docs(prefix: str, texts: list[str]) -> list[Document]:
    return [Document(id=f"{prefix}{i}", text=t, title=f"{prefix.upper()}{i}") for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def encoded(retrieving_checkpoint):
    """(checkpoint, document vectors of CORPUS) with the engine's encoder."""
    ckpt = load_checkpoint(retrieving_checkpoint)
    docs = _docs("x", CORPUS)
    return ckpt, Encoder.from_checkpoint(ckpt).encode_documents([(d.text, d.title) for d in docs])


def _random_unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_pruned_version_serves_until_it_is_closed(tmp_path):
    """Regression: the docstore used to be opened by path on every search, so a version whose directory
    ``update --keep`` removed failed its next search although the server had not swapped it out yet."""
    root = tmp_path / "idx"
    publish(root, 1, _random_unit(4, 8, 0), _docs("a", ["one", "two", "three", "four"]), "fp")
    loaded = load_index("default", root, fingerprint="fp", dim=8, retriever="faiss", device=CPU)
    publish(root, 2, _random_unit(2, 8, 1), _docs("b", ["five", "six"]), "fp")
    shutil.rmtree(root / VERSIONS / version_name(1))  # what update --keep 1 does
    hits = loaded.retriever.search(_random_unit(1, 8, 2), 4)[0]
    assert sorted(h.text for h in hits) == ["four", "one", "three", "two"]
    loaded.close()
    with pytest.raises(IndexError_, match="closed"):
        loaded.retriever.search(_random_unit(1, 8, 2), 4)


def _wrong_dim(root: Path) -> None:
    publish(root, 2, _random_unit(3, 4, 1), _docs("b", ["x", "y", "z"]), "fp")


def _wrong_fingerprint(root: Path) -> None:
    publish(root, 2, _random_unit(3, 8, 1), _docs("b", ["x", "y", "z"]), "another-checkpoint")


def _wrong_dtype(root: Path) -> None:
    publish(root, 2, _random_unit(3, 8, 1), _docs("b", ["x", "y", "z"]), "fp", encode_dtype="bfloat16")


def _truncated_faiss(root: Path) -> None:
    v2 = publish(root, 2, _random_unit(3, 8, 1), _docs("b", ["x", "y", "z"]), "fp")
    data = (v2 / INDEX_FILE).read_bytes()
    (v2 / INDEX_FILE).write_bytes(data[: len(data) // 2])


def _garbage_docstore(root: Path) -> None:
    v2 = publish(root, 2, _random_unit(3, 8, 1), _docs("b", ["x", "y", "z"]), "fp")
    (v2 / "docstore.sqlite").write_bytes(b"not a database" * 100)


@pytest.mark.parametrize(("spoil", "error", "says"), [
    (_wrong_dim, IndexError_, "dimension 4, but the served model's hidden size is 8"),
    (_wrong_fingerprint, FingerprintMismatchError, "another-checkpoint"),
    (_wrong_dtype, IndexError_, "encoded in bfloat16, but this server accepts float32"),
    (_truncated_faiss, IndexError_, "cannot read index.faiss"),
    (_garbage_docstore, IndexError_, "cannot read the docstore"),
])
def test_a_bad_version_is_refused_with_its_reason(tmp_path, spoil, error, says):
    root = tmp_path / "idx"
    publish(root, 1, _random_unit(4, 8, 0), _docs("a", ["1", "2", "3", "4"]), "fp", encode_dtype="float32")
    spoil(root)
    with pytest.raises(error, match=says):
        load_index("default", root, fingerprint="fp", dim=8, retriever="faiss", device=CPU,
                   accepted_dtypes=("float32",))


def test_the_stamp_changes_with_current_and_with_a_plain_dir_rebuilt(tmp_path):
    root = tmp_path / "idx"
    publish(root, 1, _random_unit(2, 8, 0), _docs("a", ["1", "2"]), "fp")
    first = VersionStamp.of(root)
    assert VersionStamp.of(root) == first
    publish(root, 2, _random_unit(2, 8, 0), _docs("a", ["1", "2"]), "fp")
    assert VersionStamp.of(root).version == 2 and VersionStamp.of(root) != first
    plain = write_index_dir(tmp_path / "plain", _random_unit(2, 8, 0), _docs("a", ["1", "2"]),
                            checkpoint_fingerprint="fp")
    before = VersionStamp.of(plain)
    write_index_dir(plain, _random_unit(2, 8, 0), _docs("a", ["1", "2"]), checkpoint_fingerprint="fp")
    assert VersionStamp.of(plain) != before and VersionStamp.of(plain).version is None


# ---------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def two_indexes(encoded, tmp_path_factory):
    """Two index dirs over the same texts, documents ``a*`` and ``b*`` (so a hit says which was searched)."""
    ckpt, vecs = encoded
    root = tmp_path_factory.mktemp("named")
    out = {}
    for name, prefix in (("first", "a"), ("second", "b")):
        out[name] = write_index_dir(root / name, vecs, _docs(prefix, CORPUS), checkpoint_fingerprint=ckpt.fingerprint)
    return out


def _run(engine: Engine, prompts: list[str], indexes: list[str | None]):
    """Greedy generations, one per (prompt, index), queued together so that they batch; each is made to
    retrieve at its first output token and its 9th, so that their searches fall in the same steps."""
    from onegen_core.engine.outputs import Finished

    rq = next(iter(engine.token_ids.query))
    ids = [engine.add_request(p, sampling=SamplingParams(max_tokens=24, forced_tokens={0: rq, 8: rq}),
                              retrieval=RetrievalParams(k=1, max_retrievals=2, index=ix))
           for p, ix in zip(prompts, indexes, strict=True)]
    done = {}
    while len(done) < len(ids):
        for ev in engine.step():
            if isinstance(ev, Finished):
                done[ev.request_id] = ev.result
    return [done[i] for i in ids]


def test_each_request_searches_the_index_it_names(retrieving_checkpoint, two_indexes):
    """A batch mixing two indexes gives each request the tokens and hits it gets alone (greedy)."""
    engine = Engine.from_checkpoint(retrieving_checkpoint, config=CONFIG, index_dirs=two_indexes)
    assert engine.indexes.names == ["first", "second"] and engine.indexes.default == "first"
    prompts = PROMPTS[:4]
    names = ["second", None, "first", "second"]
    with retrieve_batches(engine, "index") as batches:
        together = _run(engine, prompts, names)
    assert {"first", "second"} in batches, f"no step searched both indexes: {batches}"
    alone = [_run(engine, [p], [n])[0] for p, n in zip(prompts, names, strict=True)]
    retrieved = 0
    for name, t, a in zip(names, together, alone, strict=True):
        assert t.token_ids == a.token_ids
        ids = [h.doc_id for r in t.retrievals for h in r.hits]
        assert ids == [h.doc_id for r in a.retrievals for h in r.hits]
        assert all(i.startswith("b" if name == "second" else "a") for i in ids), (name, ids)
        retrieved += len(ids)
    assert retrieved, "the fixture model retrieves on these prompts"
    hits = engine.search(["Paris"], k=2)
    assert all(h.doc_id.startswith("a") for h in hits[0])
    rid = engine.add_search(["Paris"], k=2, index="second")
    done = step_until(engine, rid)
    assert all(h.doc_id.startswith("b") for h in done.hits[0])


def test_an_unknown_index_is_refused_naming_the_served_ones(retrieving_checkpoint, two_indexes):
    engine = Engine.from_checkpoint(retrieving_checkpoint, config=CONFIG, index_dirs=two_indexes)
    with pytest.raises(UnknownIndex, match="unknown index 'third'; this server serves: 'first', 'second'"):
        engine.add_request("x", retrieval=RetrievalParams(index="third"))
    with pytest.raises(UnknownIndex, match="'first', 'second'"):
        engine.add_search(["x"], k=1, index="third")
    with pytest.raises(ValueError, match="non-empty"):
        RetrievalParams(index="")


def test_a_bare_index_dir_is_named_default(retrieving_checkpoint, tiny_index):
    engine = Engine.from_checkpoint(retrieving_checkpoint, tiny_index, CONFIG)
    assert engine.indexes.names == ["default"] and engine.index.root == tiny_index
    assert engine.add_request("x", retrieval=RetrievalParams(index="default"))


def test_a_new_version_is_swapped_in_between_steps(retrieving_checkpoint, encoded, tmp_path):
    """A request running across the swap finishes; searches after it see the new version; the old one is
    closed (its files released) by the swap."""
    ckpt, vecs = encoded
    root = tmp_path / "idx"
    publish(root, 1, vecs, _docs("old", CORPUS), ckpt.fingerprint, encode_dtype="float32")
    engine = Engine.from_checkpoint(retrieving_checkpoint, root, CONFIG)
    rid = engine.add_request(PROMPTS[0], sampling=SamplingParams(max_tokens=40),
                             retrieval=RetrievalParams(k=1, max_retrievals=4))
    engine.step()
    publish(root, 2, vecs, _docs("new", CORPUS), ckpt.fingerprint, encode_dtype="float32")
    loaded = engine.load_index("default")  # what the server does on its loader thread
    assert loaded.version == 2 and engine.index.version == 1  # loading alone changes nothing
    old = engine.swap_index(loaded)
    assert old.version == 1 and engine.index.version == 2
    with pytest.raises(IndexError_, match="closed"):
        old.store.docstore.get([0])
    result = step_until(engine, rid).result
    assert result.finish_reason in ("stop", "length")
    assert all(h.doc_id.startswith("new") for h in engine.search(["Paris"], k=3)[0])


def test_a_reload_refuses_a_version_in_another_dtype(retrieving_checkpoint, encoded, tmp_path):
    ckpt, vecs = encoded
    root = tmp_path / "idx"
    publish(root, 1, vecs, _docs("old", CORPUS), ckpt.fingerprint, encode_dtype="float32")
    engine = Engine.from_checkpoint(retrieving_checkpoint, root, CONFIG)
    publish(root, 2, vecs, _docs("new", CORPUS), ckpt.fingerprint, encode_dtype="float16")
    with pytest.raises(IndexError_, match="encoded in float16, but this server accepts float32"):
        engine.load_index("default")
    assert engine.index.version == 1 and engine.search(["Paris"], k=1)[0][0].doc_id.startswith("old")
