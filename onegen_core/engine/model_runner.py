"""The model runner: scheduled chunks in, final-layer hidden states out.

It owns everything that touches the device: the model (weights, attention and
linear backends), the paged KV cache (sized here from the memory budget) and the
CUDA graphs for decode steps. A step is one packed forward over every scheduled
chunk — decode tokens, prompt chunks, inserted passages (extends), query encodes —
and returns the hidden state of each chunk that reaches its sequence's end: what the
engine samples from, searches with, or stores as a query vector.

Its inputs (token ids, positions, cache slots, attention index tensors, the rows to
gather) are built on the host and sent in one upload (``onegen_core.transfers``). It reads
sequences and never changes them: advancing ``num_cached_tokens`` is the scheduler's
post-step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..formats.checkpoint import Checkpoint
from ..model import build_model
from ..model.attention import build_host_attention_metadata
from ..transfers import TransferCounter, download
from .engine_config import EngineConfig
from .kv_cache import allocate_kv_cache, kv_bytes_per_block

if TYPE_CHECKING:
    from .scheduler import ScheduledChunk

log = logging.getLogger(__name__)


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def model_context_length(checkpoint: Checkpoint, max_model_len: int | None) -> int:
    """The longest sequence the model may see: ``max_model_len`` if given, within the model's own context."""
    model_max = checkpoint.config.max_position_embeddings
    sliding = getattr(checkpoint.config, "sliding_window", None)
    if sliding and getattr(checkpoint.config, "use_sliding_window", True):
        model_max = min(model_max, sliding)  # within the window, sliding attention == full attention
    if max_model_len is not None and max_model_len > model_max:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {model_max}")
    return max_model_len or model_max


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.transfers = TransferCounter()
        max_len = model_context_length(checkpoint, config.max_model_len)

        self.backend = config.attention_backend
        if self.backend == "auto":
            use_flash = device.type == "cuda" and _flash_available() and config.block_size % 256 == 0
            self.backend = "flash" if use_flash else "sdpa"
        if self.backend == "flash" and config.block_size % 256:
            raise ValueError("the flash attention backend needs block_size to be a multiple of 256")

        self.model = m = build_model(checkpoint, dtype, device, max_positions=max_len,
                                     linear_backend=config.linear_backend)
        n_layers = len(m.layers)
        per_block = kv_bytes_per_block(n_layers, config.block_size, m.num_kv_heads, m.head_dim, dtype)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = free * config.gpu_memory_utilization - 512 * 2**20  # room for activations
            else:
                budget = config.kv_cache_memory_gb * 2**30
            useful = config.max_num_seqs * ((max_len + config.block_size - 1) // config.block_size)
            num_blocks = max(1, min(int(budget // per_block), useful))
        self.num_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(n_layers, num_blocks, config.block_size, m.num_kv_heads, m.head_dim,
                                          dtype, device)
        use_graphs = config.cuda_graphs and device.type == "cuda" and self.backend == "flash"
        if config.cuda_graphs and not use_graphs:
            log.warning("cuda_graphs needs a CUDA device and the flash attention backend; running eagerly")
        # the KV blocks the scheduler may hand out: with graphs, the last block is their padding rows' scratch
        self.usable_blocks = num_blocks - 1 if use_graphs else num_blocks
        if self.usable_blocks < 1:
            raise ValueError("the KV cache needs at least 2 blocks with cuda_graphs")
        self.max_model_len = min(max_len, self.usable_blocks * config.block_size)
        self.graph_runner = None
        if use_graphs:
            from ..model.cuda_graphs import DecodeGraphRunner

            self.graph_runner = DecodeGraphRunner(
                m, self.kv_cache, max_bs=config.max_num_seqs,
                max_blocks=(self.max_model_len + config.block_size - 1) // config.block_size,
                block_size=config.block_size, scratch_block=num_blocks - 1,
            )

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], extra: list[torch.Tensor] = ()
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One packed forward -> (hidden states [n, d] of the chunks that complete their sequence, in chunk order;
        ``extra`` host tensors moved to the device in the same upload as the step's inputs)."""
        ids: list[int] = []
        ends: list[int] = []
        for c in chunks:
            ids.extend(c.seq.token_ids[c.start : c.start + c.num_new_tokens])
            if c.completes:
                ends.append(len(ids) - 1)
        ends_host = torch.tensor(ends, dtype=torch.long)
        block_tables = [c.seq.block_table for c in chunks]
        if self.graph_runner is not None and len(ids) == len(chunks) and self.graph_runner.can_run(len(chunks)):
            # decode: replay a captured graph
            hidden, moved = self.graph_runner.run(ids, [c.start for c in chunks], block_tables,
                                                  extra=[ends_host, *extra], counter=self.transfers)
        else:
            meta = build_host_attention_metadata(
                [c.num_new_tokens for c in chunks], [c.start + c.num_new_tokens for c in chunks],
                block_tables=block_tables, block_size=self.block_size, backend=self.backend,
            )
            input_ids, *moved = meta.to_device(self.device, [torch.tensor(ids, dtype=torch.long), ends_host, *extra],
                                               self.transfers)
            hidden = self.model(input_ids, meta, self.kv_cache)  # [T, d]
        ends_dev, *extra_dev = moved
        return hidden.index_select(0, ends_dev), extra_dev

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def download(self, t: torch.Tensor) -> torch.Tensor:
        return download(t, self.transfers)
