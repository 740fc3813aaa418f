"""The standalone encoder: documents and queries to L2-normalised vectors, outside the engine.

A document is rendered as ``document template + [RD]`` and a query as
``query template + [RQ]`` (``rendering.Renderer``); its vector is the final-layer
hidden state (after the last norm) at that RET token, L2-normalised (``normalize``).
The index builder encodes corpora with it (``Encoder.encode_sorted``: length buckets
from ``bucketing``, packed without padding), and so do ``python -m index_builder
search`` / ``verify``, the demo index (``server.demo``) and the tests' references.

The engine does not encode through it: in-flight queries and ``/retrieve`` queries are
encoded in the engine's own steps, by its model runner. Both run the same native forward
(``onegen_core.model``), the same rendering and ``normalize``, which is what makes an
index built here match the engine's queries; ``tests/core/test_scheduled_encodes.py``
holds the two equal. ``InputTooLong`` is the engine's error too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device, resolve_dtype
from ..formats.checkpoint import Checkpoint, load_checkpoint
from ..model import build_attention_metadata, build_model
from ..model.bucketing import length_buckets
from ..text.rendering import Renderer


def normalize(h: torch.Tensor) -> torch.Tensor:
    """[N, d] hidden states -> float32 unit vectors (the metric is inner product on these)."""
    return F.normalize(h.float(), p=2.0, dim=-1)


class InputTooLong(ValueError):
    """A document or query whose rendering does not fit the model's context.

    ``kind`` is ``"document"`` or ``"query"`` and ``index`` its position in the caller's list (not in the
    length-sorted order the encoder batches in), so an HTTP route can name the offending field.
    """

    def __init__(self, kind: str, index: int, n_tokens: int, max_length: int):
        advice = ("shorten the query" if kind == "query"
                  else "chunk long documents first (python -m index_builder build --chunk-tokens N)")
        super().__init__(f"{kind} {index} has {n_tokens} tokens once rendered, more than the model's maximum of "
                         f"{max_length}; {advice}")
        self.kind = kind
        self.index = index
        self.n_tokens = n_tokens
        self.max_length = max_length


class Encoder:
    """A checkpoint's model on one device, encoding token sequences at chosen positions."""

    def __init__(self, checkpoint: Checkpoint, model: Any, device: torch.device, max_length: int):
        self.checkpoint = checkpoint
        self.model = model
        self.device = device
        self.max_length = max_length
        self.renderer = Renderer.for_checkpoint(checkpoint)
        self.dim = model.hidden_size

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Checkpoint, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
        max_length: int | None = None,
    ) -> Encoder:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        dev = resolve_device(device)
        model = build_model(ckpt, resolve_dtype(dtype, dev), dev)
        return cls(ckpt, model, dev, max_length or ckpt.config.max_position_embeddings)

    def encode_token_ids(self, seqs: Sequence[Sequence[int]], *, batch_tokens: int = 8192) -> torch.Tensor:
        """Hidden state at each sequence's last token, normalised: [n, d] float32 on the CPU.

        Sequences are packed in the given order into batches of at most ``batch_tokens``
        tokens (``encode_sorted`` buckets them by length first, to waste little padding).
        """
        return self.encode_at_positions(seqs, [[len(s) - 1] for s in seqs], batch_tokens=batch_tokens)

    @torch.inference_mode()
    def encode_at_positions(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], *,
                            batch_tokens: int = 8192) -> torch.Tensor:
        """Hidden states at ``positions[i]`` of each sequence ``seqs[i]``, normalised: [sum of counts, d] float32.

        Rows come in order: sequence by sequence, each position in the order given. One forward per
        batch computes every position of a sequence (the units of a OneGen entry, ``documents``), so
        unit *k* is encoded after units 0 .. k-1 exactly as training encodes it. Sequences are packed
        in the given order into batches of at most ``batch_tokens`` tokens.
        """
        if len(positions) != len(seqs):
            raise ValueError(f"{len(seqs)} sequences but {len(positions)} position lists")
        for i, (s, ps) in enumerate(zip(seqs, positions, strict=True)):  # i: the position in ``seqs``
            if len(s) == 0:
                raise ValueError(f"sequence {i} of this batch is empty")
            if len(s) > self.max_length:
                raise ValueError(
                    f"sequence {i} of this batch has {len(s)} tokens, more than the model's maximum of "
                    f"{self.max_length}"
                )
            if any(not 0 <= p < len(s) for p in ps):
                raise ValueError(f"sequence {i} of this batch has {len(s)} tokens: positions {list(ps)} lie outside")
        out = torch.empty(sum(len(ps) for ps in positions), self.dim, dtype=torch.float32)
        i = row = 0
        while i < len(seqs):
            j, tokens = i, 0
            while j < len(seqs) and (j == i or tokens + len(seqs[j]) <= batch_tokens):
                tokens += len(seqs[j])
                j += 1
            lens = [len(s) for s in seqs[i:j]]
            ids = torch.tensor([t for s in seqs[i:j] for t in s], dtype=torch.long, device=self.device)
            meta = build_attention_metadata(lens, lens, device=self.device)
            hidden = self.model(ids, meta)  # [T, d]
            starts = [0]
            for n in lens[:-1]:
                starts.append(starts[-1] + n)
            at = [start + p for start, ps in zip(starts, positions[i:j], strict=True) for p in ps]
            out[row:row + len(at)] = normalize(hidden[torch.tensor(at, dtype=torch.long, device=self.device)]).cpu()
            row += len(at)
            i = j
        return out

    def encode_sorted(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]] | None = None, *,
                      batch_tokens: int = 8192, batch_size: int | None = None,
                      progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """``encode_at_positions`` (default positions: each sequence's last token) in length buckets, rows back
        in the input order: [rows, d] float32.

        Buckets (``bucketing.length_buckets``) take sequences longest first, at most ``batch_tokens`` tokens
        and ``batch_size`` sequences each, cut where padding their attention would waste work; ``progress``
        is called with the rows each bucket encoded.
        """
        if positions is None:
            positions = [[len(s) - 1] for s in seqs]
        if len(positions) != len(seqs):
            raise ValueError(f"{len(seqs)} sequences but {len(positions)} position lists")
        starts = np.zeros(len(seqs) + 1, dtype=np.int64)
        starts[1:] = np.cumsum([len(p) for p in positions])
        out = np.empty((int(starts[-1]), self.dim), dtype=np.float32)
        for bucket in length_buckets([len(s) for s in seqs], max_tokens=batch_tokens, max_rows=batch_size):
            vecs = self.encode_at_positions([seqs[k] for k in bucket], [positions[k] for k in bucket],
                                            batch_tokens=batch_tokens)
            rows = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in bucket])
            out[rows] = vecs.numpy()
            if progress is not None:
                progress(len(rows))
        return out

    def _encode_rendered(self, seqs: list[list[int]], batch_tokens: int, kind: str) -> np.ndarray:
        for i, s in enumerate(seqs):  # checked in the caller's order, so the error names the caller's index
            if len(s) > self.max_length:
                raise InputTooLong(kind, i, len(s), self.max_length)
        return self.encode_sorted(seqs, batch_tokens=batch_tokens)

    def encode_documents(self, docs: Sequence[tuple[str, str | None] | str], *, batch_tokens: int = 8192) -> np.ndarray:
        """Documents ``(text, title)`` (or plain texts) -> [n, d] float32 unit vectors."""
        seqs = []
        for d in docs:
            text, title = (d, None) if isinstance(d, str) else d
            seqs.append(self.renderer.document(text, title))
        return self._encode_rendered(seqs, batch_tokens, "document")

    def encode_queries(self, queries: Sequence[str], *, batch_tokens: int = 8192) -> np.ndarray:
        """Queries -> [n, d] float32 unit vectors (query template + the query RET token)."""
        return self._encode_rendered([self.renderer.query(q) for q in queries], batch_tokens, "query")
