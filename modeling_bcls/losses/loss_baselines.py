"""Baseline binary-label losses with the signature of :func:`triplet_sn_loss`: VSE++ and InfoNCE (CLIP).

Notation as in ``loss_triplet_sn``: ``S = sim`` ``[Nq, Nc]`` (rows are queries), ``P = positive_mask``; for a query
``q`` with a positive ``p`` and negatives ``n`` (``not P[q, n]``):

VSE++ max-violation triplet loss (Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018), generalised to several positives per row::

    l(q, p) = [margin + max_n S[q, n] - S[q, p]]_+

InfoNCE as in CLIP (Radford et al., 2021), with several positives each positive is scored against the negatives
only (the other positives of the row are left out of its denominator)::

    l(q, p) = -log( exp(S[q, p] / T) / (exp(S[q, p] / T) + sum_n exp(S[q, n] / T)) )
            = logaddexp(S[q, p] / T, LSE_n(S[q, n] / T)) - S[q, p] / T

With exactly one positive per row this is ``cross_entropy(S / T, targets)``. Both losses are reduced over the
(q, p) pairs whose query has at least one negative, in O(Nq * Nc) time and memory.
"""

from __future__ import annotations

import torch

from .loss_triplet_sn import (
    _check_mask,
    _check_positive,
    _check_reduction,
    _check_sim,
    _empty_terms,
    _negative_logsumexp,
    _positive_pairs,
    _reduce,
)


def _vse_terms(sim: torch.Tensor, positive_mask: torch.Tensor, margin: float) -> torch.Tensor:
    if sim.numel() == 0:
        return _empty_terms(sim)
    has_negative = (~positive_mask).any(dim=1)
    rows, cols = _positive_pairs(positive_mask, has_negative)
    hardest_negative = sim.masked_fill(positive_mask, float("-inf")).max(dim=1).values
    return (margin + hardest_negative[rows] - sim[rows, cols]).clamp_min(0)


def _infonce_terms(sim: torch.Tensor, positive_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    if sim.numel() == 0:
        return _empty_terms(sim)
    has_negative = (~positive_mask).any(dim=1)
    rows, cols = _positive_pairs(positive_mask, has_negative)
    lse = _negative_logsumexp(sim, positive_mask, temperature)
    positive_logits = sim[rows, cols] / temperature
    return torch.logaddexp(positive_logits, lse[rows]) - positive_logits


def vse_triplet_loss(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    margin: float = 0.2,
    reduction: str = "mean",
) -> torch.Tensor:
    """VSE++ hardest-negative triplet loss ``[margin + max_n S[q, n] - S[q, p]]_+`` for one direction.

    Args:
        sim: ``[Nq, Nc]`` similarities, rows are queries.
        positive_mask: ``[Nq, Nc]`` bool (or 0/1), True for matching pairs.
        margin: triplet margin.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (1-D tensor of the (q, p) terms).
    """
    _check_reduction(reduction)
    sim = _check_sim(sim)
    positive_mask = _check_mask(positive_mask, sim)
    terms = _vse_terms(sim, positive_mask, float(margin))
    return _reduce(terms.sum(), torch.tensor(terms.numel(), device=sim.device), terms, reduction)


def infonce_loss(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float = 0.05,
    reduction: str = "mean",
) -> torch.Tensor:
    """CLIP's InfoNCE for one direction, ``-log softmax`` of each positive against the row's negatives.

    Args:
        sim: ``[Nq, Nc]`` similarities, rows are queries.
        positive_mask: ``[Nq, Nc]`` bool (or 0/1), True for matching pairs.
        temperature: ``T > 0`` (CLIP's ``1 / logit_scale``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (1-D tensor of the (q, p) terms).
    """
    _check_reduction(reduction)
    sim = _check_sim(sim)
    positive_mask = _check_mask(positive_mask, sim)
    temperature = _check_positive(temperature, "temperature")
    terms = _infonce_terms(sim, positive_mask, temperature)
    return _reduce(terms.sum(), torch.tensor(terms.numel(), device=sim.device), terms, reduction)
