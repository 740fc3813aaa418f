"""The paged KV cache: one preallocated pool of fixed-size blocks shared by all sequences, with prefix caching.

A sequence owns a block table (list of block ids); token ``p`` of it lives in slot
``block_table[p // block_size] * block_size + p % block_size``. Blocks are allocated
as a sequence grows (prompt chunks, decode tokens, inserted passages) and returned
when it finishes, is aborted or is preempted, so sequences of any length batch
together and an inserted passage is appended in place.

Automatic prefix caching (vLLM's design, nano-vllm's size): a block whose ``block_size``
tokens are all scheduled is *full* and gets a hash chained over the token ids of the
whole prefix up to its end (``block_hash``); a full block is registered under that hash
when its tokens are scheduled. A sequence being admitted looks its full blocks up in
order and shares the longest run found, by reference count, instead of computing them
again. Nothing else enters the hash, because nothing else changes a block's K/V within
one engine: its position is implied by the chain (block ``i``'s hash covers exactly
``i`` blocks before it), the model, its weights and dtype, the attention and linear
backends and the block size are fixed for the engine's lifetime (and the cache dies with
it), and token roles (GEN / CTX / RET) and the origin of a token (prompt, generated,
inserted passage, query encode) never reach the forward: only token ids and positions
do. So a passage inserted after ``[RQ]`` is cached like any other tokens.

A block's K/V may be read in the very step that writes it: the forward writes every new
token's K/V into the cache, layer by layer, before any attention of that layer reads the
cache. So a block is registered when scheduled, and a second request admitted in the same
step shares it. A sequence never writes into a shared block: it only writes positions at
or after its ``num_cached_tokens``, and every shared or registered block lies wholly
before that (a lookup stops one token short of the sequence's end, so at least its last
token is always computed, and its logits or hidden state exist).

When its last holder lets it go, a registered block keeps its K/V and its hash and waits
in ``evictable`` in least-recently-released order (a sequence's blocks go there tail first,
so a prefix is evicted from its end and what stays is still reachable). Unhashed blocks
(the partly filled last block of a sequence, a duplicate of a block already registered)
go back to ``free``. Allocation takes from ``free`` first and evicts the least recently
used cached block only when ``free`` is empty. ``num_free`` counts both: a cached block
costs nothing to reuse.

The hash is SHA-256, so that one user cannot craft a prompt whose blocks collide with
another's and read their K/V.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: its parent's hash (``b""`` for a sequence's first block) and its token ids."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one KV block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # unhashed, unused; pop() hands out low ids first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; least recently released first
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks  # the hash a block is registered under
        self.cached: dict[bytes, int] = {}  # hash -> block id, for every registered block (in use or evictable)
        # counters since start, in tokens: what admissions found in the cache, and what they had to compute
        self.num_hit_tokens = 0
        self.num_miss_tokens = 0
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: unused ones and cached ones that no sequence holds."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, held by a sequence or not."""
        return len(self.cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks for a sequence that will hold ``num_tokens`` tokens in total."""
        need = (num_tokens + self.block_size - 1) // self.block_size
        return max(0, need - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for ``seq`` to hold ``num_tokens`` tokens, the next ones scheduled from ``seq.num_cached_tokens``;
        the blocks those tokens fill are registered in the prefix cache."""
        n = self.blocks_needed(seq.block_table, num_tokens)
        assert n <= self.num_free, "caller must check can_allocate"
        for _ in range(n):
            seq.block_table.append(self._take_unused())
        if self.enable_caching:
            self._register(seq, seq.num_cached_tokens // self.block_size, num_tokens // self.block_size)

    def release(self, block_table: list[int]) -> None:
        """Let a sequence's blocks go: the last holder of a registered block leaves it cached, evictable."""
        for b in reversed(block_table):  # tail first: evicted first
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} released more often than taken"
            if self.ref_counts[b] == 0:
                if self.block_hashes[b] is None:
                    self.free.append(b)
                else:
                    self.evictable[b] = None
        block_table.clear()

    # ------------------------------------------------------------------ admission
    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks of ``seq``'s longest cached prefix, in order, short of its last token (which is always
        computed). Takes nothing: ``admit`` does."""
        if not self.enable_caching:
            return []
        n = (seq.num_tokens - 1) // self.block_size
        self._hash_blocks(seq, n)
        hit: list[int] = []
        for h in seq.block_hashes[:n]:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def can_admit(self, hit: list[int], num_tokens: int) -> bool:
        """Whether a sequence sharing the blocks ``hit`` can then hold ``num_tokens`` tokens. Shared blocks that
        wait in ``evictable`` stop being allocatable once shared."""
        waiting = sum(1 for b in hit if self.ref_counts[b] == 0)
        return self.blocks_needed(hit, num_tokens) <= self.num_free - waiting

    def admit(self, seq: Sequence, hit: list[int]) -> None:
        """Share ``hit`` (from ``lookup``) with ``seq``, which holds no blocks yet: its first ``len(hit)`` blocks
        are cached, and its computation starts after them."""
        assert not seq.block_table and seq.num_cached_tokens == 0, "admission starts from an empty block table"
        for b in hit:
            if self.ref_counts[b] == 0:
                del self.evictable[b]
            self.ref_counts[b] += 1
        seq.block_table.extend(hit)
        seq.num_cached_tokens = len(hit) * self.block_size
        self.num_hit_tokens += seq.num_cached_tokens
        self.num_miss_tokens += seq.num_tokens - seq.num_cached_tokens

    # ------------------------------------------------------------------ internals
    def _take_unused(self) -> int:
        """An unheld block: an unregistered one if any, else the least recently used cached one (evicted)."""
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hashes[b]]
            self.block_hashes[b] = None
            self.num_evictions += 1
        self.ref_counts[b] = 1
        return b

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend ``seq.block_hashes`` to its first ``num_blocks`` full blocks. Each is computed once and kept on the
        sequence: its tokens are only ever appended, so the hashes stay valid, preemption included."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(block_hash(hashes[i - 1] if i else b"", seq.token_ids[i * bs : (i + 1) * bs]))

    def _register(self, seq: Sequence, first: int, end: int) -> None:
        """Register ``seq``'s blocks ``first`` .. ``end - 1``, full once the tokens now scheduled are computed. A block
        whose hash is already registered (two sequences computed the same prefix at once) stays unregistered."""
        self._hash_blocks(seq, end)
        hashes = seq.block_hashes
        for i in range(first, end):
            b = seq.block_table[i]
            if hashes[i] not in self.cached and self.block_hashes[b] is None:
                self.cached[hashes[i]] = b
                self.block_hashes[b] = hashes[i]


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)  # [L, N, bs, Hkv, D]
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
