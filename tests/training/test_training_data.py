"""Data validation (file:line errors), unit ids, the tokenised-data cache, and OneGen's negative sampling."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.text.rendering import Renderer
from training.batching import OneGenCollator, epoch_order
from training.config import TrainConfig
from training.data import DataError, load_training_data


@pytest.fixture(scope="module")
def renderer(tiny_checkpoint):
    return Renderer.for_checkpoint(load_checkpoint(tiny_checkpoint))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conv(q: str, content: str, pos=None, neg=None) -> dict:
    a = {"role": "assistant", "content": content}
    if pos is not None:
        a["positive"] = pos
    if neg is not None:
        a["negative"] = neg
    return {"messages": [{"role": "user", "content": q}, a]}


DB = [
    {"uid": "paris", "messages": [{"role": "user", "content": "Paris is in France."}]},
    {"uid": "rome", "messages": [{"role": "user", "content": "Rome is in Italy."}]},
    {"id": "berlin", "text": "Berlin is in Germany.", "title": "Berlin"},  # corpus JSONL shape
    # a OneGen multi-unit document: every [RD] ends a unit ("multi-0", "multi-1")
    {"uid": "multi", "messages": [{"role": "user", "content": "Madrid is in Spain.[RD]"},
                                  {"role": "assistant", "content": " Lisbon is in Portugal.[RD]"}]},
]


def test_valid_data_units_and_labels(tmp_path, renderer):
    db = write_jsonl(tmp_path / "db.jsonl", DB)
    train = write_jsonl(tmp_path / "train.jsonl", [
        conv("Where is Paris?", "[RQ]<paragraph>Paris is in France.</paragraph>France", [["paris"]], [["rome"]]),
        conv("Madrid and Lisbon?", "[RQ] and [RQ].", [["multi-0"], "multi-1"], [["berlin"], []]),
    ])
    data = load_training_data(renderer, train_file=train, db_file=db)
    c = data.corpus
    assert c.uids == ["paris", "rome", "berlin", "multi"]
    assert c.num_units == 5
    # a single-unit document renders exactly as the index renders it
    assert c.ids[0].tolist() == renderer.document("Paris is in France.")
    assert c.ids[2].tolist() == renderer.document("Berlin is in Germany.", "Berlin")
    # unit ids: bare uid = unit 0, uid-k = unit k, both resolved by lookup
    assert c.resolve("paris") == (0, None) and c.resolve("paris-0") == (0, None)
    assert c.resolve("multi") == (3, None) and c.resolve("multi-1") == (4, None)
    rd = renderer.token_ids.document
    assert [int(c.ids[int(c.unit_doc[u])][int(c.unit_pos[u])]) for u in range(5)] == [rd] * 5
    ex0, ex1 = data.train
    assert ex0.positives == [[0]] and ex0.negatives == [[1]]
    assert ex1.positives == [[3], [4]] and ex1.negatives == [[2], []]
    rq = renderer.token_ids.by_name["[RQ]"]
    assert [int(ex1.ids[p]) for p in ex1.query_positions] == [rq, rq]
    assert not data.eval


def test_bad_files_give_precise_errors(tmp_path, renderer):
    db = write_jsonl(tmp_path / "db.jsonl", DB)
    train = write_jsonl(tmp_path / "train.jsonl", [
        conv("q", "[RQ] and [RQ]", [["paris"]], [[], []]),  # 2 RET tokens, 1 positive list
        '{"messages": [',  # malformed JSON
        conv("q", "[RQ]", [["nope"]], [["rome"]]),  # unknown document
        conv("q", "[RQ]", [["paris"]], [["rome"], ["rome"]]),  # negative count
        conv("q", "[RQ]", None),  # RET token without positive
        conv("q", "[RQ]<paragraph>x", [["paris"]]),  # unclosed passage
        conv("q", "[RQ]", [["multi-7"]]),  # no such unit
        {"content": "no messages"},
        conv("q", "fine", None),
    ])
    with pytest.raises(DataError) as e:
        load_training_data(renderer, train_file=train, db_file=db)
    msg = str(e.value)
    t = str(train)
    for expected in (
        f"{t}:1: messages[1]: the message has 2 query RET token(s) but 'positive' has 1 entry",
        f"{t}:2:15: malformed JSON",
        f"{t}:3: messages[1]: positive[0]: unknown document 'nope': no such uid or unit id in {db}",
        f"{t}:4: messages[1]: the message has 1 query RET token(s) but 'negative' has 2 entries",
        f"{t}:5: messages[1]: 1 query RET token(s) but no 'positive' list",
        f"{t}:6: messages[1]: '<paragraph>' is never closed",
        f"{t}:7: messages[1]: positive[0]: document 'multi' ({db}:4) has 2 unit(s), no unit 7",
        f"{t}:8: expected an object with a 'messages' list",
    ):
        assert expected in msg, f"{expected!r} not in\n{msg}"
    assert msg.startswith("8 problem(s) in the training data")


def test_bad_db_gives_precise_errors(tmp_path, renderer):
    db = write_jsonl(tmp_path / "db.jsonl", [
        DB[0], DB[0], {"uid": "x", "messages": []}, {"name": "?"}, "not json", {"id": "y", "text": 3},
    ])
    train = write_jsonl(tmp_path / "train.jsonl", [conv("q", "a", None)])
    with pytest.raises(DataError) as e:
        load_training_data(renderer, train_file=train, db_file=db)
    msg = str(e.value)
    assert f"{db}:2: duplicate uid 'paris' (first at line 1)" in msg
    assert f"{db}:3: 'messages' must be a non-empty list" in msg
    assert f"{db}:4: missing 'id' (a corpus line is" in msg
    assert f"{db}:5:1: malformed JSON" in msg
    assert f"{db}:6: 'text' must be a string" in msg


def test_ambiguous_unit_id_is_an_error(tmp_path, renderer):
    """'a-1' could be the document with uid 'a-1' or unit 1 of document 'a': report both, guess neither."""
    db = write_jsonl(tmp_path / "db.jsonl", [
        {"uid": "a", "messages": [{"role": "user", "content": "one[RD] two[RD]"}]},
        {"uid": "a-1", "messages": [{"role": "user", "content": "three"}]},
    ])
    train = write_jsonl(tmp_path / "train.jsonl", [conv("q", "[RQ]", [["a-1"]])])
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[1\]: positive\[0\]: unit id 'a-1' is ambiguous: "
                                        r"it names .*db.jsonl:2 \(uid 'a-1', unit 0\) and .*db.jsonl:1 \(uid 'a', "
                                        r"unit 1\)"):
        load_training_data(renderer, train_file=train, db_file=db)


def test_cache_is_keyed_and_never_reused_blindly(tmp_path, renderer, tiny_checkpoint_factory):
    db = write_jsonl(tmp_path / "db.jsonl", DB)
    train = write_jsonl(tmp_path / "train.jsonl", [conv("q", "[RQ]x", [["paris"]], [["rome"]])])
    cache = tmp_path / "cache"
    kw = dict(train_file=train, db_file=db, cache_dir=cache)
    a = load_training_data(renderer, **kw)
    b = load_training_data(renderer, **kw)
    assert not a.from_cache and b.from_cache and a.cache_key == b.cache_key
    assert [e.ids.tolist() for e in a.train] == [e.ids.tolist() for e in b.train]
    assert b.corpus.resolve("multi-1") == a.corpus.resolve("multi-1")
    # a changed data file, setting or tokenizer is a different key
    c = load_training_data(renderer, **kw, max_length=32)
    assert c.cache_key != a.cache_key and not c.from_cache
    other = Renderer.for_checkpoint(load_checkpoint(tiny_checkpoint_factory("llama", key="other-tok",
                                                                            extra_text="entirely other words")))
    assert load_training_data(other, **kw).cache_key != a.cache_key
    write_jsonl(db, DB + [{"uid": "new", "messages": [{"role": "user", "content": "New."}]}])
    d = load_training_data(renderer, **kw)
    assert d.cache_key != a.cache_key and not d.from_cache and d.corpus.num_units == 6
    # a cache whose stored key does not match its name is rebuilt, not read
    meta = cache / d.cache_key / "meta.json"
    m = json.loads(meta.read_text())
    m["key"] = "tampered"
    meta.write_text(json.dumps(m))
    assert not load_training_data(renderer, **kw).from_cache


def test_eval_ratio_split_is_deterministic(tmp_path, renderer):
    db = write_jsonl(tmp_path / "db.jsonl", DB)
    train = write_jsonl(tmp_path / "train.jsonl", [conv(f"q{i}", "[RQ]x", [["paris"]]) for i in range(10)])
    a = load_training_data(renderer, train_file=train, db_file=db, eval_ratio=0.3, seed=1)
    b = load_training_data(renderer, train_file=train, db_file=db, eval_ratio=0.3, seed=1)
    assert len(a.eval) == 3 and len(a.train) == 7
    assert [e.line for e in a.eval] == [e.line for e in b.eval]
    assert not {e.line for e in a.eval} & {e.line for e in a.train}


def test_sampling_follows_onegen(tmp_path, renderer):
    """Hard negatives first and in order, unique across the batch, never a positive; random fill; one row per doc."""
    docs = [{"uid": f"d{i}", "messages": [{"role": "user", "content": f"doc {i}"}]} for i in range(30)]
    db = write_jsonl(tmp_path / "db.jsonl", docs)
    train = write_jsonl(tmp_path / "train.jsonl", [
        conv("a", "[RQ]x", [["d0", "d1"]], [["d2", "d3", "d4"]]),
        conv("b", "[RQ]y", [["d5"]], [["d3", "d1", "d6"]]),  # d3 is taken, d1 is a positive of query a
        conv("c", "no query", None),
    ])
    data = load_training_data(renderer, train_file=train, db_file=db)
    col = OneGenCollator(data.corpus, n_pos_per_sent=1, n_neg_per_pos=3, pad_id=2)
    picked = col.sample(data.train, random.Random(0))
    (b0, _, pos0, allpos0, negs0), (b1, _, pos1, _, negs1) = picked
    assert (b0, b1) == (0, 1) and pos0 in (0, 1) and allpos0 == [0, 1] and pos1 == 5
    assert negs0 == [2, 3, 4]  # hard negatives, in file order
    assert negs1[0] == 6 and len(negs1) == 3  # d3 used, d1 a positive: skipped; then random fill
    used = negs0 + negs1
    assert len(set(used)) == len(used) and not set(used) & {0, 1, 5}
    batch = col(data.train, random.Random(0))
    assert batch.num_conversations == 3
    assert batch.input_ids.shape[0] == 3 + 2 + 6  # conversations + one row per distinct document
    rq, rd = renderer.token_ids.by_name["[RQ]"], renderer.token_ids.document
    assert batch.input_ids[batch.query_rows, batch.query_cols].tolist() == [rq, rq]
    assert (batch.input_ids[batch.doc_rows, batch.doc_cols] == rd).all()
    assert (batch.labels[3:] == -100).all()  # documents carry no LM loss
    assert batch.cand_units[batch.pos_index].tolist() == [pos0, pos1]
    assert batch.cand_owner.tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    assert batch.query_pos_units.tolist() == [[0, 1], [5, -1]]


def test_epoch_order_shards_like_distributed_sampler():
    whole = epoch_order(10, seed=3, epoch=1, rank=0, world_size=1)
    shards = [epoch_order(10, seed=3, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(whole)
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert epoch_order(10, seed=3, epoch=2, rank=0, world_size=1) != whole
    assert len(epoch_order(3, seed=0, epoch=0, rank=3, world_size=4)) == 1
    assert [len(epoch_order(3, seed=0, epoch=0, rank=r, world_size=8)) for r in range(8)] == [1] * 8


def test_bad_data_leaves_no_checkpoint(tmp_path, tiny_checkpoint):
    from training.trainer import run_training

    db = write_jsonl(tmp_path / "db.jsonl", DB)
    train = write_jsonl(tmp_path / "train.jsonl", [conv("q", "[RQ]", [["missing"]])])
    out = tmp_path / "out"
    cfg = TrainConfig(base_model=str(tiny_checkpoint), train_file=str(train), db_file=str(db), output_dir=str(out),
                      max_steps=2)
    with pytest.raises(DataError, match="unknown document 'missing'"):
        run_training(cfg, progress=False)
    assert not out.exists() and not cfg.run_path.exists() and not Path(str(out) + ".partial").exists()
