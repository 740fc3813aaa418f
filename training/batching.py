"""Batches for OneGen training: conversations plus the documents their query tokens are contrasted with.

Per conversation, up to ``n_pos_per_sent`` query RET tokens that have a positive are picked
at random; each gets one of its positive units (at random) and ``n_neg_per_pos`` negatives:
its hard negatives first, in file order, then random units. A negative is unique in the
batch and never a positive of any picked query (OneGen's rules; alternatives in a query's
positive list count as positives too, so none becomes a false negative).

The documents holding those units ride in the same forward pass as the conversations:
rows ``0 .. B-1`` are conversations, the rest documents, one row per document even when
several of its units are used. Data order is a seeded permutation per epoch, sharded over
ranks like ``DistributedSampler``; every micro-batch has its own RNG seeded by
(seed, epoch, micro-batch, rank), so a resumed run samples exactly what the original did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import numpy as np
import torch

from .data import Corpus, Example

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, L] conversations then documents, right-padded
    attention_mask: torch.Tensor  # [R, L]
    labels: torch.Tensor  # [R, L] token id where an LM target, else -100 (all -100 on documents)
    query_rows: torch.Tensor  # [Q] row of each picked query RET token
    query_cols: torch.Tensor  # [Q] its position
    doc_rows: torch.Tensor  # [M] row of each candidate unit's document
    doc_cols: torch.Tensor  # [M] position of the unit's RET token
    pos_index: torch.Tensor  # [Q] index into the M candidates of each query's positive
    cand_units: torch.Tensor  # [M] global unit id of each candidate
    cand_owner: torch.Tensor  # [M] query whose negative it is (-1: a positive)
    query_pos_units: torch.Tensor  # [Q, P] every positive unit of each query (-1 padded)
    num_conversations: int
    num_tokens: int  # non-pad tokens in the batch

    def to(self, device: torch.device | str) -> Batch:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return Batch(**kw)


class OneGenCollator:
    def __init__(self, corpus: Corpus, *, n_pos_per_sent: int, n_neg_per_pos: int, pad_id: int):
        self.corpus = corpus
        self.n_pos = n_pos_per_sent
        self.n_neg = n_neg_per_pos
        self.pad_id = pad_id

    # ---------------------------------------------------------------- sampling
    def sample(self, examples: list[Example], rng: random.Random):
        """Pick queries, their positives and negatives: [(example, query, pos unit, all pos units, negs)]."""
        picked = []
        for b, ex in enumerate(examples):
            valid = [i for i, p in enumerate(ex.positives) if p]
            for i in sorted(rng.sample(valid, min(self.n_pos, len(valid)))):
                picked.append((b, i, rng.choice(ex.positives[i])))
        all_pos = {u for b, i, _ in picked for u in examples[b].positives[i]}
        used: set[int] = set()
        out = []
        n_units = self.corpus.num_units
        for b, i, pos in picked:
            negs: list[int] = []
            for u in examples[b].negatives[i]:  # hard negatives first
                if len(negs) >= self.n_neg:
                    break
                if u not in used and u not in all_pos:
                    negs.append(u)
                    used.add(u)
            attempts = 0
            while len(negs) < self.n_neg and attempts < 20 * self.n_neg + 100:  # random fill
                attempts += 1
                u = rng.randrange(n_units)
                if u not in used and u not in all_pos:
                    negs.append(u)
                    used.add(u)
            out.append((b, i, pos, sorted(set(examples[b].positives[i])), negs))
        return out

    # ---------------------------------------------------------------- tensors
    def __call__(self, examples: list[Example], rng: random.Random) -> Batch:
        picked = self.sample(examples, rng)
        corpus = self.corpus
        cand_units: list[int] = []
        cand_owner: list[int] = []
        pos_slot: dict[int, int] = {}
        pos_index = []
        for _, _, pos, _, _ in picked:
            if pos not in pos_slot:
                pos_slot[pos] = len(cand_units)
                cand_units.append(pos)
                cand_owner.append(-1)
            pos_index.append(pos_slot[pos])
        for q, (_, _, _, _, negs) in enumerate(picked):
            cand_units.extend(negs)
            cand_owner.extend([q] * len(negs))
        doc_row: dict[int, int] = {}
        rows: list[np.ndarray] = [ex.ids for ex in examples]
        labels: list[np.ndarray] = [ex.labels(IGNORE_INDEX) for ex in examples]
        doc_rows, doc_cols = [], []
        for u in cand_units:
            d = int(corpus.unit_doc[u])
            if d not in doc_row:
                doc_row[d] = len(rows)
                rows.append(corpus.ids[d])
                labels.append(np.full(len(corpus.ids[d]), IGNORE_INDEX, dtype=np.int64))
            doc_rows.append(doc_row[d])
            doc_cols.append(int(corpus.unit_pos[u]))
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        label_t = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
            input_ids[r, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
            attention[r, : len(ids)] = 1
            label_t[r, : len(lab)] = torch.from_numpy(lab)
        n_p = max((len(p) for _, _, _, p, _ in picked), default=1)
        qpu = torch.full((len(picked), n_p), -1, dtype=torch.long)
        for q, (_, _, _, p, _) in enumerate(picked):
            qpu[q, : len(p)] = torch.tensor(p, dtype=torch.long)
        return Batch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=label_t,
            query_rows=torch.tensor([b for b, _, _, _, _ in picked], dtype=torch.long),
            query_cols=torch.tensor([examples[b].query_positions[i] for b, i, _, _, _ in picked], dtype=torch.long),
            doc_rows=torch.tensor(doc_rows, dtype=torch.long),
            doc_cols=torch.tensor(doc_cols, dtype=torch.long),
            pos_index=torch.tensor(pos_index, dtype=torch.long),
            cand_units=torch.tensor(cand_units, dtype=torch.long),
            cand_owner=torch.tensor(cand_owner, dtype=torch.long),
            query_pos_units=qpu,
            num_conversations=len(examples),
            num_tokens=int(attention.sum()),
        )


def epoch_order(n: int, *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> list[int]:
    """This rank's example indices for an epoch: a seeded permutation, padded to a multiple of the world, strided."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    total = -(-n // world_size) * world_size
    while len(order) < total:  # repeat from the start so every rank gets as many examples
        order += order[: total - len(order)]
    return order[rank::world_size]


def micro_batches(n: int, batch_size: int, **kw) -> list[list[int]]:
    order = epoch_order(n, **kw)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def batch_rng(seed: int, epoch: int, micro: int, rank: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{micro}/{rank}")
