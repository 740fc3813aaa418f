"""Attention over a packed token stream with an optional paged KV cache.

Layout (nano-vllm style): the tokens of every sequence in a step are concatenated
into one stream of T tokens. Sequence i contributes ``q_len[i]`` new tokens whose
positions are ``ctx_len[i] - q_len[i] … ctx_len[i] - 1``; with a cache, its keys are
the first ``ctx_len[i]`` slots of its block table (the new tokens' K/V are written to
``slot_mapping`` first); without one (the encoder), its keys are its own new tokens.

Backends:

* ``sdpa`` (CPU and any GPU): sequences are grouped — decode rows (q_len == 1) in one
  padded call, prefill/extend rows padded together when little is wasted, else one
  call each — and run through ``F.scaled_dot_product_attention`` with an explicit
  bottom-right causal mask. Index tensors for the groups are built once per step
  (``build_attention_metadata``) and reused by every layer.
* ``flash`` (CUDA + flash-attn, block size a multiple of 256): ``flash_attn_varlen_func``
  with a block table for prefill/extend, ``flash_attn_with_kvcache`` for decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..transfers import TransferCounter, upload


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one padded SDPA call."""

    tok_idx: torch.Tensor  # [b*Qm] indices into the packed stream (padding -> 0)
    valid_rows: torch.Tensor  # [n_valid] positions in tok_idx of the real query rows
    out_idx: torch.Tensor  # [n_valid] packed indices of the real rows (= tok_idx[valid_rows])
    mask: torch.Tensor | None  # [b, 1, Qm, S] bool, True = attend; None when every row sees every key
    b: int
    q_max: int
    s_max: int
    block_tables: torch.Tensor | None = None  # [b, nblocks] (cache) …
    k_tok_idx: torch.Tensor | None = None  # [b*S] … or packed indices of keys (no cache)
    whole_stream: bool = False  # rows are the stream's tokens 0..T-1 in order, no padding: no gather/scatter
    _rep_masks: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def mask_for(self, rep: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask (0 / -inf) with each query row repeated ``rep`` times ([b, 1, rep*Qm, S]); built once
        per step and dtype, not once per layer."""
        if self.mask is None:
            return None
        if (rep, dtype) not in self._rep_masks:
            m = self.mask.repeat(1, 1, rep, 1) if rep > 1 else self.mask
            additive = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
            self._rep_masks[rep, dtype] = additive
        return self._rep_masks[rep, dtype]


@dataclass
class AttentionMetadata:
    q_lens: list[int]
    ctx_lens: list[int]
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor | None = None  # [T] int64 flat cache slots; None = no cache
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 (flash backend)
    cu_seqlens_q: torch.Tensor | None = None  # [B+1] int32 (flash backend)
    cu_seqlens_k: torch.Tensor | None = None
    ctx_lens_t: torch.Tensor | None = None  # [B] int32 (flash backend)
    groups: list[AttentionGroup] = field(default_factory=list)
    backend: str = "sdpa"

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.q_lens)

    def _tensor_fields(self) -> list[tuple[object, str]]:
        owners: list[tuple[object, tuple[str, ...]]] = [
            (self, ("positions", "slot_mapping", "block_tables", "cu_seqlens_q", "cu_seqlens_k", "ctx_lens_t"))]
        owners += [(g, ("tok_idx", "valid_rows", "out_idx", "mask", "block_tables", "k_tok_idx")) for g in self.groups]
        return [(o, n) for o, names in owners for n in names if getattr(o, n) is not None]

    def to_device(self, device: torch.device, extra: list[torch.Tensor] = (), counter: TransferCounter | None = None
                  ) -> list[torch.Tensor]:
        """Move every index tensor (and ``extra`` host tensors) to ``device`` in one copy; returns ``extra`` moved."""
        fields = self._tensor_fields()
        moved = upload([getattr(o, n) for o, n in fields] + list(extra), device, counter)
        for (o, n), t in zip(fields, moved, strict=False):
            setattr(o, n, t)
        return moved[len(fields):]


# Prefill rows share one padded SDPA call when padding adds at most this factor of attention work
# (else one call each). The length bucketer (onegen_core.model.bucketing) keeps batches on the one-call path.
MAX_PAD_WASTE = 1.5


def _pad_waste_ok(q_lens: list[int], ctx_lens: list[int]) -> bool:
    real = sum(q * c for q, c in zip(q_lens, ctx_lens, strict=True))
    padded = len(q_lens) * max(q_lens) * max(ctx_lens)
    return padded <= MAX_PAD_WASTE * real


def _make_group(
    rows: list[int], q_lens: list[int], ctx_lens: list[int], starts: list[int],
    block_tables: list[list[int]] | None, block_size: int, n_tokens: int,
) -> AttentionGroup:
    b = len(rows)
    q_max = max(q_lens[r] for r in rows)
    s_max = max(ctx_lens[r] for r in rows)
    tok_idx = torch.zeros(b, q_max, dtype=torch.long)
    valid = torch.zeros(b, q_max, dtype=torch.bool)
    q_pos = torch.zeros(b, q_max, dtype=torch.long)
    for j, r in enumerate(rows):
        ql, cl = q_lens[r], ctx_lens[r]
        tok_idx[j, :ql] = torch.arange(starts[r], starts[r] + ql)
        valid[j, :ql] = True
        q_pos[j, :ql] = torch.arange(cl - ql, cl)
    mask = (torch.arange(s_max)[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)  # [b, 1, Qm, S]
    tok_idx, valid = tok_idx.flatten(), valid.flatten()
    valid_rows = valid.nonzero().flatten()
    group = AttentionGroup(
        tok_idx=tok_idx, valid_rows=valid_rows, out_idx=tok_idx[valid_rows],
        mask=None if bool(mask.all()) else mask, b=b, q_max=q_max, s_max=s_max,
        # rows come in stream order, so a group of every token without padding is the stream itself
        whole_stream=bool(valid.all()) and len(tok_idx) == n_tokens,
    )
    if block_tables is not None:
        nb = (s_max + block_size - 1) // block_size
        bt = torch.zeros(b, nb, dtype=torch.long)
        for j, r in enumerate(rows):
            t = block_tables[r][:nb]
            bt[j, : len(t)] = torch.tensor(t, dtype=torch.long)
        group.block_tables = bt
    else:  # no cache: keys are the sequence's own new tokens (q_len == ctx_len)
        k_idx = torch.zeros(b, s_max, dtype=torch.long)
        for j, r in enumerate(rows):
            k_idx[j, : ctx_lens[r]] = torch.arange(starts[r], starts[r] + ctx_lens[r])
        group.k_tok_idx = k_idx.flatten()
    return group


def build_attention_metadata(q_lens: list[int], ctx_lens: list[int], *, device: torch.device | str = "cpu",
                             **layout: Any) -> AttentionMetadata:
    """``build_host_attention_metadata`` (``layout``: block tables, block size, backend), then uploaded to
    ``device`` in one copy: one step's attention index tensors, shared by every layer."""
    meta = build_host_attention_metadata(q_lens, ctx_lens, **layout)
    meta.to_device(torch.device(device))
    return meta


def build_host_attention_metadata(
    q_lens: list[int],
    ctx_lens: list[int],
    *,
    block_tables: list[list[int]] | None = None,
    block_size: int = 16,
    backend: str = "sdpa",
) -> AttentionMetadata:
    """The same, as host tensors: the caller moves them with ``to_device`` together with its own inputs."""
    assert len(q_lens) == len(ctx_lens) and all(0 < q <= c for q, c in zip(q_lens, ctx_lens, strict=True))
    starts, s = [], 0
    for q in q_lens:
        starts.append(s)
        s += q
    positions = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens, strict=True)])
    meta = AttentionMetadata(q_lens=q_lens, ctx_lens=ctx_lens, positions=positions, backend=backend)
    if block_tables is not None:
        slots = []
        for q, c, bt in zip(q_lens, ctx_lens, block_tables, strict=True):
            pos = torch.arange(c - q, c)
            blocks = torch.tensor(bt, dtype=torch.long)[pos // block_size]
            slots.append(blocks * block_size + pos % block_size)
        meta.slot_mapping = torch.cat(slots)
    else:
        assert all(q == c for q, c in zip(q_lens, ctx_lens, strict=True)), "without a cache every token is new"

    if backend == "flash":
        assert block_tables is not None
        nb = max(len(bt) for bt in block_tables)
        bt = torch.zeros(len(q_lens), nb, dtype=torch.int32)
        for i, t in enumerate(block_tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        meta.block_tables = bt
        meta.cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        meta.cu_seqlens_k = torch.tensor([0, *torch.tensor(ctx_lens).cumsum(0).tolist()], dtype=torch.int32)
        meta.ctx_lens_t = torch.tensor(ctx_lens, dtype=torch.int32)
        return meta

    decode = [i for i, q in enumerate(q_lens) if q == 1 and block_tables is not None]
    decode_set = set(decode)
    rest = [i for i in range(len(q_lens)) if i not in decode_set]
    if decode:
        meta.groups.append(_make_group(decode, q_lens, ctx_lens, starts, block_tables, block_size, s))
    if rest:
        if _pad_waste_ok([q_lens[i] for i in rest], [ctx_lens[i] for i in rest]):
            meta.groups.append(_make_group(rest, q_lens, ctx_lens, starts, block_tables, block_size, s))
        else:
            for i in rest:
                meta.groups.append(_make_group([i], q_lens, ctx_lens, starts, block_tables, block_size, s))
    return meta


def attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    meta: AttentionMetadata,
    k_cache: torch.Tensor | None,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    if k_cache is not None and meta.slot_mapping is not None:
        hkv, d = k.shape[1], k.shape[2]
        k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v)
    if meta.backend == "flash":
        return _flash_attention(q, k_cache, v_cache, meta, scale)
    out = None
    H, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    rep = H // Hkv
    for g in meta.groups:
        # GQA without copying K/V: the `rep` query heads sharing a KV head are folded into the query axis.
        qg = (q if g.whole_stream else q.index_select(0, g.tok_idx)).view(g.b, g.q_max, Hkv, rep, D)
        qg = qg.permute(0, 2, 3, 1, 4).reshape(g.b, Hkv, rep * g.q_max, D)  # [b, Hkv, rep*Qm, D]
        if g.block_tables is not None:
            nb = g.block_tables.shape[1]
            flat_bt = g.block_tables.flatten()
            kg = k_cache.index_select(0, flat_bt).view(g.b, nb * k_cache.shape[1], Hkv, D)[:, : g.s_max]
            vg = v_cache.index_select(0, flat_bt).view(g.b, nb * v_cache.shape[1], Hkv, D)[:, : g.s_max]
        else:
            kg = k.index_select(0, g.k_tok_idx).view(g.b, g.s_max, Hkv, D)
            vg = v.index_select(0, g.k_tok_idx).view(g.b, g.s_max, Hkv, D)
        og = F.scaled_dot_product_attention(
            qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=g.mask_for(rep, q.dtype), scale=scale
        )  # [b, Hkv, rep*Qm, D]
        og = og.view(g.b, Hkv, rep, g.q_max, D).permute(0, 3, 1, 2, 4).reshape(g.b * g.q_max, H, D)
        if g.whole_stream:
            return og
        if out is None:
            out = torch.empty_like(q)
        out.index_copy_(0, g.out_idx, og.index_select(0, g.valid_rows))
    return out


def _flash_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    if meta.is_decode:
        o = flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.ctx_lens_t, block_table=meta.block_tables,
            softmax_scale=scale, causal=True,
        )
        return o.squeeze(1)
    return flash_attn_varlen_func(
        q, k_cache, v_cache,
        cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
        max_seqlen_q=max(meta.q_lens), max_seqlen_k=max(meta.ctx_lens),
        softmax_scale=scale, causal=True, block_table=meta.block_tables,
    )
