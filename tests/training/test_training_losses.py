"""The contrastive losses against values computed by hand, masking, and per-vector normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import bpr_loss, cosine_scores, info_nce_loss, negative_mask

# One query [1, 0]; candidates: the positive [2, 0] (cos 1), [0, 3] (cos 0), [1, 1] (cos 1/sqrt 2).
Q = torch.tensor([[1.0, 0.0]])
D = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
POS = torch.tensor([0])
ALL = torch.tensor([[False, True, True]])
R2 = 1 / math.sqrt(2)


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_bpr_matches_hand_computation():
    # -log σ(s+ - s-) = log(1 + e^{-(s+ - s-)}), averaged over the two negatives
    expected = (softplus(-(1 - 0)) + softplus(-(1 - R2))) / 2
    assert bpr_loss(Q, D, POS, ALL).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_matches_hand_computation():
    tau = 0.5
    expected = -1 / tau + math.log(math.exp(1 / tau) + math.exp(0 / tau) + math.exp(R2 / tau))
    assert info_nce_loss(Q, D, POS, ALL, temperature=tau).item() == pytest.approx(expected, rel=1e-6)


def test_masking_drops_candidates():
    only_first = torch.tensor([[False, True, False]])
    assert bpr_loss(Q, D, POS, only_first).item() == pytest.approx(softplus(-1.0), rel=1e-6)
    tau = 0.5
    expected = -1 / tau + math.log(math.exp(1 / tau) + 1.0)
    assert info_nce_loss(Q, D, POS, only_first, temperature=tau).item() == pytest.approx(expected, rel=1e-6)
    # the positive's own column is never a negative, whatever the mask says
    with_pos = torch.tensor([[True, True, False]])
    assert bpr_loss(Q, D, POS, with_pos).item() == pytest.approx(softplus(-1.0), rel=1e-6)
    # no negatives: BPR 0, InfoNCE 0 (softmax over the positive alone)
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert bpr_loss(Q, D, POS, none).item() == 0.0
    assert info_nce_loss(Q, D, POS, none).item() == pytest.approx(0.0, abs=1e-6)


def test_reductions_over_queries():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([0, 1])
    mask = torch.tensor([[False, True, True], [True, False, True]])
    per = bpr_loss(q, D, pos, mask, reduction="none")
    assert per.shape == (2,)
    assert bpr_loss(q, D, pos, mask, reduction="sum").item() == pytest.approx(per.sum().item())
    assert bpr_loss(q, D, pos, mask, reduction="mean").item() == pytest.approx(per.mean().item())
    # query 1 by hand: positive [0, 3] (cos 1); negatives [2, 0] (cos 0) and [1, 1] (cos 1/sqrt 2)
    assert per[1].item() == pytest.approx((softplus(-1.0) + softplus(-(1 - R2))) / 2, rel=1e-6)


def test_each_vector_is_normalised_on_its_own():
    """Regression (OneGen's bpr_loss normalises hidden states along the sequence axis): the similarity must be the
    cosine of each pair, so rescaling any single query or document vector changes nothing."""
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    pos = torch.tensor([0, 1, 2])
    mask = torch.ones(3, 5, dtype=torch.bool)
    scale_q = torch.tensor([[0.1], [7.0], [3.0]])
    scale_d = torch.tensor([[2.0], [0.5], [9.0], [1.0], [0.01]])
    for fn in (bpr_loss, lambda *a: info_nce_loss(*a, temperature=0.05)):
        base = fn(q, d, pos, mask)
        assert fn(q * scale_q, d * scale_d, pos, mask).item() == pytest.approx(base.item(), rel=1e-5)
    expected = torch.nn.functional.cosine_similarity(q[:, None, :], d[None, :, :], dim=-1)
    assert torch.allclose(cosine_scores(q, d), expected, atol=1e-6)


def test_gradients_reach_queries_and_documents():
    q = Q.clone().requires_grad_()
    d = D.clone().requires_grad_()
    info_nce_loss(q, d, POS, ALL, temperature=0.1).backward()
    assert q.grad.abs().sum() > 0 and d.grad[1:].abs().sum() > 0


def test_negative_mask_rules():
    units = torch.tensor([5, 7, 5, 9])  # unit 5 twice (e.g. from two ranks)
    owner = torch.tensor([-1, 0, 0, 1])
    qids = torch.tensor([0, 1])
    pos_units = torch.tensor([[5, -1], [9, 7]])  # query 1 has two positives
    m = negative_mask(units, owner, qids, pos_units, in_batch=True)
    # query 0: not its positive 5 (either copy); 7 and 9 are in-batch negatives
    # query 1: 9 and 7 are its positives; 5 counts once (first copy)
    assert m.tolist() == [[False, True, False, True], [True, False, False, False]]
    m = negative_mask(units, owner, qids, pos_units, in_batch=False)
    assert m.tolist() == [[False, True, False, False], [False, False, False, False]]
