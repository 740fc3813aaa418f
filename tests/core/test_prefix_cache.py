"""Automatic prefix caching (``kv_cache.py``): the same tokens with it as without, and its bookkeeping.

Every test of a path that serves K/V from the cache compares with an engine that has
caching off, token for token (greedy, float32): prefixes of every length relative to the
block size, one that ends inside an inserted passage, two requests sharing blocks within
one step, annotate tokens, query encodes, preemption under a tiny cache, eviction and
abort. The engine with caching off is itself held to transformers by ``test_engine.py``.
"""

from __future__ import annotations

import pytest
from core_test_data import CORPUS, PROMPTS

from onegen_core.engine import Engine, EngineConfig
from onegen_core.engine.kv_cache import BlockManager, block_hash
from onegen_core.engine.outputs import Finished
from onegen_core.engine.params import RetrievalParams, SamplingParams
from onegen_core.engine.sequence import Sequence
from onegen_core.formats.checkpoint import load_checkpoint
from onegen_core.formats.index_store import Document, write_index_dir
from onegen_core.formats.roles import Role
from onegen_core.formats.spec import PRESETS
from onegen_core.retrieval.encoder import Encoder
from onegen_core.testing import build_tiny_checkpoint, make_query_token_likely

BS = 4  # small blocks: many block boundaries in short prompts
RETRIEVE = RetrievalParams(max_retrievals=2, k=1)
MAX_STEPS = 2000


def _engines(checkpoint, index, **config):
    """(caching on, caching off), otherwise alike."""
    config = {"num_kv_blocks": 512, "block_size": BS} | config
    return (Engine.from_checkpoint(checkpoint, index, EngineConfig(**config)),
            Engine.from_checkpoint(checkpoint, index, EngineConfig(enable_prefix_caching=False, **config)))


@pytest.fixture(scope="module")
def engines(retrieving_checkpoint, tiny_index):
    return _engines(retrieving_checkpoint, tiny_index)


def _ids(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def _run(engine, requests: list[dict], sampling: SamplingParams, retrieval: RetrievalParams = RETRIEVE):
    """Add every request (``add_request`` keywords) before the first step; results in order, and the sequences."""
    rids = [engine.add_request(sampling=sampling, retrieval=retrieval, **r) for r in requests]
    seqs = [engine.sequences[r] for r in rids]
    results = {}
    for _ in range(MAX_STEPS):
        for ev in engine.step():
            if isinstance(ev, Finished):
                results[ev.request_id] = ev.result
        if not engine.has_unfinished():
            return [results[r] for r in rids], seqs
    pytest.fail(f"requests did not finish within {MAX_STEPS} steps")


def _same(a, b) -> None:
    """Two results of one request: same tokens, same retrievals (where, what, how much was inserted)."""
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason
    assert [(r.output_token_index, r.inserted_tokens, [h.doc_id for h in r.hits]) for r in a.retrievals] == \
        [(r.output_token_index, r.inserted_tokens, [h.doc_id for h in r.hits]) for r in b.retrievals]


def _assert_all_released(engine) -> None:
    """Nothing holds a block: each is free or cached (evictable), and the cache's maps agree."""
    bm = engine.block_manager
    assert not engine.has_unfinished()
    assert all(r == 0 for r in bm.ref_counts)
    assert sorted([*bm.free, *bm.evictable]) == list(range(bm.num_blocks))
    assert set(bm.evictable) == {b for b, h in enumerate(bm.block_hashes) if h is not None}
    assert {bm.block_hashes[b]: b for b in bm.evictable} == bm.cached
    assert bm.num_free == bm.num_blocks


# ---------------------------------------------------------------------------------------------- equivalence
def test_prefixes_of_every_length_give_the_tokens_of_no_cache(engines):
    """Prompts sharing 0 .. 3 blocks + 1 tokens with one computed before: mid-block, at a boundary, one past it."""
    cached, plain = engines
    base = _ids(cached, PROMPTS[6])
    tail = _ids(cached, " Zorblat lives in")
    assert len(base) >= 3 * BS + 2
    sp = SamplingParams(max_tokens=12)
    [first], _ = _run(cached, [{"prompt_token_ids": base}], sp)
    [ref], _ = _run(plain, [{"prompt_token_ids": base}], sp)
    _same(first, ref)
    n_bos = first.usage.prompt_tokens - len(base)
    for p in range(3 * BS + 2):
        ids = base[:p] + tail
        [got], _ = _run(cached, [{"prompt_token_ids": ids}], sp)
        [want], _ = _run(plain, [{"prompt_token_ids": ids}], sp)
        _same(got, want)
        n = got.usage.prompt_tokens
        assert got.usage.cached_tokens % BS == 0 and got.usage.cached_tokens <= n - 1  # the last token is computed
        assert got.usage.cached_tokens >= min((n_bos + p) // BS, (n - 1) // BS) * BS, p
        assert want.usage.cached_tokens == 0
    # the whole prompt again: every block but the one holding its last token
    [again], _ = _run(cached, [{"prompt_token_ids": base}], sp)
    _same(again, ref)
    assert again.usage.cached_tokens == (again.usage.prompt_tokens - 1) // BS * BS


def test_a_prefix_ending_inside_an_inserted_passage(engines):
    """A prompt that repeats a finished request's tokens up to the middle of its inserted passage (and of a block)
    is served the passage's blocks from the cache and continues as without it."""
    cached, plain = engines
    qid = cached.token_ids.query_ids[0]
    sp = SamplingParams(max_tokens=16, forced_tokens={0: qid})  # retrieve at once: the passage follows the prompt
    [first], [seq] = _run(cached, [{"prompt": PROMPTS[3]}], sp, RetrievalParams(max_retrievals=1, k=1))
    [rec] = first.retrievals
    assert rec.inserted_tokens >= 3 * BS
    start = first.usage.prompt_tokens + 1  # the passage's first position (after the prompt and [RQ])
    cut = start + rec.inserted_tokens // 2
    cut += 1 if cut % BS == 0 else 0  # mid-block
    n_bos = len(cached.prepare_request(prompt_token_ids=[5]).ids) - 1  # what prompt_token_ids get in front
    ids = seq.token_ids[n_bos:cut]
    assert cached.prepare_request(prompt_token_ids=ids).ids == seq.token_ids[:cut]
    for max_retrievals in (0, 1):
        rp = RetrievalParams(max_retrievals=max_retrievals, k=1)
        [got], _ = _run(cached, [{"prompt_token_ids": ids}], SamplingParams(max_tokens=16), rp)
        [want], _ = _run(plain, [{"prompt_token_ids": ids}], SamplingParams(max_tokens=16), rp)
        _same(got, want)
        assert got.usage.prompt_tokens == cut
        assert got.usage.cached_tokens == (cut - 1) // BS * BS > start + BS  # blocks of the passage included


def test_two_requests_admitted_in_the_same_step_share_blocks(retrieving_checkpoint, tiny_index, engines):
    """The second request shares the blocks the first fills in the same forward (written before they are read),
    and both give the tokens they give without the cache."""
    cached, _ = _engines(retrieving_checkpoint, tiny_index)  # an empty cache
    _, plain = engines
    shared = PROMPTS[8] + " " + PROMPTS[6]
    prompts = [shared + " Numbers", shared + " Madrid", shared + " Numbers"]
    rids = [cached.add_request(p, sampling=SamplingParams(max_tokens=16), retrieval=RETRIEVE) for p in prompts]
    seqs = [cached.sequences[r] for r in rids]
    cached.step()
    assert all(s.first_token_time is not None for s in seqs), "all three prefilled in the first step"
    ids0, ids1 = seqs[0].token_ids[: seqs[0].num_prompt_tokens], seqs[1].token_ids[: seqs[1].num_prompt_tokens]
    common = next(i for i, (x, y) in enumerate(zip(ids0, ids1, strict=False)) if x != y)
    assert common > 3 * BS
    assert seqs[0].num_cached_prompt_tokens == 0
    assert seqs[1].num_cached_prompt_tokens == common // BS * BS
    assert seqs[2].num_cached_prompt_tokens == (len(ids0) - 1) // BS * BS  # the same prompt: all but its last block
    results = {}
    while cached.has_unfinished():
        results |= {e.request_id: e.result for e in cached.step() if isinstance(e, Finished)}
    want, _ = _run(plain, [{"prompt": p} for p in prompts], SamplingParams(max_tokens=16))
    for r, w in zip(rids, want, strict=True):
        _same(results[r], w)
    assert sum(len(w.retrievals) for w in want) >= 1
    _assert_all_released(cached)


def test_annotate_tokens_with_caching(tmp_path_factory):
    """Entity linking (``annotate``: record the hit, insert nothing, force the follow-up) over prompts sharing a
    prefix."""
    root = tmp_path_factory.mktemp("el")
    d = build_tiny_checkpoint(root / "ckpt", spec=PRESETS["entity-linking"], seed=1)
    make_query_token_likely(d, rank=0)
    ckpt = load_checkpoint(d)
    docs = [Document(id=f"e{i}", text=t) for i, t in enumerate(CORPUS)]
    vecs = Encoder.from_checkpoint(ckpt).encode_documents([x.text for x in docs])
    idx = write_index_dir(root / "idx", vecs, docs, checkpoint_fingerprint=ckpt.fingerprint)
    cached, plain = _engines(ckpt, idx, num_kv_blocks=128)
    lk = ckpt.token_ids.by_name["[LK]"]
    rp = RetrievalParams(max_retrievals=3)
    for sp in (SamplingParams(max_tokens=24), SamplingParams(max_tokens=24, forced_tokens={1: lk})):
        # each prompt twice in a row: the second time its prompt is served from the cache
        got = [r for p in PROMPTS[:6] for r in _run(cached, [{"prompt": p}] * 2, sp, rp)[0]]
        want, _ = _run(plain, [{"prompt": p} for p in PROMPTS[:6]], sp, rp)
        for i, w in enumerate(want):
            _same(got[2 * i], w)
            _same(got[2 * i + 1], w)
            assert got[2 * i + 1].usage.cached_tokens == (w.usage.prompt_tokens - 1) // BS * BS
        assert sum(len(w.retrievals) for w in want) >= 2
        assert all(r.action == "annotate" and r.inserted_tokens == 0 for w in want for r in w.retrievals)
    _assert_all_released(cached)


def test_query_encodes_with_caching(engines):
    """``/retrieve`` queries share the query template's blocks and a repeated query's: same vectors, same hits."""
    cached, plain = engines
    queries = ["Paris is the capital of France.", "Who plays the harp?", "Paris is the capital of France."]
    before = cached.block_manager.num_hit_tokens
    got = cached.search(queries, k=3)
    want = plain.search(queries, k=3)
    assert [[h.doc_id for h in row] for row in got] == [[h.doc_id for h in row] for row in want]
    for g, w in zip(got, want, strict=True):
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-5)
    assert cached.block_manager.num_hit_tokens > before
    _assert_all_released(cached)


# ---------------------------------------------------------------------------------------------- pressure
def test_preemption_under_a_tiny_cache_loses_nothing(retrieving_checkpoint, tiny_index):
    """Many requests sharing prefixes in 12 blocks of 8: preempted and recomputed, some sequence finds its own
    blocks again on readmission, every output is the one without the cache, and the cache ends with every
    block free or cached."""
    small, plain = _engines(retrieving_checkpoint, tiny_index, num_kv_blocks=12, block_size=8,
                            max_num_batched_tokens=64)  # plain: the same context length, each request alone
    prompts = PROMPTS + [PROMPTS[8][:40] + p for p in PROMPTS[:6]]
    admissions: dict[Sequence, list[int]] = {}  # each admission's cache hit, in blocks
    real_admit = small.block_manager.admit

    def admit(seq, hit):
        admissions.setdefault(seq, []).append(len(hit))
        real_admit(seq, hit)

    small.block_manager.admit = admit
    got, _ = _run(small, [{"prompt": p} for p in prompts], SamplingParams(max_tokens=20))
    assert small.scheduler.num_preemptions > 0
    assert any(len(h) > 1 and h[-1] > 0 for h in admissions.values()), "a preempted sequence found its blocks"
    want = [_run(plain, [{"prompt": p}], SamplingParams(max_tokens=20))[0][0] for p in prompts]
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    assert small.block_manager.num_evictions > 0
    _assert_all_released(small)


def test_eviction_under_a_full_cache_is_least_recently_used(retrieving_checkpoint, tiny_index):
    """A cache too small for every prompt served: the oldest prompts' blocks go, the latest stay, outputs as
    without the cache."""
    small, plain = _engines(retrieving_checkpoint, tiny_index, num_kv_blocks=24)
    sp = SamplingParams(max_tokens=8)
    prompts = [PROMPTS[6], PROMPTS[8], PROMPTS[0], PROMPTS[2], PROMPTS[9]]
    for p in prompts:
        [got], _ = _run(small, [{"prompt": p}], sp)
        [want], _ = _run(plain, [{"prompt": p}], sp)
        _same(got, want)
        assert small.block_manager.num_cached <= small.block_manager.num_blocks
    assert small.block_manager.num_evictions > 0
    [latest], _ = _run(small, [{"prompt": prompts[-1]}], sp)
    assert latest.usage.cached_tokens == (latest.usage.prompt_tokens - 1) // BS * BS > 0
    [oldest], _ = _run(small, [{"prompt": prompts[0]}], sp)
    assert oldest.usage.cached_tokens == 0
    _same(oldest, _run(plain, [{"prompt": prompts[0]}], sp)[0][0])
    _assert_all_released(small)


def _seq(token_ids: list[int]) -> Sequence:
    return Sequence(request_id=str(token_ids), token_ids=list(token_ids), roles=[Role.CTX] * len(token_ids),
                    sampling=SamplingParams(), retrieval=RetrievalParams(enabled=False), detok=None)


def _serve(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit ``seq`` as the scheduler does, compute it whole, release it -> the blocks its admission shared."""
    hit = bm.lookup(seq)
    assert bm.can_admit(hit, seq.num_tokens)
    bm.admit(seq, hit)
    bm.allocate(seq, seq.num_tokens)
    seq.num_cached_tokens = seq.num_tokens
    table = list(seq.block_table)
    bm.release(seq.block_table)
    return table[: len(hit)]


def test_block_manager_evicts_least_recently_released_prefix_ends_first():
    """Blocks are evicted only when no unused block is left, least recently released first and, within one
    sequence, from the end of its prefix; a cache hit makes blocks recent again."""
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = [1, 2, 3, 4, 5], [11, 12, 13, 14, 15]  # two full blocks and a partial one each
    assert _serve(bm, _seq(a)) == []
    assert _serve(bm, _seq(b)) == []
    assert bm.num_evictions == 0 and bm.num_cached == 4 and len(bm.free) == 2  # the partial blocks
    a_blocks = bm.lookup(_seq(a))
    assert len(a_blocks) == 2 and len(bm.lookup(_seq(b))) == 2
    assert _serve(bm, _seq(a)) == a_blocks  # a again: its blocks are now more recent than b's
    c = [21, 22, 23, 24, 25]
    assert _serve(bm, _seq(c)) == []  # 3 blocks: the 2 unused ones, then b's second block is evicted
    assert bm.num_evictions == 1
    assert len(bm.lookup(_seq(b))) == 1 and bm.lookup(_seq(a)) == a_blocks
    c_blocks = bm.lookup(_seq(c))
    assert _serve(bm, _seq([31, 32, 33, 34, 35])) == []  # 3 blocks: the unused one, b's first, a's second
    assert bm.num_evictions == 3
    assert bm.lookup(_seq(b)) == [] and bm.lookup(_seq(a)) == a_blocks[:1] and bm.lookup(_seq(c)) == c_blocks
    assert all(r == 0 for r in bm.ref_counts) and bm.num_free == 6 and bm.num_cached == 5


def test_a_hit_is_a_run_from_the_first_block():
    """Two sequences computing one prefix at once register its blocks once (the other's copies stay private); when
    the first's copy of block 0 is evicted, block 1 (registered by the second) is cached but unreachable: a lookup
    stops at its first miss, so a hit is always a whole prefix."""
    bm = BlockManager(num_blocks=8, block_size=2)
    x, y = _seq([1, 2, 3]), _seq([1, 2, 3, 4, 5])
    for s in (x, y):  # admitted together: neither finds the other's blocks
        bm.admit(s, bm.lookup(s))
    for s in (x, y):
        bm.allocate(s, s.num_tokens)
    assert bm.num_cached == 2  # x's block 0, y's block 1; y's block 0 is a private copy
    assert bm.block_hashes[y.block_table[0]] is None and bm.block_hashes[y.block_table[1]] is not None
    x_block0 = x.block_table[0]
    bm.release(x.block_table)
    bm.release(y.block_table)
    unused = len(bm.free)
    _serve(bm, _seq(list(range(100, 100 + 2 * unused + 1))))  # every unused block, then one eviction: x's block 0
    assert bm.num_evictions == 1 and bm.block_hashes[x_block0] is None
    assert bm.num_cached == 1 + unused  # y's block 1 and the new sequence's full blocks
    assert bm.lookup(_seq([1, 2, 3, 4, 5, 6])) == []


def test_block_hash_chains_the_whole_prefix():
    """The same tokens after another prefix (or at another position) hash differently; the same prefix alike."""
    h1 = block_hash(b"", [1, 2])
    assert block_hash(h1, [3, 4]) == block_hash(block_hash(b"", [1, 2]), [3, 4])
    assert block_hash(h1, [3, 4]) != block_hash(block_hash(b"", [1, 5]), [3, 4])
    assert block_hash(b"", [3, 4]) != block_hash(h1, [3, 4])
    s = _seq([1, 2, 3, 4, 5])
    BlockManager(4, 2).lookup(s)
    assert s.block_hashes == [h1, block_hash(h1, [3, 4])]  # full blocks short of the last token only


# ---------------------------------------------------------------------------------------------- abort, counters
def test_abort_of_a_request_sharing_blocks(retrieving_checkpoint, tiny_index, engines):
    """Aborting one of two requests that share blocks frees only what it alone held; the other goes on as without
    the cache."""
    cached, _ = _engines(retrieving_checkpoint, tiny_index)
    _, plain = engines
    prompts = [PROMPTS[6] + " Paris is", PROMPTS[6] + " Madrid"]
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    keep, drop = (cached.add_request(p, sampling=sp, retrieval=RETRIEVE) for p in prompts)
    cached.step()
    shared = cached.sequences[drop].block_table[: cached.sequences[drop].num_cached_prompt_tokens // BS]
    assert shared and all(cached.block_manager.ref_counts[b] == 2 for b in shared)
    assert cached.abort(drop)
    assert all(cached.block_manager.ref_counts[b] == 1 for b in shared)
    results = {}
    while cached.has_unfinished():
        results |= {e.request_id: e.result for e in cached.step() if isinstance(e, Finished)}
    assert results[drop].finish_reason == "abort"
    _same(results[keep], _run(plain, [{"prompt": prompts[0]}], sp)[0][0])
    _assert_all_released(cached)


def test_counters(retrieving_checkpoint, tiny_index):
    """Usage.cached_tokens per request; hit / miss tokens and cached blocks in ``stats()``; all zero when off."""
    on, off = _engines(retrieving_checkpoint, tiny_index)
    sp, rp = SamplingParams(max_tokens=4, ignore_eos=True), RetrievalParams(enabled=False)
    prompt = PROMPTS[8]
    n = len(on.prepare_request(prompt).ids)
    [a] = on.generate(prompt, sp, rp)
    s = on.stats()
    assert a.usage.cached_tokens == 0
    assert (s["prefix_cache_hit_tokens"], s["prefix_cache_miss_tokens"]) == (0, n)
    full_blocks = (n + 4 - 1) // BS  # prompt and generated tokens but the last (never computed)
    assert s["num_cached_kv_blocks"] == full_blocks and s["prefix_cache_evictions"] == 0
    [b] = on.generate(prompt, sp, rp)
    s = on.stats()
    hit = (n - 1) // BS * BS
    assert b.usage.cached_tokens == hit and b.token_ids == a.token_ids
    assert (s["prefix_cache_hit_tokens"], s["prefix_cache_miss_tokens"]) == (hit, 2 * n - hit)
    assert s["num_cached_kv_blocks"] == full_blocks  # b's blocks past the hit are duplicates: not registered
    assert s["num_free_kv_blocks"] == s["num_kv_blocks"] and s["kv_cache_usage"] == 0.0
    [c] = off.generate(prompt, sp, rp)
    [c] = off.generate(prompt, sp, rp)
    s = off.stats()
    assert c.usage.cached_tokens == 0 and c.token_ids == a.token_ids
    assert (s["prefix_cache_hit_tokens"], s["prefix_cache_miss_tokens"], s["num_cached_kv_blocks"]) == (0, 2 * n, 0)
