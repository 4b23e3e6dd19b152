"""Triplet loss with soft negative mining (Triplet-SN), the binary-label term of BCLS.

Reference: Li et al., "Image-text Retrieval with Binary and Continuous Label Supervision" (BCLS).
It smooths the max-violation (hardest negative) triplet loss of VSE++ (Faghri et al., "VSE++: Improving
Visual-Semantic Embeddings with Hard Negatives", BMVC 2018).

Notation: ``sim`` is ``S`` with shape ``[Nq, Nc]`` (rows are queries), ``positive_mask`` is ``P`` (same image id).
For a query ``q``, a positive ``p`` (``P[q, p]``) and the negatives ``n`` of ``q`` (``not P[q, n]``)::

    h(q, p, n) = margin + S[q, n] - S[q, p]
    l(q, p)    = tau * log(1 + sum_n exp(h(q, p, n) / tau))
               = tau * softplus((margin - S[q, p]) / tau + LSE_n(S[q, n] / tau))      # computed like this
    loss       = mean over all (q, p) whose query has at least one negative

As ``tau -> 0``, ``l(q, p) -> [max_n h(q, p, n)]_+`` (VSE++'s max-violation loss); the gap is at most
``tau * log(1 + #negatives)``. The computation is O(Nq * Nc) time and memory (one log-sum-exp per row, no
``[Nq, Nc, Nc]`` tensor) and stays finite for any ``tau > 0`` (no ``exp`` of a large number is ever formed).
Pairs whose query has no negative carry no information and are not counted (a batch without negatives gives a
finite 0 that is still connected to ``sim``).

This file and its siblings import only ``torch`` and the standard library: they are copied next to saved models
as remote code.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


_REDUCTIONS = ("mean", "sum", "none")


def _check_sim(sim: torch.Tensor, name: str = "sim") -> torch.Tensor:
    """Validates a 2-D finite similarity matrix; half precisions are computed in float32."""
    if not isinstance(sim, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(sim).__name__}")
    if sim.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D [num_queries, num_candidates] matrix, got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        raise ValueError(f"`{name}` must be a floating point tensor, got {sim.dtype}")
    _check_finite(sim, name)
    if sim.dtype in (torch.float16, torch.bfloat16):
        sim = sim.float()
    return sim


def _check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):  # one cheap pass; NaN and inf propagate into the sum
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):  # else the sum merely overflowed
        row, col = (~finite).nonzero()[0].tolist()
        raise ValueError(f"`{name}` contains a non-finite value ({x[row, col].item()}) at row {row}, column {col}")


def _check_mask(mask: torch.Tensor, sim: torch.Tensor, name: str = "positive_mask") -> torch.Tensor:
    """Validates a binary label matrix of the shape of ``sim`` and returns it as ``torch.bool``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(sim.shape):
        raise ValueError(f"`{name}` has shape {tuple(mask.shape)} but the similarity matrix has shape {tuple(sim.shape)}")
    if mask.dtype != torch.bool:
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            row, col = (~binary).nonzero()[0].tolist()
            raise ValueError(f"`{name}` must be boolean or 0/1, got {mask[row, col].item()} at row {row}, column {col}")
        mask = mask != 0
    return mask.to(sim.device)


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}")
    return value


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(total: torch.Tensor, count: torch.Tensor, terms: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """``mean`` = total / max(count, 1) (a finite 0 without terms), ``sum`` = total, ``none`` = the 1-D terms."""
    if reduction == "none":
        return terms
    if reduction == "sum":
        return total
    return total / count.clamp_min(1).to(total.dtype)


def _empty_terms(sim: torch.Tensor) -> torch.Tensor:
    """An empty 1-D tensor that is still part of ``sim``'s autograd graph."""
    return sim.reshape(-1)[:0]


def _positive_pairs(positive_mask: torch.Tensor, has_negative: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(query, candidate) indices of the positives of the queries that have at least one negative."""
    rows, cols = positive_mask.nonzero(as_tuple=True)
    keep = has_negative[rows]
    return rows[keep], cols[keep]


def _check_weights(weights: Optional[torch.Tensor], sim: torch.Tensor) -> Optional[torch.Tensor]:
    """Validates per-negative weights in [0, 1] of the shape of ``sim`` (labels: detached, float32)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"`negative_weights` must be a torch.Tensor, got {type(weights).__name__}")
    if tuple(weights.shape) != tuple(sim.shape):
        raise ValueError(f"`negative_weights` has shape {tuple(weights.shape)} but `sim` has shape {tuple(sim.shape)}")
    weights = weights.detach().to(sim.device, torch.float32)
    outside = ~((weights >= 0) & (weights <= 1))  # NaN is outside too
    if bool(outside.any()):
        row, col = outside.nonzero()[0].tolist()
        raise ValueError(f"`negative_weights` must lie in [0, 1], got {weights[row, col].item()} at row {row}, column {col}")
    return weights


def _excluded(positive_mask: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Candidates that are not (counted) negatives: the positives, and negatives of weight 0."""
    return positive_mask if weights is None else positive_mask | (weights == 0)


def _negative_logsumexp(
    sim: torch.Tensor, excluded: torch.Tensor, temperature: float, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``LSE_n(S[q, n] / T + log w(q, n))`` over the negatives of each row that are not ``excluded`` (``w = 1``
    without weights; ``-inf`` for a row without negatives). Excluded entries are filled, so neither their value nor
    a row without negatives sends a gradient to ``sim``."""
    logits = sim / temperature
    if weights is not None:
        logits = logits + weights.masked_fill(excluded, 1.0).log()
    return torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)


def _triplet_sn_terms(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    margin: float,
    temperature: float,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """1-D tensor of ``l(q, p)`` for every counted (query, positive) pair (``weights``: per-negative ``w(q, n)``)."""
    if sim.numel() == 0:
        return _empty_terms(sim)
    excluded = _excluded(positive_mask, weights)
    has_negative = (~excluded).any(dim=1)
    rows, cols = _positive_pairs(positive_mask, has_negative)
    lse = _negative_logsumexp(sim, excluded, temperature, weights)
    # tau * softplus((margin - S_qp) / tau + LSE_q) == softplus(margin - S_qp + tau * LSE_q, beta=1/tau)
    logits = (margin - sim[rows, cols]) / temperature + lse[rows]
    return temperature * F.softplus(logits)


def triplet_sn_loss(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    margin: float = 0.2,
    temperature: float = 0.1,
    reduction: str = "mean",
    negative_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triplet loss with soft negative mining, one retrieval direction (rows of ``sim`` are the queries).

    ``l(q, p) = tau * log(1 + sum_n exp((margin + S[q, n] - S[q, p]) / tau))`` for each positive ``p`` of ``q``,
    summed over the negatives ``n`` of ``q``; the result is reduced over all (q, p) pairs whose query has a negative.
    It tends to VSE++'s ``[max_n (margin + S[q, n] - S[q, p])]_+`` as ``tau -> 0``.

    Args:
        sim: ``[Nq, Nc]`` similarities (e.g. cosine), rows are queries.
        positive_mask: ``[Nq, Nc]`` bool (or 0/1), True where the candidate matches the query (same image id).
        margin: triplet margin.
        temperature: ``tau > 0`` of the log-sum-exp smoothing.
        reduction: ``"mean"`` (a finite 0 without pairs), ``"sum"``, or ``"none"`` (1-D tensor of the pair terms).
        negative_weights: optional ``[Nq, Nc]`` weights ``w(q, n)`` in [0, 1] of the negatives
            (``l(q, p) = tau * log(1 + sum_n w(q, n) exp(...))``; 0 leaves a negative out; see ``false_negatives.py``).
    """
    _check_reduction(reduction)
    sim = _check_sim(sim)
    positive_mask = _check_mask(positive_mask, sim)
    temperature = _check_positive(temperature, "temperature")
    weights = _check_weights(negative_weights, sim)
    terms = _triplet_sn_terms(sim, positive_mask, float(margin), temperature, weights)
    count = torch.tensor(terms.numel(), device=sim.device)
    return _reduce(terms.sum(), count, terms, reduction)
