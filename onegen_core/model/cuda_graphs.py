"""CUDA graphs for decode steps (flash-attn backend): capture once per batch size, replay per step.

A decode step runs the same kernels with the same shapes every time, so its launch
overhead — hundreds of small kernels for a small model — is paid once at capture.
All inputs live in static device buffers (token ids, positions, cache slots, context
lengths, block tables); a step of B sequences copies its inputs into the first B rows
and replays the graph captured for the smallest size >= B. Padding rows read and
write only a scratch KV block that the block manager never hands out, so they cannot
touch a real sequence's cache.

Only the ``flash`` backend is captured: its decode kernel (``flash_attn_with_kvcache``)
takes context lengths and block tables as tensors, so shapes do not change with
sequence length. The reference-equivalence test is ``tests/core/test_gpu.py``.
"""

from __future__ import annotations

import torch

from ..transfers import TransferCounter, upload
from .attention import AttentionMetadata


def capture_sizes(max_bs: int) -> list[int]:
    sizes = {s for s in (1, 2, 4, 8) if s <= max_bs} | set(range(16, max_bs + 1, 16)) | {max_bs}
    return sorted(sizes)


class DecodeGraphRunner:
    def __init__(self, model, kv_cache: tuple[torch.Tensor, torch.Tensor], *, max_bs: int, max_blocks: int,
                 block_size: int, scratch_block: int):
        dev = model.embed_tokens.weight.device
        assert dev.type == "cuda", "CUDA graphs need a CUDA model"
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_bs = max_bs
        self.sizes = capture_sizes(max_bs)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((max_bs,), scratch_block * block_size, dtype=torch.long, device=dev)
        self.ctx_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((max_bs, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(max_bs, model.hidden_size, dtype=model.embed_tokens.weight.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            q_lens=[1] * bs, ctx_lens=[1] * bs, positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs], ctx_lens_t=self.ctx_lens[:bs], backend="flash",
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            meta = self._meta(bs)
            self.hidden[:bs] = self.model(self.input_ids[:bs], meta, self.kv_cache)  # warm-up (lazy inits)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:bs] = self.model(self.input_ids[:bs], meta, self.kv_cache)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]],
            extra: list[torch.Tensor] = (), counter: TransferCounter | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One decode step for B sequences (token at ``positions[i]`` of sequence i) -> (hidden [B, d], ``extra``
        host tensors moved to the device in the same single upload)."""
        B = len(input_ids)
        bs = next(s for s in self.sizes if s >= B)
        host = decode_host_inputs(
            input_ids, positions, block_tables, padded_size=bs, max_blocks=self.block_tables.shape[1],
            block_size=self.block_size, scratch_block=self.scratch_block,
        )
        moved = upload([*host, *extra], self.input_ids.device, counter)
        for buf, t in zip((self.input_ids, self.positions, self.slot_mapping, self.ctx_lens, self.block_tables),
                          moved, strict=False):
            buf[:bs].copy_(t)  # device to device
        self.graphs[bs].replay()
        return self.hidden[:B], moved[len(host):]


def decode_host_inputs(
    input_ids: list[int], positions: list[int], block_tables: list[list[int]], *, padded_size: int, max_blocks: int,
    block_size: int, scratch_block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors for a padded decode step: ids, positions, cache slots, context lengths, block tables.

    Rows past ``len(input_ids)`` are padding: token 0 at position 0, writing and reading
    only the scratch block's first slot.
    """
    B = len(input_ids)
    pos = torch.zeros(padded_size, dtype=torch.long)
    pos[:B] = torch.tensor(positions, dtype=torch.long)
    bt = torch.full((padded_size, max_blocks), scratch_block, dtype=torch.int32)
    for i, t in enumerate(block_tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    slots = bt[torch.arange(padded_size), pos // block_size].long() * block_size + pos % block_size
    ids = torch.zeros(padded_size, dtype=torch.long)
    ids[:B] = torch.tensor(input_ids, dtype=torch.long)
    ctx = (pos + 1).to(torch.int32)
    return ids, pos, slots, ctx, bt
