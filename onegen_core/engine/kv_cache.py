"""The paged KV cache: one preallocated pool of fixed-size blocks shared by all sequences.

A sequence owns a block table (list of block ids); token ``p`` of it lives in slot
``block_table[p // block_size] * block_size + p % block_size``. Blocks are allocated
as a sequence grows (prompt chunks, decode tokens, inserted passages) and returned
when it finishes, is aborted or is preempted, so sequences of any length batch
together and an inserted passage is appended in place.
"""

from __future__ import annotations

import torch


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one KV block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks for a sequence that will hold ``num_tokens`` tokens in total."""
        need = (num_tokens + self.block_size - 1) // self.block_size
        return max(0, need - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= self.num_free

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        n = self.blocks_needed(block_table, num_tokens)
        assert n <= self.num_free, "caller must check can_allocate"
        for _ in range(n):
            block_table.append(self.free.pop())

    def release(self, block_table: list[int]) -> None:
        self.free.extend(reversed(block_table))
        block_table.clear()


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)  # [L, N, bs, Hkv, D]
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
