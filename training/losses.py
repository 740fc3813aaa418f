"""Contrastive losses on RET-token embeddings, and the cross-rank gather they use.

Each loss is a function of the embeddings (sentence-transformers style): query vectors
``q`` [Q, D], candidate document vectors ``d`` [M, D], the index of each query's positive
among the candidates and a [Q, M] mask of the candidates that count as its negatives.
Similarity is the cosine: every vector is L2-normalised along its own feature axis
(OneGen's released code normalises the [B, S, D] hidden states along the sequence axis
instead, which makes the "cosine" depend on the other tokens of the sequence; not here).

* :func:`bpr_loss` — Bayesian personalised ranking, OneGen's default:
  ``-log σ(s(q, d⁺) − s(q, d⁻))`` averaged over the query's negatives.
* :func:`info_nce_loss` — ``-log softmax`` of the positive among {positive} ∪ negatives,
  logits ``s / temperature`` (OneGen uses temperature 0.02).

With ``reduction="sum"`` a query without any negative contributes 0 to BPR (and 0 to
InfoNCE, whose softmax over the positive alone is 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]


def cosine_scores(q: torch.Tensor, d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[Q, D] x [M, D] -> [Q, M] cosine similarities, each vector normalised on its own."""
    return F.normalize(q.float(), dim=-1, eps=eps) @ F.normalize(d.float(), dim=-1, eps=eps).T


def _reduce(per_query: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return per_query.sum()
    if reduction == "mean":
        return per_query.mean() if per_query.numel() else per_query.sum()
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def _check(q: torch.Tensor, d: torch.Tensor, pos_index: torch.Tensor, neg_mask: torch.Tensor) -> None:
    assert q.dim() == 2 and d.dim() == 2 and q.shape[1] == d.shape[1], (q.shape, d.shape)
    assert pos_index.shape == (q.shape[0],), (pos_index.shape, q.shape)
    assert neg_mask.shape == (q.shape[0], d.shape[0]), (neg_mask.shape, q.shape, d.shape)


def bpr_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    pos_index: torch.Tensor,
    neg_mask: torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """BPR: per query, mean over its negatives j of ``-log σ(cos(q, d[pos]) − cos(q, d[j]))``.

    ``pos_index`` [Q] long: the positive's row in ``d``. ``neg_mask`` [Q, M] bool: negatives
    (the positive's own column is ignored whatever the mask says).
    """
    _check(q, d, pos_index, neg_mask)
    s = cosine_scores(q, d)  # [Q, M]
    rows = torch.arange(q.shape[0], device=q.device)
    mask = neg_mask.clone()
    mask[rows, pos_index] = False
    s_pos = s[rows, pos_index].unsqueeze(1)  # [Q, 1]
    pair = -F.logsigmoid(s_pos - s)  # [Q, M]
    per_query = (pair * mask).sum(1) / mask.sum(1).clamp(min=1)
    return _reduce(per_query, reduction)


def info_nce_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    pos_index: torch.Tensor,
    neg_mask: torch.Tensor,
    temperature: float = 0.02,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """InfoNCE: ``-log( e^{s⁺/τ} / (e^{s⁺/τ} + Σ_neg e^{s⁻/τ}) )`` with ``s`` the cosine and τ = ``temperature``."""
    _check(q, d, pos_index, neg_mask)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = cosine_scores(q, d) / temperature  # [Q, M]
    rows = torch.arange(q.shape[0], device=q.device)
    allowed = neg_mask.clone()
    allowed[rows, pos_index] = True
    logits = logits.masked_fill(~allowed, float("-inf"))
    per_query = torch.logsumexp(logits, dim=1) - logits[rows, pos_index]
    return _reduce(per_query, reduction)


def negative_mask(
    cand_units: torch.Tensor,
    cand_owner: torch.Tensor,
    query_ids: torch.Tensor,
    query_pos_units: torch.Tensor,
    *,
    in_batch: bool,
) -> torch.Tensor:
    """[Q, M] negatives of each query among the (gathered) candidates.

    A candidate is never a negative of a query if it is any of the query's positives
    (``query_pos_units`` [Q, P], -1 padded), and a unit that appears several times counts
    once. With ``in_batch`` every other candidate is a negative; without, only those
    sampled for the query (``cand_owner == query_ids``).
    """
    not_pos = ~(cand_units[None, :, None] == query_pos_units[:, None, :]).any(-1)  # [Q, M]
    m = cand_units.shape[0]
    first = torch.ones(m, dtype=torch.bool, device=cand_units.device)
    if m:
        uniq, inverse = torch.unique(cand_units, return_inverse=True)
        first_idx = torch.full((uniq.shape[0],), m, dtype=torch.long, device=cand_units.device)
        first_idx = first_idx.scatter_reduce(0, inverse, torch.arange(m, device=cand_units.device), reduce="amin")
        first = torch.arange(m, device=cand_units.device) == first_idx[inverse]
    mask = not_pos & first[None, :]
    if not in_batch:
        mask &= cand_owner[None, :] == query_ids[:, None]
    return mask


# --------------------------------------------------------------------------- distributed gather
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (works on gloo: all_reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: [N, ...] padded to the same N on every rank
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = dist.get_rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def gather_sizes(n: int, device: torch.device) -> list[int]:
    if _world() == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.zeros_like(t) for _ in range(_world())]
    dist.all_gather(parts, t)
    return [int(p.item()) for p in parts]


def all_gather_variable(x: torch.Tensor, sizes: list[int], *, with_grad: bool) -> torch.Tensor:
    """Concatenate every rank's ``x`` (first dims ``sizes``) in rank order; gradients flow back if ``with_grad``."""
    if len(sizes) == 1:
        return x
    n = max(sizes)
    pad = x.new_zeros((n - x.shape[0], *x.shape[1:]))
    xp = torch.cat([x, pad], 0)
    if with_grad:
        full = _AllGatherWithGrad.apply(xp)
    else:
        parts = [torch.empty_like(xp) for _ in sizes]
        dist.all_gather(parts, xp.contiguous())
        full = torch.cat(parts, 0)
    return torch.cat([full[r * n: r * n + s] for r, s in enumerate(sizes)], 0)
