"""The four ways to answer the same RAG workload that ``bench/efficiency.py`` times, and the check that
their answers agree. Only the engine's public API is used (``add_request`` / ``step`` / ``retriever`` /
``renderer`` / ``tokenizer`` / ``token_ids`` / ``checkpoint``), plus ``onegen_core.retrieval.encoder.Encoder`` for the
separate query forward of the baselines.

A *workload* is N requests (N = concurrency) of prompt token ids, ``max_tokens`` generated tokens each
(EOS ignored, greedy) and query tokens ``[RQ]`` at fixed output positions ``hops`` (e.g. ``[0, 12, 24]``),
``k`` passages inserted per retrieval. Every mode returns the same shape of answer per request: the
``max_tokens`` output ids *with* ``[RQ]`` at the hop positions, the doc ids retrieved at each hop, and
times measured from the moment the N requests were submitted together:

* ``one_pass`` — the engine: ``SamplingParams.forced_tokens`` puts ``[RQ]`` at each hop position; its
  hidden state from the generation forward is the query vector; the passage is appended to the same
  sequence and prefilled on the same KV cache (an *extend*).
* ``two_pass`` — a retrieve-then-generate pipeline: at each hop a separate query forward (``retrieve``
  callback: the same model as encoder over exactly the tokens one-pass's ``[RQ]`` sees, or a small
  encoder such as all-MiniLM-L6-v2 over the question), a search, then a fresh engine request whose
  ``prompt_token_ids`` are prompt + generated tokens + ``[RQ]`` + the rendered passage(s) — the ids the
  engine would hold at that point — with retrieval disabled: everything is prefilled from scratch.
* ``ref_loop`` — OneGen's reference inference loop (``RAGEvaluator.run_single`` of zjunlp/OneGen) on the
  same engine runtime: generate until ``[RQ]`` (here forced at the hop position) on the whole text,
  decode the whole sequence to text, re-tokenise it and run a separate forward over it for the ``[RQ]``
  hidden state (``OneGen.retrieve``), search, splice the passage *text* in
  (``{history}<paragraph>{document}</paragraph>``), re-tokenise the whole text and generate again from
  it. Every segment is a new engine request, so **no KV cache is reused** between segments: each one
  prefills the whole text. (The original passes the previous ``past_key_values`` to ``generate``, which
  in transformers skips the already-cached prefix when the re-tokenised prefix is unchanged; that
  variant costs one-pass plus the separate embedding forwards and is not timed here: see bench/README.md.)
* ``no_retrieval`` — the same prompts and token count with retrieval off: the floor.

``compare`` checks answers against one-pass's: the same passages at the same hops must give the same
greedy tokens; a difference is classified (another passage retrieved, the re-tokenised ids differ, or
the passages and ids are the same and only the floating-point path differs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# A retrieve callback of the two-pass pipeline: (context ids ending with [RQ], the request's question, the
# text generated so far) per request, and k -> k hits per request.
RetrieveFn = Callable[[list[list[int]], list[str], list[str], int], list[list[Any]]]


@dataclass
class Request:
    prompt_ids: list[int]
    question: str


@dataclass
class Workload:
    requests: list[Request]
    hops: list[int]  # output positions of [RQ], ascending, each < max_tokens - 1
    max_tokens: int
    k: int

    def __post_init__(self) -> None:
        if sorted(set(self.hops)) != list(self.hops):
            raise ValueError(f"hops must be strictly ascending, got {self.hops}")
        if self.hops and self.hops[-1] >= self.max_tokens - 1:
            raise ValueError(f"the last hop ({self.hops[-1]}) must leave room to generate after it "
                             f"(max_tokens {self.max_tokens})")
        if self.k < 1:
            raise ValueError("k must be >= 1")


@dataclass
class Outcome:
    output_ids: list[int]  # max_tokens ids, [RQ] at the hop positions
    passages: list[list[str]]  # doc ids inserted at each hop
    inserted_tokens: int
    ttft: float  # seconds from submission to the first output token that is not a query token
    latency: float  # seconds from submission to the last token
    retrieval_positions: list[int] = field(default_factory=list)  # output positions where it retrieved
    retokenized_same: bool | None = None  # ref_loop: every re-tokenised text gave the engine's ids
    scores: list[list[float]] = field(default_factory=list)  # the retriever's score of each passage


@dataclass
class ModeRun:
    mode: str
    outcomes: list[Outcome]
    wall: float  # seconds from submission to the last request's last token
    phases: dict[str, float]  # seconds spent per phase (engine generate, query encode, search, tokenise)
    # tokens that went through the generation model, all requests: "engine" (prefill, extends, decode) and
    # "separate forward" (the same model's query / embedding forwards outside the engine)
    model_tokens: dict[str, int] = field(default_factory=dict)
    engine_steps: int = 0  # Engine.step() calls (forwards through the engine), all segments

    @property
    def generated_tokens(self) -> int:
        return sum(len(o.output_ids) for o in self.outcomes)


class Clock:
    """perf_counter, synchronising the device first (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class _Seg:
    tokens: list[int]
    first_time: float | None  # absolute clock of the first non-query token, None if none
    finish_time: float
    result: Any
    steps: int = 0  # engine steps of the batch this request ran in


def run_requests(engine: Any, inputs: list[list[int]], sampling: list[Any], retrieval: Any, clock: Clock,
                 query_ids: set[int]) -> list[_Seg]:
    """Submit ``inputs`` (prompt token ids) together and step the engine until all finish."""
    from onegen_core.engine.outputs import Finished, TokenDelta

    ids = [engine.add_request(prompt_token_ids=p, sampling=sp, retrieval=retrieval)
           for p, sp in zip(inputs, sampling, strict=True)]
    first: dict[str, float] = {}
    done: dict[str, tuple[float, Any]] = {}
    steps = 0
    while len(done) < len(ids):
        events = engine.step()
        steps += 1
        now = clock()
        for ev in events:
            if isinstance(ev, TokenDelta):
                if ev.request_id not in first and any(t not in query_ids for t in ev.token_ids):
                    first[ev.request_id] = now
            elif isinstance(ev, Finished):
                if ev.result.finish_reason in ("error", "abort"):
                    raise RuntimeError(f"request {ev.request_id} ended with {ev.result.finish_reason}: "
                                       f"{ev.result.error}")
                done[ev.request_id] = (now, ev.result)
    return [_Seg(list(done[i][1].token_ids), first.get(i), done[i][0], done[i][1], steps) for i in ids]


def forwarded(segs: list[_Seg]) -> int:
    """Tokens the engine ran through the model for these requests: prompt, inserted passages and every
    generated token but the last (sampled, never fed back)."""
    return sum(s.result.usage.prompt_tokens + s.result.usage.retrieved_tokens
               + max(s.result.usage.completion_tokens - 1, 0) for s in segs)


def _sampling(max_tokens: int, forced: dict[int, int] | None = None) -> Any:
    from onegen_core.engine.params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, forced_tokens=forced or {})


def _rq(engine: Any) -> int:
    return engine.token_ids.query_ids[0]


def _passage_ids(engine: Any, hits: Sequence[Any]) -> list[int]:
    out: list[int] = []
    for h in hits:
        out += engine.renderer.passage(h.text or "", h.title)
    return out


# --------------------------------------------------------------------------- the modes
def one_pass(engine: Any, wl: Workload, clock: Clock) -> ModeRun:
    from onegen_core.engine.params import RetrievalParams

    rq = _rq(engine)
    forced = dict.fromkeys(wl.hops, rq)
    rp = RetrievalParams(enabled=True, k=wl.k, max_retrievals=len(wl.hops))
    t0 = clock()
    segs = run_requests(engine, [r.prompt_ids for r in wl.requests], [_sampling(wl.max_tokens, forced)] * len(wl.requests),
                        rp, clock, set(engine.token_ids.query_ids))
    wall = clock() - t0
    outcomes = []
    search: dict[int, float] = {}  # hop position -> its batched search's seconds (the slowest, if split)
    for s in segs:
        recs = s.result.retrievals
        for r in recs:
            search[r.output_token_index] = max(search.get(r.output_token_index, 0.0), r.search_ms / 1000.0)
        outcomes.append(Outcome(
            output_ids=s.tokens, passages=[[h.doc_id for h in r.hits] for r in recs],
            inserted_tokens=sum(r.inserted_tokens for r in recs),
            ttft=(s.first_time if s.first_time is not None else s.finish_time) - t0, latency=s.finish_time - t0,
            retrieval_positions=[r.output_token_index for r in recs],
            scores=[[h.score for h in r.hits] for r in recs]))
    return ModeRun("one_pass", outcomes, wall, {"engine (prefill + decode + extend + search)": wall,
                                                "of which search": sum(search.values())},
                   {"engine": forwarded(segs), "separate forward": 0}, segs[0].steps)


def no_retrieval(engine: Any, wl: Workload, clock: Clock) -> ModeRun:
    from onegen_core.engine.params import RetrievalParams

    t0 = clock()
    segs = run_requests(engine, [r.prompt_ids for r in wl.requests], [_sampling(wl.max_tokens)] * len(wl.requests),
                        RetrievalParams(enabled=False), clock, set(engine.token_ids.query_ids))
    wall = clock() - t0
    outcomes = [Outcome(s.tokens, [], 0, (s.first_time or s.finish_time) - t0, s.finish_time - t0) for s in segs]
    return ModeRun("no_retrieval", outcomes, wall, {"engine (prefill + decode)": wall},
                   {"engine": forwarded(segs), "separate forward": 0}, segs[0].steps)


class _Tracker:
    """Per-request output, first-token and finish times across the segments of a pipeline."""

    def __init__(self, n: int, t0: float, query_ids: set[int]):
        self.t0 = t0
        self.out: list[list[int]] = [[] for _ in range(n)]
        self.first: list[float | None] = [None] * n
        self.finish: list[float] = [t0] * n
        self.passages: list[list[list[str]]] = [[] for _ in range(n)]
        self.scores: list[list[list[float]]] = [[] for _ in range(n)]
        self.inserted = [0] * n
        self.query_ids = query_ids

    def add_segment(self, segs: list[_Seg]) -> None:
        for i, s in enumerate(segs):
            self.out[i] += s.tokens
            if self.first[i] is None and s.first_time is not None:
                self.first[i] = s.first_time
            self.finish[i] = s.finish_time

    def add_query_token(self, rq: int, now: float) -> None:
        for i in range(len(self.out)):
            self.out[i].append(rq)
            self.finish[i] = now

    def outcomes(self, retokenized: list[bool] | None = None) -> list[Outcome]:
        return [Outcome(self.out[i], self.passages[i], self.inserted[i],
                        (self.first[i] if self.first[i] is not None else self.finish[i]) - self.t0,
                        self.finish[i] - self.t0,
                        retokenized_same=None if retokenized is None else retokenized[i], scores=self.scores[i])
                for i in range(len(self.out))]


def two_pass(engine: Any, wl: Workload, clock: Clock, retrieve: RetrieveFn, name: str = "two_pass") -> ModeRun:
    """Retrieve with a separate query forward, then prefill everything from scratch (module docstring)."""
    from onegen_core.engine.params import RetrievalParams

    rq = _rq(engine)
    qids = set(engine.token_ids.query_ids)
    off = RetrievalParams(enabled=False)
    n = len(wl.requests)
    phases = {"engine (prefill + decode)": 0.0, "query encode + search": 0.0}
    tokens = {"engine": 0, "separate forward": 0}
    steps = [0]
    t0 = clock()
    tr = _Tracker(n, t0, qids)
    ctx = [list(r.prompt_ids) for r in wl.requests]

    def generate(n_new: int) -> None:
        t = clock()
        segs = run_requests(engine, ctx, [_sampling(n_new)] * n, off, clock, qids)
        tokens["engine"] += forwarded(segs)
        steps[0] += segs[0].steps
        for c, s in zip(ctx, segs, strict=True):
            c += s.tokens
        tr.add_segment(segs)
        phases["engine (prefill + decode)"] += clock() - t

    for pos in wl.hops:
        if pos > len(tr.out[0]):
            generate(pos - len(tr.out[0]))
        for c in ctx:
            c.append(rq)
        t = clock()
        texts = [engine.tokenizer.decode([x for x in o if x not in qids], skip_special_tokens=True) for o in tr.out]
        hits = retrieve(ctx, [r.question for r in wl.requests], texts, wl.k)
        now = clock()
        tokens["separate forward"] += getattr(retrieve, "same_model", False) * sum(len(c) for c in ctx)
        phases["query encode + search"] += now - t
        tr.add_query_token(rq, now)
        for i, hs in enumerate(hits):
            hs = list(hs)[: wl.k]
            ids = _passage_ids(engine, hs)
            ctx[i] += ids
            tr.passages[i].append([h.doc_id for h in hs])
            tr.scores[i].append([float(h.score) for h in hs])
            tr.inserted[i] += len(ids)
    if wl.max_tokens > len(tr.out[0]):
        generate(wl.max_tokens - len(tr.out[0]))
    wall = clock() - t0
    return ModeRun(name, tr.outcomes(), wall, phases, tokens, steps[0])


def ref_loop(engine: Any, wl: Workload, clock: Clock, encoder: Any, *, retokenize: bool = True) -> ModeRun:
    """OneGen's reference loop on text, no KV cache kept between segments (module docstring).

    ``retokenize=False`` carries the token ids from segment to segment instead of re-tokenising the text
    (same forwards otherwise): the loop minus its re-tokenisation, for tests whose random tiny models
    write text that does not re-tokenise to the same ids.
    """
    from onegen_core.engine.params import RetrievalParams

    rq = _rq(engine)
    qids = set(engine.token_ids.query_ids)
    tok = engine.tokenizer
    spec = engine.checkpoint.spec
    off = RetrievalParams(enabled=False)
    n = len(wl.requests)
    phases = {"engine (prefill + decode)": 0.0, "embed forward (whole text)": 0.0, "search": 0.0,
              "decode + re-tokenise": 0.0}
    tokens = {"engine": 0, "separate forward": 0}
    steps = [0]
    t0 = clock()
    tr = _Tracker(n, t0, qids)
    ideal = [list(r.prompt_ids) for r in wl.requests]  # the ids the engine would hold, to check re-tokenisation
    same = [True] * n
    t = clock()
    text = [tok.decode(r.prompt_ids, skip_special_tokens=False) for r in wl.requests]
    phases["decode + re-tokenise"] += clock() - t

    def encode(texts: list[str]) -> list[list[int]]:
        if not retokenize:
            return [list(x) for x in ideal]
        t = clock()
        ids = [tok.encode(s, add_special_tokens=False) for s in texts]
        phases["decode + re-tokenise"] += clock() - t
        return ids

    def generate(n_new: int, forced: dict[int, int] | None) -> None:
        ids_in = encode(text)
        for i in range(n):
            same[i] = same[i] and ids_in[i] == ideal[i]
        t = clock()
        segs = run_requests(engine, ids_in, [_sampling(n_new, forced)] * n, off, clock, qids)
        phases["engine (prefill + decode)"] += clock() - t
        tokens["engine"] += forwarded(segs)
        steps[0] += segs[0].steps
        tr.add_segment(segs)
        t = clock()
        for i, s in enumerate(segs):
            ideal[i] += s.tokens
            text[i] = tok.decode(ids_in[i] + s.tokens, skip_special_tokens=False)  # the whole sequence, as OneGen
        phases["decode + re-tokenise"] += clock() - t

    for pos in wl.hops:
        n_new = pos - len(tr.out[0]) + 1  # generate until [RQ], which ends the segment
        generate(n_new, {n_new - 1: rq})
        emb_in = encode(text)
        t = clock()
        vecs = encoder.encode_token_ids(emb_in)  # a separate forward over the whole re-tokenised text
        tokens["separate forward"] += sum(len(e) for e in emb_in)
        t1 = clock()
        hits = engine.retriever.search(vecs, wl.k)
        now = clock()
        phases["embed forward (whole text)"] += t1 - t
        phases["search"] += now - t1
        for i, hs in enumerate(hits):
            hs = list(hs)[: wl.k]
            body = "".join(spec.passage_open + spec.passage_template.format(text=h.text or "", title=h.title or "")
                           + spec.passage_close for h in hs)
            text[i] += body  # {history}<paragraph>{document}</paragraph>
            ids = _passage_ids(engine, hs)
            ideal[i] += ids
            tr.passages[i].append([h.doc_id for h in hs])
            tr.scores[i].append([float(h.score) for h in hs])
            tr.inserted[i] += len(ids)
            tr.finish[i] = now
    if wl.max_tokens > len(tr.out[0]):
        generate(wl.max_tokens - len(tr.out[0]), None)
    wall = clock() - t0
    return ModeRun("ref_loop", tr.outcomes(same), wall, phases, tokens, steps[0])


# --------------------------------------------------------------------------- retrieve callbacks
def same_model_retrieve(engine: Any, encoder: Any) -> RetrieveFn:
    """The generation model as a separate encoder: one forward over each context (ending with [RQ]),
    the final hidden state at [RQ] normalised — the vector one-pass takes from its own forward."""

    def retrieve(ctx: list[list[int]], questions: list[str], generated: list[str], k: int) -> list[list[Any]]:
        return engine.retriever.search(encoder.encode_token_ids(ctx), k)

    retrieve.same_model = True  # type: ignore[attr-defined]  # its forwards count as the model's tokens
    return retrieve


def text_retrieve(encode_texts: Callable[[list[str]], np.ndarray], retriever: Any) -> RetrieveFn:
    """A separate small encoder (e.g. all-MiniLM-L6-v2) over the question plus what was generated so far."""

    def retrieve(ctx: list[list[int]], questions: list[str], generated: list[str], k: int) -> list[list[Any]]:
        queries = [f"{q} {g}".strip() for q, g in zip(questions, generated, strict=True)]
        return retriever.search(encode_texts(queries), k)

    return retrieve


# --------------------------------------------------------------------------- the check
def compare(ref: ModeRun, other: ModeRun) -> dict[str, Any]:
    """How many of ``other``'s answers equal ``ref``'s, and why the others differ.

    Reasons: ``different passage`` (some hop retrieved other doc ids: a different answer is expected),
    ``re-tokenised ids differ`` (ref_loop: decode + re-tokenise did not give back the engine's ids),
    ``numerics`` (same passages at the same points and the same ids, yet other greedy tokens: only the
    floating-point path differs, e.g. bfloat16 with other batch shapes).
    """
    n = len(ref.outcomes)
    same_answers = same_passages = 0
    reasons: dict[str, int] = {}
    first_diff: list[int] = []
    passage_diffs: list[dict[str, Any]] = []  # the first hop whose passages differ: (doc id, score) on each side
    for a, b in zip(ref.outcomes, other.outcomes, strict=True):
        sp = a.passages == b.passages
        same_passages += sp
        if a.output_ids == b.output_ids and sp:
            same_answers += 1
            continue
        if b.retokenized_same is False:  # upstream of everything else: later queries see other ids
            why = "re-tokenised ids differ"
        elif not sp:
            why = "different passage"
        else:
            why = "numerics"
        reasons[why] = reasons.get(why, 0) + 1
        if why == "different passage":
            def hits(o: Outcome, h: int) -> list[tuple[str, float]]:
                ids = o.passages[h] if h < len(o.passages) else []
                return list(zip(ids, o.scores[h] if h < len(o.scores) else [float("nan")] * len(ids), strict=True))

            h = next(i for i in range(max(len(a.passages), len(b.passages))) if a.passages[i:i + 1] != b.passages[i:i + 1])
            passage_diffs.append({"hop": h, "ref": hits(a, h), "other": hits(b, h)})
        d = next((i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids, strict=False)) if x != y),
                 min(len(a.output_ids), len(b.output_ids)))
        first_diff.append(d)
    return {"n": n, "same_answers": same_answers, "same_passages": same_passages, "reasons": reasons,
            "first_difference_at": first_diff, "passage_differences": passage_diffs, "identical": same_answers == n}
