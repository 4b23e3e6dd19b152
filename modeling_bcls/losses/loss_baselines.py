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

from typing import Optional

import torch

from .loss_triplet_sn import (
    _check_mask,
    _check_positive,
    _check_reduction,
    _check_sim,
    _check_weights,
    _empty_terms,
    _excluded,
    _negative_logsumexp,
    _positive_pairs,
    _reduce,
)


def _vse_terms(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    margin: float,
    weights: Optional[torch.Tensor] = None,
    binary_weights: Optional[bool] = None,
) -> torch.Tensor:
    """``binary_weights``: whether every weight is 0 or 1 (None: checked here, one host sync)."""
    if sim.numel() == 0:
        return _empty_terms(sim)
    excluded = _excluded(positive_mask, weights)
    has_negative = (~excluded).any(dim=1)
    rows, cols = _positive_pairs(positive_mask, has_negative)
    if binary_weights is None and weights is not None:
        binary_weights = bool(((weights == 0) | (weights == 1) | excluded).all())
    if weights is None or binary_weights:
        # 0/1 weights: the hardest kept negative, one max per row (VSE++'s original O(Nq Nc) form)
        hardest_negative = sim.masked_fill(excluded, float("-inf")).max(dim=1).values
        return (margin + hardest_negative[rows] - sim[rows, cols]).clamp_min(0)
    # graded weights: max_n w(q, n) [margin + S[q, n] - S[q, p]]_+ depends on p, one [pairs, Nc] pass
    violations = (margin + sim[rows] - sim[rows, cols][:, None]).clamp_min(0) * weights[rows]
    return violations.masked_fill(excluded[rows], 0.0).max(dim=1).values


def _infonce_terms(
    sim: torch.Tensor, positive_mask: torch.Tensor, temperature: float, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    if sim.numel() == 0:
        return _empty_terms(sim)
    excluded = _excluded(positive_mask, weights)
    has_negative = (~excluded).any(dim=1)
    rows, cols = _positive_pairs(positive_mask, has_negative)
    lse = _negative_logsumexp(sim, excluded, temperature, weights)
    positive_logits = sim[rows, cols] / temperature
    return torch.logaddexp(positive_logits, lse[rows]) - positive_logits


def vse_triplet_loss(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    margin: float = 0.2,
    reduction: str = "mean",
    negative_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """VSE++ hardest-negative triplet loss ``[margin + max_n S[q, n] - S[q, p]]_+`` for one direction.

    Args:
        sim: ``[Nq, Nc]`` similarities, rows are queries.
        positive_mask: ``[Nq, Nc]`` bool (or 0/1), True for matching pairs.
        margin: triplet margin.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (1-D tensor of the (q, p) terms).
        negative_weights: optional ``[Nq, Nc]`` weights ``w(q, n)`` in [0, 1]:
            ``l(q, p) = max_n w(q, n) [margin + S[q, n] - S[q, p]]_+`` (0 leaves a negative out).
    """
    _check_reduction(reduction)
    sim = _check_sim(sim)
    positive_mask = _check_mask(positive_mask, sim)
    terms = _vse_terms(sim, positive_mask, float(margin), _check_weights(negative_weights, sim))
    return _reduce(terms.sum(), torch.tensor(terms.numel(), device=sim.device), terms, reduction)


def infonce_loss(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float = 0.05,
    reduction: str = "mean",
    negative_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CLIP's InfoNCE for one direction, ``-log softmax`` of each positive against the row's negatives.

    Args:
        sim: ``[Nq, Nc]`` similarities, rows are queries.
        positive_mask: ``[Nq, Nc]`` bool (or 0/1), True for matching pairs.
        temperature: ``T > 0`` (CLIP's ``1 / logit_scale``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (1-D tensor of the (q, p) terms).
        negative_weights: optional ``[Nq, Nc]`` weights ``w(q, n)`` in [0, 1] of the negatives in the denominator
            (``sum_n w(q, n) exp(S[q, n] / T)``; 0 leaves a negative out).
    """
    _check_reduction(reduction)
    sim = _check_sim(sim)
    positive_mask = _check_mask(positive_mask, sim)
    temperature = _check_positive(temperature, "temperature")
    terms = _infonce_terms(sim, positive_mask, temperature, _check_weights(negative_weights, sim))
    return _reduce(terms.sum(), torch.tensor(terms.numel(), device=sim.device), terms, reduction)
