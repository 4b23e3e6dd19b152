"""Relevance-aware negatives: weights that keep likely false negatives out of the binary term.

A negative ``n`` of query ``q`` (``not P[q, n]``: a caption of another image) may still describe ``q`` as well as
its own captions do. The continuous labels ``R`` say how likely that is, so the binary term weights each negative by

    w(q, n) = 1 - clamp((R[q, n] - θ₀) / (θ₁ - θ₀), 0, 1)        (soft: θ₀ = threshold, θ₁ = threshold + ramp)
    w(q, n) = 1[R[q, n] <= θ]                                     (hard exclusion: ramp = 0, θ = threshold)

so negatives at or below ``θ₀`` count fully, those above ``θ₁`` (hard: above ``θ``) are left out, and the weight
falls linearly in between. Positives are never weighted (they are not negatives). The binary losses use the weights
as a multiplicity of each negative:

    Triplet-SN  l(q, p) = τ · log(1 + Σ_n w(q, n) · exp((α + S[q, n] − S[q, p]) / τ))
    InfoNCE     l(q, p) = −log(exp(S[q, p]/T) / (exp(S[q, p]/T) + Σ_n w(q, n) · exp(S[q, n]/T)))
    VSE++       l(q, p) = max_n w(q, n) · [α + S[q, n] − S[q, p]]_+

computed as a log-sum-exp over ``S[q, n]/τ + log w(q, n)`` (``log 0 = −inf`` drops a negative exactly). With hard
weights VSE++ is the hardest *kept* negative. A query whose negatives all get weight 0 has no negative and is not
counted, as a query without negatives never is. The Kendall term is unchanged: it ranks every candidate by ``R``.

Imports only torch: copied next to saved models as remote code.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def check_false_negative_args(threshold: Optional[float], ramp: float) -> tuple[Optional[float], float]:
    """``(threshold, ramp)`` as floats; the threshold finite (or None: off), the ramp finite and ``>= 0``."""
    ramp = float(ramp)
    if not math.isfinite(ramp) or ramp < 0:
        raise ValueError(f"`false_negative_ramp` must be a finite number >= 0, got {ramp}")
    if threshold is None:
        return None, ramp
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"`false_negative_threshold` must be a finite number (or None: off), got {threshold}")
    return threshold, ramp


def negative_weights(relevance: torch.Tensor, threshold: float, ramp: float = 0.0) -> torch.Tensor:
    """``w(q, n)`` of the module docstring for every entry of ``relevance`` (positives included: callers mask them).

    Args:
        relevance: ``[Nq, Nc]`` continuous labels (detached).
        threshold: ``θ₀`` (hard: ``θ``); negatives with relevance above it lose weight.
        ramp: ``θ₁ − θ₀``; 0 gives hard exclusion ``1[R <= θ]``.
    """
    if ramp == 0:
        return (relevance <= threshold).to(relevance.dtype)
    return 1.0 - ((relevance - threshold) / ramp).clamp(0.0, 1.0)


__all__ = ["check_false_negative_args", "negative_weights"]
