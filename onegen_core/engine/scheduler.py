"""Continuous batching with chunked prefill and in-place extends.

Each step packs, under a token budget: one decode token for every running sequence
that needs one (these first, so a long prefill never holds back a stream), then the
uncached tail of running sequences that just had a passage inserted (an *extend*) or
are part-way through a prompt or a query encode, then prompt and query chunks of
waiting sequences. The budget bounds the work, and so the time, of any one step. When the KV cache is
full, the most recently admitted running sequence is preempted: its blocks are freed
and it goes back to the front of the waiting queue with all its tokens (prompt,
generated, inserted), to be recomputed later. Nothing is dropped.

A waiting sequence is *admitted* when it gets its first chunk: it shares the blocks of its
longest prefix found in the prefix cache (``BlockManager.lookup``) and computes from there,
so a shared system prompt, a resent conversation or a preempted sequence's own blocks
cost no budget. Every allocation registers the blocks its chunk fills, so a sequence
admitted later in the same step already shares them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .kv_cache import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int
    start: int  # == seq.num_cached_tokens when scheduled

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence (its last hidden state is needed)."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        decodes_first = sorted(self.running, key=lambda s: s.num_uncached != 1)  # stable: admission order kept
        scheduled: set[Sequence] = set()
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncached, budget)
            if n <= 0:
                continue
            while not self.blocks.can_allocate(seq.block_table, seq.num_cached_tokens + n):
                # the most recently admitted sequence not already in this step (else this one itself)
                victim = next((v for v in reversed(self.running) if v is not seq and v not in scheduled), seq)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq, seq.num_cached_tokens + n)
            chunks.append(ScheduledChunk(seq, n, seq.num_cached_tokens))
            scheduled.add(seq)
            budget -= n
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                hit = self.blocks.lookup(seq)  # its longest cached prefix: shared, not computed
                start = len(hit) * self.blocks.block_size
                n = min(seq.num_tokens - start, budget)
                if not self.blocks.can_admit(hit, start + n):
                    break
                self.waiting.popleft()
                self.blocks.admit(seq, hit)
                self.blocks.allocate(seq, start + n)
                seq.status = SequenceStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
                    seq.num_cached_prompt_tokens = min(start, seq.num_prompt_tokens)
                self.running.append(seq)
                chunks.append(ScheduledChunk(seq, n, seq.num_cached_tokens))
                budget -= n
        return chunks

    @staticmethod
    def postprocess(chunks: list[ScheduledChunk]) -> None:
        """After the forward: the scheduled tokens' K/V are in the cache."""
        for c in chunks:
            c.seq.num_cached_tokens += c.num_new_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = SequenceStatus.FINISHED
