"""The OneGen engine: generation with retrieval inside the decode loop, on one KV cache.

A step reads as a sentence::

    chunks  = scheduler.schedule()            # decode tokens, prompt chunks, passage extends
    hidden  = runner.run(chunks)              # one packed forward -> final-layer hidden states
    events  = sample / retrieve / insert      # per sequence whose chunk reached its end
    events += finish what is done

When a sequence samples a query RET token ([RQ]) the token is appended like any other;
the next forward over it yields its hidden state (and its K/V). Its logits are not
sampled: the hidden state is normalised and searched — batched across every sequence
that reached a query token in this step — and ``open + passage + close`` tokens are
appended as CTX. The next step prefills only those tokens on the existing cache
(an *extend*) and sampling resumes from the last inserted token. ``annotate`` tokens
record the hit and insert nothing (optionally forcing a follow-up token). Once a
request's retrieval budget is spent, query tokens are masked out of sampling.

The engine owns the step and the sequences' lifetimes; its helpers return what they did
and never reach back into it: ``inputs.py`` renders and checks input, ``searches.py``
keeps the ``/retrieve`` jobs, ``insertion.py`` searches and inserts or annotates,
``blocking.py`` adds the blocking calls for scripts and tests.

Indexes: the engine serves named indexes (``retrieval.registry``; a bare index directory is
``default``) and a sequence searches the one its ``RetrievalParams.index`` names. A new version is
loaded off the engine's thread (``load_index``) and swapped in on it between two steps
(``swap_index``), so a search never sees half of one. A sequence retrieves in its
``RetrievalParams.mode`` (default ``EngineConfig.retrieval_mode``): ``dense``, or ``hybrid``, where
BM25 searches its last user turn plus the output since its last passage and the two rankings are
fused (``retrieval.hybrid``); hybrid needs the index's BM25 side index, checked at admission.

Not thread-safe: one thread owns an engine (the server's worker thread).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device, resolve_dtype
from ..formats.checkpoint import Checkpoint, load_checkpoint
from ..formats.index_store import IndexStore
from ..formats.roles import Role
from ..retrieval.encoder import normalize
from ..retrieval.registry import DEFAULT_INDEX, IndexRegistry, LoadedIndex, load_index
from ..retrieval.retriever import Retriever
from ..text.detokenizer import IncrementalDetokenizer
from ..text.rendering import Rendered, Renderer
from .blocking import BlockingCalls
from .engine_config import RETRIEVAL_MODES, EngineConfig, step_token_budget
from .inputs import ContextLengthExceeded, InputChecker, RequestInput
from .insertion import PassageInserter
from .kv_cache import BlockManager
from .model_runner import ModelRunner
from .outputs import EngineEvent, Finished, TokenDelta
from .params import RetrievalParams, SamplingParams
from .sampler import Sampler, SamplingRow
from .scheduler import Scheduler
from .searches import SearchJobs
from .sequence import Sequence

__all__ = ["ContextLengthExceeded", "Engine", "EngineConfig", "RequestInput"]

log = logging.getLogger(__package__)  # "onegen_core.engine", as before the engine became a package


class Engine(BlockingCalls):
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, retriever: Retriever | None = None,
                 index: IndexStore | None = None, *, indexes: IndexRegistry | None = None):
        """``retriever`` (and the ``index`` it searches, if any) is the ``default`` index; ``indexes`` serves
        several by name instead."""
        config = config or EngineConfig()
        if indexes is not None and retriever is not None:
            raise ValueError("give retriever= (the default index) or indexes=, not both")
        self.checkpoint = checkpoint
        self.device = resolve_device(config.device)
        # the step budget's default depends on the device: what the engine runs with is what it reports
        self.config = config = replace(config, max_num_batched_tokens=step_token_budget(config, self.device.type))
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.indexes = indexes if indexes is not None else IndexRegistry()
        if retriever is not None:
            self.indexes.add(LoadedIndex(DEFAULT_INDEX, retriever, index))
        self.tokenizer = checkpoint.tokenizer
        self.renderer = Renderer.for_checkpoint(checkpoint)
        self.token_ids = checkpoint.token_ids
        self.runner = ModelRunner(checkpoint, config, self.device, self.dtype)
        self.model = self.runner.model
        self.max_model_len = self.runner.max_model_len
        self.transfers = self.runner.transfers
        self.block_manager = BlockManager(self.runner.usable_blocks, config.block_size,
                                          enable_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        banned = [self.token_ids.document, self.token_ids.passage_open, self.token_ids.passage_close]
        banned += list(self.token_ids.follow_up.values())  # only ever forced
        self.sampler = Sampler(self.model.vocab_size, banned, self.token_ids.query_ids, self.device, seed=config.seed,
                               counter=self.transfers)
        self.inputs = InputChecker(self.renderer, self.model.vocab_size, self.max_model_len)
        self.searches = SearchJobs(config.max_num_batched_tokens, self.model.hidden_size)
        self.inserter = PassageInserter(self.renderer, self.token_ids, self.max_model_len)
        self.eos_ids = self._eos_ids()
        self.sequences: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self.default_k = checkpoint.spec.retrieval.k
        self.default_max_retrievals = checkpoint.spec.retrieval.max_retrievals
        self.num_steps = 0
        self.last_step_tokens = 0  # tokens in the last step's forward (at most max_num_batched_tokens)
        for entry in self.indexes.entries.values():
            self._warn_index_dtype(entry)
            if config.retrieval_mode == "hybrid":
                entry.require_bm25()  # BM25UnavailableError: an engine that would fail its default requests
        log.info("engine ready: %s %s on %s, %d KV blocks x %d, max_model_len %d, attention %s, linear %s",
                 checkpoint.model_type, self.dtype, self.device, self.runner.num_blocks, config.block_size,
                 self.max_model_len, self.runner.backend, self.model.linear_backend)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | Checkpoint, index_dir: str | Path | None = None,
                        config: EngineConfig | None = None, *,
                        index_dirs: Mapping[str, str | os.PathLike] | None = None) -> Engine:
        """Load a checkpoint and (optionally) index dirs whose fingerprint must match it: ``index_dir`` is the
        ``default`` index, ``index_dirs`` maps names to directories (the first is the default unless one is
        named ``default``)."""
        config = config or EngineConfig()
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        dirs = dict(index_dirs or {})
        if index_dir is not None:
            if DEFAULT_INDEX in dirs:
                raise ValueError(f"index {DEFAULT_INDEX!r} is given twice (index_dir and index_dirs)")
            dirs = {DEFAULT_INDEX: index_dir, **dirs}
        registry = IndexRegistry()
        device = resolve_device(config.device)
        for name, root in dirs.items():
            registry.add(load_index(name, root, fingerprint=ckpt.fingerprint, dim=ckpt.config.hidden_size,
                                    retriever=config.retriever, device=device,
                                    require_bm25=config.retrieval_mode == "hybrid", mmap=config.index_mmap))
        return cls(ckpt, config, indexes=registry)

    # ------------------------------------------------------------------ indexes
    @property
    def retriever(self) -> Retriever | None:
        """The default index's retriever (None without an index)."""
        return self.indexes.retriever(None)

    @retriever.setter
    def retriever(self, retriever: Retriever) -> None:
        name = self.indexes.default
        if name is None:
            self.indexes.add(LoadedIndex(DEFAULT_INDEX, retriever))
        else:
            self.indexes.entries[name].retriever = retriever

    @property
    def index(self) -> IndexStore | None:
        """The default index's opened version (None without an index, or for a bare retriever)."""
        entry = self.indexes.get(None)
        return entry.store if entry is not None else None

    def load_index(self, name: str) -> LoadedIndex:
        """Load the current version of index ``name``'s directory, checked like the one it would replace (same
        fingerprint and dimension; encoded in the served dtype or in the replaced version's). Any thread: it
        reads files and builds the retriever while the engine steps; ``swap_index`` then serves it. With hybrid
        as the default mode, a version without a BM25 side index is refused too."""
        old = self.indexes.entries.get(name)
        if old is None or old.store is None:
            raise ValueError(f"index {name!r} was not loaded from a directory: there is nothing to reload")
        accepted = tuple(dict.fromkeys(d for d in (self._served_dtype, old.store.manifest.encode_dtype) if d))
        return load_index(name, old.store.root, fingerprint=self.checkpoint.fingerprint,
                          dim=self.model.hidden_size, retriever=self.config.retriever, device=self.device,
                          accepted_dtypes=accepted, require_bm25=self.config.retrieval_mode == "hybrid",
                          mmap=self.config.index_mmap)

    def swap_index(self, entry: LoadedIndex) -> LoadedIndex:
        """Serve ``entry`` from the next step on (the engine's thread, between steps) and close the version it
        replaces, which no search can be using: searches run inside steps. Returns the replaced entry."""
        old = self.indexes.swap(entry)
        old.close()
        self._warn_index_dtype(entry)
        return old

    @property
    def _served_dtype(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _warn_index_dtype(self, entry: LoadedIndex) -> None:
        """Warn when an index was encoded in another dtype than the one served: query vectors then come from a
        slightly different computation than the document vectors they are compared with."""
        served = self._served_dtype
        encoded = entry.store.manifest.encode_dtype if entry.store is not None else None
        if encoded and encoded != served:
            log.warning("the index %s was encoded in %s but the engine serves in %s: queries and documents are "
                        "encoded differently (rebuild the index with --dtype %s, or serve with --dtype %s)",
                        entry.store.path, encoded, served, served, encoded)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.checkpoint.config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list | tuple):
                ids.update(int(i) for i in src)
        return ids

    # ------------------------------------------------------------------ input (any thread)
    def prepare_request(self, prompt: str | RequestInput | None = None, *, sampling: SamplingParams | None = None,
                        **given: Any) -> Rendered:
        """Render and check a request's input: ``prompt`` (text or a ``RequestInput``), or ``RequestInput``'s
        ``messages=`` / ``prompt_token_ids=``. Pure: safe to call from any thread (the server calls it off the
        engine thread, so tokenising a long prompt never delays a step). Raises ``ValueError`` /
        ``ContextLengthExceeded`` with a message that names the problem."""
        return self.inputs.request(RequestInput.of(prompt, **given), sampling)

    def prepare_queries(self, queries: list[str]) -> list[list[int]]:
        """Queries -> token ids (query template + query RET token), checked against the context. Any thread.

        ``InputTooLong`` names the query's position in ``queries``."""
        return self.inputs.queries(queries)

    # ------------------------------------------------------------------ requests (the engine's thread)
    def add_request(self, prompt: str | RequestInput | None = None, *, rendered: Rendered | None = None,
                    sampling: SamplingParams | None = None, retrieval: RetrievalParams | None = None,
                    request_id: str | None = None, **given: Any) -> str:
        """Queue a generation. Its input as ``prepare_request`` takes it, or ``rendered`` from ``prepare_request``
        (then the input is not tokenised again)."""
        sampling = sampling or SamplingParams()
        retrieval = retrieval or RetrievalParams()
        if rendered is None:
            rendered = self.prepare_request(prompt, sampling=sampling, **given)
        elif prompt is not None or any(v is not None for v in given.values()):
            raise ValueError("give either a prepared input or prompt / messages / prompt_token_ids, not both")
        request_id = self._new_request_id(request_id)
        resolved = RetrievalParams(
            enabled=retrieval.enabled and len(self.indexes) > 0,
            k=retrieval.k or self.default_k,
            max_retrievals=self.default_max_retrievals if retrieval.max_retrievals is None else retrieval.max_retrievals,
            return_passages=retrieval.return_passages,
            index=self.indexes.name_for(retrieval.index),  # UnknownIndex (a ValueError) names the served ones
            mode=self._mode(retrieval.mode, retrieval.index) if retrieval.enabled and self.indexes else "dense",
        )
        user_text = rendered.user_text
        if user_text is None and resolved.mode == "hybrid":  # token ids: what they say, as BM25 text
            user_text = self.tokenizer.decode(rendered.ids, skip_special_tokens=True)
        gen = None
        if sampling.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed)
        seq = Sequence(
            request_id=request_id,
            token_ids=list(rendered.ids),
            roles=list(rendered.roles),
            sampling=sampling,
            retrieval=resolved,
            detok=IncrementalDetokenizer(self.tokenizer, sampling.stop),
            generator=gen,
            user_text=user_text or "",
        )
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def add_search(
        self,
        queries: list[str] | None = None,
        *,
        query_token_ids: list[list[int]] | None = None,
        k: int = 10,
        return_text: bool = False,
        request_id: str | None = None,
        index: str | None = None,
        mode: str | None = None,
    ) -> str:
        """Queue queries to encode and search (``searches.py``). Each query is scheduled like a prompt (chunked
        under the step's token budget, interleaved with decoding); its vector is the hidden state at its query RET
        token. Ends with one ``SearchDone``. ``k=0`` returns the vectors only. ``query_token_ids`` from
        ``prepare_queries`` (given with ``queries``: theirs, not tokenised again). ``index``: the named index to
        search (None: the default). ``mode``: dense or hybrid, where BM25 searches each query string (None: the
        engine's default; hybrid needs ``queries``)."""
        if queries is None and query_token_ids is None:
            raise ValueError("give queries or query_token_ids")
        if query_token_ids is None:
            query_token_ids = self.prepare_queries(list(queries or []))
        elif queries is not None and len(queries) != len(query_token_ids):
            raise ValueError(f"{len(queries)} queries but {len(query_token_ids)} query_token_ids")
        if k > 0 and not self.indexes:
            raise ValueError("no index is loaded: start the engine with an index directory")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        texts = None
        if k > 0 and self._mode(mode, index) == "hybrid":
            if queries is None:
                raise ValueError("a hybrid search needs the query strings (BM25 searches them), not only their ids")
            texts = list(queries)
        index = self.indexes.name_for(index)
        request_id = self._new_request_id(request_id)
        for seq in self.searches.start(request_id, query_token_ids, k, return_text, index, texts):
            self.scheduler.add(seq)
        return request_id

    def _mode(self, mode: str | None, index: str | None) -> str:
        """The retrieval mode a request gets: its own or the engine's default; ``BM25UnavailableError`` (a
        ``ValueError``) names the index and what to run when it is hybrid and the index has no BM25 side index."""
        mode = mode or self.config.retrieval_mode
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"mode must be one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
        if mode == "hybrid":
            self.indexes.get(index).require_bm25()  # UnknownIndex first for an unknown name
        return mode

    def _new_request_id(self, request_id: str | None) -> str:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.sequences or request_id in self.searches:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def abort(self, request_id: str, error: str | None = None) -> bool:
        """Stop a request and free its KV cache now; its ``Finished(abort)`` (``SearchDone`` with an error, for
        a search) comes with the next step."""
        if request_id in self.searches:
            for seq in self.searches.abort(request_id, error or "aborted"):
                self.scheduler.finish(seq)
            return True
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return False
        seq.finish_reason = "abort"
        seq.finish_time = time.monotonic()
        if error is not None:
            seq.error = error
        self.scheduler.finish(seq)
        self._aborted.append(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or bool(self.searches.ended)

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_searches": len(self.searches),
            "kv_cache_usage": self.block_manager.usage,
            "num_kv_blocks": self.block_manager.num_blocks,
            "num_free_kv_blocks": self.block_manager.num_free,
            "num_preemptions": self.scheduler.num_preemptions,
            # prefix cache (kv_cache.py): tokens admissions found cached / had to compute, since start
            "prefix_cache_hit_tokens": self.block_manager.num_hit_tokens,
            "prefix_cache_miss_tokens": self.block_manager.num_miss_tokens,
            "num_cached_kv_blocks": self.block_manager.num_cached,  # registered: reusable by a later request
            "prefix_cache_evictions": self.block_manager.num_evictions,
            "num_steps": self.num_steps,
        }

    # ------------------------------------------------------------------ the step
    def step(self) -> list[EngineEvent]:
        events: list[EngineEvent] = [self._finished_event(s) for s in self._aborted] + self.searches.take_ended()
        self._aborted = []
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.waiting and not self.scheduler.running:  # cannot happen: admission checks sizes
                raise RuntimeError("scheduler made no progress with an empty running set")
            return events
        self.num_steps += 1
        self.last_step_tokens = sum(c.num_new_tokens for c in chunks)
        done = [c.seq for c in chunks if c.completes]  # in chunk order: the rows of the runner's output
        row = {s: i for i, s in enumerate(done)}
        generating = [s for s in done if s.search is None]
        encoded = [s for s in done if s.search is not None]
        to_search = [s for s in generating if s.pending_query is not None]
        vector_rows = [row[s] for s in encoded + to_search]
        sample_rows = [row[s] for s in generating] if len(generating) < len(done) else None
        extra = [torch.tensor(vector_rows, dtype=torch.long)] if vector_rows else []
        extra += [torch.tensor(sample_rows, dtype=torch.long)] if sample_rows is not None else []
        hidden, moved = self.runner.run(chunks, extra)  # one upload: the step's inputs and these row indices
        self.scheduler.postprocess(chunks)
        if vector_rows:
            vectors = self.runner.download(normalize(hidden.index_select(0, moved.pop(0))))
            events += self._store_vectors(encoded, vectors[: len(encoded)])
            events += self._retrieve(to_search, vectors[len(encoded):])
        # sample: sequences that did not search, annotate searches, and inserts that found nothing to insert
        searched = set(to_search)
        to_sample = {s for s in generating if not s.is_finished and (s not in searched or s.num_uncached == 0)}
        if to_sample:
            gen_hidden = hidden if sample_rows is None else hidden.index_select(0, moved.pop(0))
            events += self._sample(generating, gen_hidden, to_sample)
        for c in chunks:
            if c.seq.is_finished and c.seq.request_id in self.sequences:
                events.append(self._finished_event(c.seq))
        return events

    # ------------------------------------------------------------------ query vectors
    def _store_vectors(self, seqs: list[Sequence], vectors: torch.Tensor) -> list[EngineEvent]:
        """Encoded ``/retrieve`` queries: free them, hand their vectors to their jobs, queue the jobs' next queries."""
        for seq in seqs:
            self.scheduler.finish(seq)
        done, to_schedule = self.searches.store(seqs, vectors, self.indexes.get)
        for seq in to_schedule:
            self.scheduler.add(seq)
        return done

    def _retrieve(self, seqs: list[Sequence], queries: torch.Tensor) -> list[EngineEvent]:
        """Sequences at a query token: search the index each names and insert or annotate (``insertion.py``),
        one batched search per index; finish those it ended."""
        events: list[EngineEvent] = []
        for name in dict.fromkeys(s.retrieval.index for s in seqs):
            rows = [i for i, s in enumerate(seqs) if s.retrieval.index == name]
            group = [seqs[i] for i in rows]
            vectors = queries if len(rows) == len(seqs) else queries[torch.tensor(rows, dtype=torch.long)]
            events += self.inserter.retrieve(group, vectors, self.indexes.get(name))
        for seq in seqs:
            if seq.finish_reason is not None:
                self._finish(seq, seq.finish_reason)
        return events

    # ------------------------------------------------------------------ sampling
    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor, which: set[Sequence]) -> list[EngineEvent]:
        """Append a token to each sequence in ``which``: its forced token, or one sampled from its row of ``hidden``
        (one row per sequence of ``seqs``, in order; rows outside ``which`` are computed and ignored, which costs
        less than gathering the others on the device)."""
        forced: dict[Sequence, int] = {}
        for s in seqs:
            if s in which:
                t = s.forced_next if s.forced_next is not None else s.sampling.forced_tokens.get(len(s.output_ids))
                if t is not None:
                    forced[s] = t
                    s.forced_next = None
        new_tokens: dict[Sequence, tuple[int, float | None]] = {s: (t, None) for s, t in forced.items()}
        if len(forced) < len(which):
            logits = self.runner.compute_logits(hidden)  # [B, V] float32
            idle = SamplingRow(temperature=0.0, top_k=0, top_p=1.0, generator=None)  # a row nobody reads
            rows = [
                SamplingRow(
                    temperature=s.sampling.temperature, top_k=s.sampling.top_k, top_p=s.sampling.top_p,
                    generator=s.generator, may_retrieve=s.may_retrieve(), want_logprob=s.sampling.logprobs,
                ) if s in which and s not in forced else idle
                for s in seqs
            ]
            ids, lps = self.sampler(logits, rows)
            for s, t, lp in zip(seqs, ids, lps, strict=True):
                if s in which and s not in forced:
                    new_tokens[s] = (t, lp)
        now = time.monotonic()
        events: list[EngineEvent] = []
        for s in seqs:
            if s in new_tokens:
                t, lp = new_tokens[s]
                events.extend(self._append_token(s, t, lp, now))
        return events

    def _append_token(self, seq: Sequence, token: int, logprob: float | None, now: float) -> list[EngineEvent]:
        sp = seq.sampling
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.append([token], Role.GEN)
        seq.output_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob if logprob is not None else 0.0)
        is_query = token in self.token_ids.query
        if is_query and seq.may_retrieve():
            seq.pending_query = token
        seq.detok.add(token)
        reason = None
        if seq.detok.stopped:
            reason = "stop"
        elif (token in self.eos_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            seq.pending_query = None
        delta = seq.detok.take_delta(final=reason is not None)
        events: list[EngineEvent] = [TokenDelta(seq.request_id, [token], delta, [logprob] if sp.logprobs else None)]
        if reason is not None:
            self._finish(seq, reason)
        return events

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.finish_time = time.monotonic()
        self.scheduler.finish(seq)

    def _finished_event(self, seq: Sequence) -> Finished:
        self.sequences.pop(seq.request_id, None)
        return Finished(seq.request_id, seq.finish_reason or "abort", seq.result())
