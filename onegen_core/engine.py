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

Not thread-safe: one thread owns an engine (the server's worker thread).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, load_checkpoint
from .detokenizer import IncrementalDetokenizer
from .encoder import Encoder, normalize, resolve_device, resolve_dtype
from .index_store import IndexStore
from .kv_cache import BlockManager, allocate_kv_cache, kv_bytes_per_block
from .model import build_attention_metadata, build_model
from .model.linear import BACKENDS as LINEAR_BACKENDS
from .outputs import (
    EngineEvent,
    Finished,
    GenerationResult,
    RetrievalEvent,
    RetrievalHit,
    RetrievalRecord,
    TokenDelta,
)
from .params import RetrievalParams, SamplingParams
from .rendering import Renderer
from .retriever import FaissRetriever, Retriever, TorchRetriever
from .roles import Role
from .sampler import Sampler, SamplingRow
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


class ContextLengthExceeded(ValueError):
    """The prompt does not fit the model's context (``max_model_len``)."""

    code = "context_length_exceeded"


@dataclass
class EngineConfig:
    dtype: str = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    device: str = "auto"
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 2048  # tokens per forward (decode + prefill chunks + extends)
    block_size: int = 16  # KV cache block; 256 with flash-attn
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_gb (CPU) / gpu_memory_utilization (GPU)
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    retriever: str = "auto"  # auto | faiss | torch (torch = exact matmul on the model's device)
    attention_backend: str = "auto"  # auto | sdpa | flash
    linear_backend: str = "auto"  # auto | aten | onednn (auto: oneDNN-prepacked weights on CPU, see model/linear.py)
    seed: int = 0  # engine RNG for requests without a seed
    # Replay captured CUDA graphs for decode steps (CUDA + flash backend only). Off until verified on a GPU.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.retriever not in ("auto", "faiss", "torch"):
            raise ValueError(f"retriever must be auto, faiss or torch, got {self.retriever!r}")
        if self.attention_backend not in ("auto", "sdpa", "flash"):
            raise ValueError(f"attention_backend must be auto, sdpa or flash, got {self.attention_backend!r}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {self.linear_backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class Engine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, retriever: Retriever | None = None,
                 index: IndexStore | None = None):
        self.config = config = config or EngineConfig()
        self.checkpoint = checkpoint
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.index = index
        self.retriever = retriever
        self.tokenizer = checkpoint.tokenizer
        self.renderer = Renderer.for_checkpoint(checkpoint)
        self.token_ids = checkpoint.token_ids
        spec = checkpoint.spec

        model_max = checkpoint.config.max_position_embeddings
        sliding = getattr(checkpoint.config, "sliding_window", None)
        if sliding and getattr(checkpoint.config, "use_sliding_window", True):
            model_max = min(model_max, sliding)  # within the window, sliding attention == full attention
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {model_max}")
        max_len = config.max_model_len or model_max

        self.backend = config.attention_backend
        if self.backend == "auto":
            self.backend = "flash" if self.device.type == "cuda" and _flash_available() and config.block_size % 256 == 0 else "sdpa"
        if self.backend == "flash" and config.block_size % 256:
            raise ValueError("the flash attention backend needs block_size to be a multiple of 256")

        self.model = build_model(checkpoint, self.dtype, self.device, max_positions=max_len,
                                 linear_backend=config.linear_backend)
        m = self.model
        n_layers = len(m.layers)
        per_block = kv_bytes_per_block(n_layers, config.block_size, m.num_kv_heads, m.head_dim, self.dtype)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = free * config.gpu_memory_utilization - 512 * 2**20  # room for activations
            else:
                budget = config.kv_cache_memory_gb * 2**30
            useful = config.max_num_seqs * ((max_len + config.block_size - 1) // config.block_size)
            num_blocks = max(1, min(int(budget // per_block), useful))
        self.kv_cache = allocate_kv_cache(n_layers, num_blocks, config.block_size, m.num_kv_heads, m.head_dim,
                                          self.dtype, self.device)
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and self.backend == "flash"
        if config.cuda_graphs and not use_graphs:
            log.warning("cuda_graphs needs a CUDA device and the flash attention backend; running eagerly")
        usable_blocks = num_blocks - 1 if use_graphs else num_blocks  # the last block is the graphs' scratch
        if usable_blocks < 1:
            raise ValueError("the KV cache needs at least 2 blocks with cuda_graphs")
        self.max_model_len = min(max_len, usable_blocks * config.block_size)
        self.block_manager = BlockManager(usable_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        banned = [self.token_ids.document, self.token_ids.passage_open, self.token_ids.passage_close]
        banned += list(self.token_ids.follow_up.values())  # only ever forced
        self.sampler = Sampler(m.vocab_size, banned, self.device, seed=config.seed)
        self.encoder = Encoder(checkpoint, m, self.device, self.max_model_len)
        self.eos_ids = self._eos_ids()
        self.sequences: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self.default_k = spec.retrieval.k
        self.default_max_retrievals = spec.retrieval.max_retrievals
        self.num_steps = 0
        self.graph_runner = None
        if use_graphs:
            from .model.cuda_graphs import DecodeGraphRunner

            self.graph_runner = DecodeGraphRunner(
                m, self.kv_cache, max_bs=config.max_num_seqs,
                max_blocks=(self.max_model_len + config.block_size - 1) // config.block_size,
                block_size=config.block_size, scratch_block=num_blocks - 1,
            )
        log.info("engine ready: %s %s on %s, %d KV blocks x %d, max_model_len %d, attention %s, linear %s",
                 checkpoint.model_type, self.dtype, self.device, num_blocks, config.block_size, self.max_model_len,
                 self.backend, m.linear_backend)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | Checkpoint, index_dir: str | Path | None = None,
                        config: EngineConfig | None = None) -> Engine:
        """Load a checkpoint and (optionally) an index dir whose fingerprint must match it."""
        config = config or EngineConfig()
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        store = retriever = None
        if index_dir is not None:
            store = IndexStore.open(index_dir, expected_fingerprint=ckpt.fingerprint)
            dev = resolve_device(config.device)
            flat = store.manifest.factory.replace("IDMap,", "") == "Flat"
            use_torch = config.retriever == "torch" or (config.retriever == "auto" and flat and dev.type == "cuda")
            if use_torch:
                retriever = TorchRetriever.from_index(store, device=dev)
            else:
                retriever = FaissRetriever(store)
        return cls(ckpt, config, retriever=retriever, index=store)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.checkpoint.config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list | tuple):
                ids.update(int(i) for i in src)
        return ids

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        retrieval: RetrievalParams | None = None,
        request_id: str | None = None,
    ) -> str:
        sampling = sampling or SamplingParams()
        retrieval = retrieval or RetrievalParams()
        given = sum(x is not None for x in (prompt, messages, prompt_token_ids))
        if given != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if prompt is not None:
            rendered = self.renderer.prompt(prompt)
        elif messages is not None:
            rendered = self.renderer.chat(messages)
        else:
            ids = list(prompt_token_ids or [])
            bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside the vocabulary (0..{self.model.vocab_size - 1}): {bad[:5]}")
            rendered = self.renderer.prompt_ids(ids)
        bad_forced = [t for t in sampling.forced_tokens.values() if t >= self.model.vocab_size]
        if bad_forced:
            raise ValueError(f"forced_tokens has ids outside the vocabulary (0..{self.model.vocab_size - 1}): "
                             f"{bad_forced[:5]}")
        if len(rendered) == 0:
            raise ValueError("the prompt is empty")
        if len(rendered) >= self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(rendered)} tokens; this model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token)"
            )
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        resolved = RetrievalParams(
            enabled=retrieval.enabled and self.retriever is not None,
            k=retrieval.k or self.default_k,
            max_retrievals=self.default_max_retrievals if retrieval.max_retrievals is None else retrieval.max_retrievals,
            return_passages=retrieval.return_passages,
        )
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
        )
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV cache now; its ``Finished(abort)`` comes with the next step."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return False
        seq.finish_reason = "abort"
        seq.finish_time = time.monotonic()
        self.scheduler.finish(seq)
        self._aborted.append(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage,
            "num_kv_blocks": self.block_manager.num_blocks,
            "num_free_kv_blocks": self.block_manager.num_free,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
        }

    # ------------------------------------------------------------------ the step
    def step(self) -> list[EngineEvent]:
        events: list[EngineEvent] = [self._finished_event(s) for s in self._aborted]
        self._aborted.clear()
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.waiting and not self.scheduler.running:  # cannot happen: admission checks sizes
                raise RuntimeError("scheduler made no progress with an empty running set")
            return events
        self.num_steps += 1
        hidden = self._run_model(chunks)
        done = [c for c in chunks if c.completes]
        to_search = [c.seq for c in done if c.seq.pending_query is not None]
        to_sample = [c.seq for c in done if c.seq.pending_query is None or self._action(c.seq) == "annotate"]
        idx = {c.seq: i for i, c in enumerate(done)}
        events += self._retrieve(to_search, hidden[[idx[s] for s in to_search]] if to_search else None)
        # an insert that found nothing to insert samples from the query token's own logits
        to_sample += [s for s in to_search if s.num_uncached == 0 and s not in to_sample]
        to_sample = [s for s in to_sample if not s.is_finished]
        if to_sample:
            events += self._sample(to_sample, hidden[[idx[s] for s in to_sample]])
        for c in chunks:
            if c.seq.is_finished and c.seq.request_id in self.sequences:
                events.append(self._finished_event(c.seq))
        return events

    @torch.inference_mode()
    def _run_model(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """One packed forward; returns the hidden states of the chunks that reach their sequence's end."""
        ids: list[int] = []
        for c in chunks:
            ids.extend(c.seq.token_ids[c.start : c.start + c.num_new_tokens])
        q_lens = [c.num_new_tokens for c in chunks]
        ctx_lens = [c.start + c.num_new_tokens for c in chunks]
        block_tables = [c.seq.block_table for c in chunks]
        if self.graph_runner is not None and len(ids) == len(chunks) and self.graph_runner.can_run(len(chunks)):
            hidden = self.graph_runner.run(ids, [c.start for c in chunks], block_tables)  # decode: replay a graph
        else:
            meta = build_attention_metadata(
                q_lens, ctx_lens, block_tables=block_tables,
                block_size=self.config.block_size, device=self.device, backend=self.backend,
            )
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            hidden = self.model(input_ids, meta, self.kv_cache)  # [T, d]
        ends = []
        pos = 0
        for c in chunks:
            pos += c.num_new_tokens
            c.seq.num_cached_tokens += c.num_new_tokens
            if c.completes:
                ends.append(pos - 1)
        return hidden[torch.tensor(ends, dtype=torch.long, device=self.device)] if ends else hidden[:0]

    def _action(self, seq: Sequence) -> str:
        return self.token_ids.query[seq.pending_query].action

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, seqs: list[Sequence], hidden: torch.Tensor | None) -> list[EngineEvent]:
        if not seqs:
            return []
        assert self.retriever is not None
        queries = normalize(hidden)  # [n, d] the query vectors: final-layer hidden state at the RET token
        k = max(s.retrieval.k for s in seqs)
        t0 = time.perf_counter()
        try:
            all_hits = self.retriever.search(queries, k)
            if len(all_hits) != len(seqs):
                raise RuntimeError(f"the retriever returned {len(all_hits)} hit lists for {len(seqs)} queries")
        except Exception as e:  # noqa: BLE001 - a failed search (FAISS, a corrupt docstore row) fails its batch only
            return self._fail_search(seqs, e)
        search_ms = (time.perf_counter() - t0) * 1000.0
        events: list[EngineEvent] = []
        for seq, hits in zip(seqs, all_hits, strict=True):
            hits = hits[: seq.retrieval.k]
            qid = seq.pending_query
            qdef = self.token_ids.query[qid]
            seq.pending_query = None
            record = RetrievalRecord(
                query_token=qdef.token, action=qdef.action, output_token_index=len(seq.output_ids) - 1,
                output_text_offset=len(seq.detok.text), search_ms=search_ms,
            )
            if qdef.action == "insert":
                inserted: list[int] = []
                kept: list[RetrievalHit] = []
                room = self.max_model_len - seq.num_tokens - 1  # leave room to generate at least one token
                for h in hits:
                    ids = self.renderer.passage(h.text or "", h.title)
                    if len(inserted) + len(ids) > room:
                        break
                    inserted.extend(ids)
                    kept.append(h)
                if hits and not kept:
                    seq.finish_reason = "length"  # no passage fits the remaining context
                seq.append(inserted, Role.CTX)
                seq.num_retrieved_tokens += len(inserted)
                record.inserted_tokens = len(inserted)
                hits = kept
            elif qid in self.token_ids.follow_up:
                seq.forced_next = self.token_ids.follow_up[qid]
            record.hits = [
                RetrievalHit(h.doc_id, h.score, h.vector_id, h.title,
                             h.text if seq.retrieval.return_passages else None, h.metadata)
                for h in hits
            ]
            seq.trace.append(record)
            events.append(RetrievalEvent(seq.request_id, record))
            if seq.finish_reason is not None:
                self._finish(seq, seq.finish_reason)
        return events

    def _fail_search(self, seqs: list[Sequence], error: Exception) -> list[EngineEvent]:
        """Finish every sequence of a failed search with ``finish_reason="error"``; the engine keeps serving.

        Their ``Finished`` events come from ``step`` (each chunk's sequence is finished), and
        ``GenerationResult.error`` says what failed, for the server to report.
        """
        ids = [s.request_id for s in seqs]
        log.error("retrieval failed for %d request(s) %s: %s: %s", len(seqs), ids, type(error).__name__, error,
                  exc_info=error)
        for seq in seqs:
            seq.pending_query = None
            seq.error = f"retrieval failed: {type(error).__name__}: {error}"
            self._finish(seq, "error")
        return []

    # ------------------------------------------------------------------ sampling
    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        new_tokens: dict[Sequence, tuple[int, float | None]] = {}
        for s in seqs:
            forced = s.forced_next if s.forced_next is not None else s.sampling.forced_tokens.get(len(s.output_ids))
            if forced is not None:
                new_tokens[s] = (forced, None)
                s.forced_next = None
        free_rows = [i for i, s in enumerate(seqs) if s not in new_tokens]  # rows of ``hidden`` to sample
        free = [seqs[i] for i in free_rows]
        if free:
            rows_h = hidden[free_rows]
            logits = self.model.compute_logits(rows_h)  # [B, V] float32
            query_ids = self.token_ids.query_ids
            rows = [
                SamplingRow(
                    temperature=s.sampling.temperature, top_k=s.sampling.top_k, top_p=s.sampling.top_p,
                    generator=s.generator, banned=[] if s.may_retrieve() else query_ids,
                    want_logprob=s.sampling.logprobs,
                )
                for s in free
            ]
            ids, lps = self.sampler(logits, rows)
            for s, t, lp in zip(free, ids, lps, strict=True):
                new_tokens[s] = (t, lp)
        now = time.monotonic()
        for s in seqs:
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

    # ------------------------------------------------------------------ conveniences
    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        retrieval: RetrievalParams | None = None,
        *,
        messages: list[list[dict[str, str]]] | None = None,
    ) -> list[GenerationResult]:
        """Blocking batch generation for scripts and tests: results in input order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        inputs: list[dict[str, Any]] = [{"prompt": p} for p in prompts or []] + [{"messages": m} for m in messages or []]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(inputs)
        ids = [self.add_request(**inp, sampling=sp, retrieval=retrieval) for inp, sp in zip(inputs, params, strict=True)]
        results: dict[str, GenerationResult] = {}
        while len(results) < len(ids):
            for ev in self.step():
                if isinstance(ev, Finished):
                    results[ev.request_id] = ev.result
        return [results[i] for i in ids]

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return self.encoder.encode_queries(queries)

    def search(self, queries: list[str], k: int, return_text: bool = False) -> list[list[RetrievalHit]]:
        """Encode queries with the model (query template + query RET token) and search the index."""
        if self.retriever is None:
            raise ValueError("no index is loaded: start the engine with an index directory")
        if not queries:
            return []
        vecs = self.encoder.encode_queries(queries)
        hits = self.retriever.search(vecs, k)
        if not return_text:
            for row in hits:
                for h in row:
                    h.text = None
        return hits
