"""Evaluation on held-out conversations: LM loss on GEN targets and retrieval recall@1 / @5.

The query vector is the hidden state at each query RET token of a held-out conversation
(teacher-forced, as in training); the candidates are document units of ``db_file``,
encoded by the same model (hidden state at the document RET token). Candidates are every
unit, or with ``pool_size`` a seeded pool holding every positive and hard negative of the
eval queries, filled with random units. A query counts as a hit at k when any of its
positives is among the k best cosine scores.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from onegen_core.retrieval.encoder import normalize

from .data import Corpus, Example
from .modeling import OneGenModel


def padded_batch(rows: Sequence[Sequence[int] | np.ndarray], pad_id: int, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows right-padded with ``pad_id`` into ``ids`` [B, L] and ``attention_mask`` [B, L] (long, 1 = real).

    The one padded-batch builder of the repository: evaluation here, and the bench's Hugging Face loops
    (``bench/quality.py``'s LM loss, ``bench/index_build.py``'s encode loop) import it.
    """
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def eval_pool(corpus: Corpus, examples: list[Example], pool_size: int, seed: int) -> np.ndarray:
    """Unit ids ranked for every query: all units, or positives + hard negatives + random fill to ``pool_size``."""
    n = corpus.num_units
    if pool_size <= 0 or pool_size >= n:
        return np.arange(n, dtype=np.int64)
    pool: set[int] = set()
    for ex in examples:
        for p, ng in zip(ex.positives, ex.negatives, strict=True):
            if p:
                pool.update(p)
                pool.update(ng)
    rng = random.Random(seed)
    while len(pool) < pool_size:
        pool.add(rng.randrange(n))
    return np.asarray(sorted(pool), dtype=np.int64)


@torch.no_grad()
def encode_units(model: OneGenModel, corpus: Corpus, units: np.ndarray, *, batch_size: int, pad_id: int,
                 device: torch.device, autocast: Any = None, progress: bool = False) -> torch.Tensor:
    """[len(units), H] float32 L2-normalised vectors at the units' document RET tokens."""
    docs = sorted({int(corpus.unit_doc[u]) for u in units}, key=lambda d: len(corpus.ids[d]))
    vec_of_unit: dict[int, torch.Tensor] = {}
    wanted = set(int(u) for u in units)
    for i in tqdm(range(0, len(docs), batch_size), desc="eval documents", unit="batch", disable=not progress,
                  leave=False):
        chunk = docs[i: i + batch_size]
        ids, mask = padded_batch([corpus.ids[d] for d in chunk], pad_id, device)
        with autocast or contextlib.nullcontext():
            h = model.hidden(ids, mask)
        for r, d in enumerate(chunk):
            for u in corpus.units_of(d):
                if u in wanted:
                    vec_of_unit[u] = h[r, int(corpus.unit_pos[u])].float()
    vecs = torch.stack([vec_of_unit[int(u)] for u in units]) if len(units) else torch.zeros(0, 1, device=device)
    return normalize(vecs)


@torch.no_grad()
def evaluate(model: OneGenModel, examples: list[Example], corpus: Corpus, *, batch_size: int, pad_id: int,
             device: torch.device, pool_size: int = 0, seed: int = 0, autocast: Any = None,
             ks: tuple[int, ...] = (1, 5), progress: bool = False) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        lm_sum, lm_n = 0.0, 0
        queries: list[torch.Tensor] = []
        positives: list[list[int]] = []
        for i in tqdm(range(0, len(examples), batch_size), desc="eval conversations", unit="batch",
                      disable=not progress, leave=False):
            chunk = examples[i: i + batch_size]
            ids, mask = padded_batch([e.ids for e in chunk], pad_id, device)
            labels = torch.full_like(ids, -100)
            for r, e in enumerate(chunk):
                labels[r, : len(e.ids)] = torch.from_numpy(e.labels())
            with autocast or contextlib.nullcontext():
                h = model.hidden(ids, mask)
                s, n = model.lm_loss_sum(h, labels)
            lm_sum += float(s)
            lm_n += n
            for r, e in enumerate(chunk):
                for pos, p in zip(e.query_positions, e.positives, strict=True):
                    if p:
                        queries.append(h[r, pos].float())
                        positives.append(p)
        out: dict[str, float] = {"eval_lm_loss": lm_sum / lm_n if lm_n else float("nan"),
                                 "eval_lm_tokens": float(lm_n), "eval_queries": float(len(queries))}
        if queries:
            units = eval_pool(corpus, examples, pool_size, seed)
            dvec = encode_units(model, corpus, units, batch_size=batch_size, pad_id=pad_id, device=device,
                                autocast=autocast, progress=progress)
            qvec = normalize(torch.stack(queries))
            scores = qvec @ dvec.T  # [Q, P]
            kmax = min(max(ks), len(units))
            top = units[scores.topk(kmax, dim=1).indices.cpu().numpy()]  # [Q, kmax] unit ids
            for k in ks:
                hits = [bool(set(top[q, :k].tolist()) & set(p)) for q, p in enumerate(positives)]
                out[f"recall@{k}"] = float(np.mean(hits))
            out["eval_pool"] = float(len(units))
            out["chance@1"] = float(np.mean([min(1.0, len(set(p)) / len(units)) for p in positives]))
        return out
    finally:
        model.train(was_training)
