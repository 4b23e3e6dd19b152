"""BCLS objective: Triplet-SN on the binary labels plus the Kendall SW-HS ranking loss on the continuous labels.

Reference: Li et al., "Image-text Retrieval with Binary and Continuous Label Supervision" (BCLS); baselines VSE++
(Faghri et al., BMVC 2018) and CLIP's InfoNCE (Radford et al., 2021).

For a batch with image-text similarities ``sim`` ``[N_img, N_txt]`` (row = image), binary labels ``positive_mask``
(same image id) and continuous labels ``relevance`` ``R`` (``R = 1`` on the positives)::

    L_dir   = L_binary(S_dir, P_dir) + kendall_weight * L_kendall(S_dir, R_dir)     for dir in {i2t, t2i}
    i2t     : (S, P, R)        t2i : (S^T, P^T, R^T)       (or the explicit ``*_t2i`` matrices)
    L       = (L_i2t + L_t2i) / 2

``L_binary`` is the ``binary_loss``: Triplet-SN (``"triplet_sn"``), VSE++ (``"vse"``, the exact hardest negative,
Triplet-SN's tau -> 0 limit) or InfoNCE (``"infonce"``, fixed temperature or a learned one passed as a tensor). The Kendall
SW-HS term composes with any of them; it is used when ``relevance`` is given and ``kendall_weight != 0``.
With ``false_negative_threshold`` set, the binary term of each direction weights its negatives by the relevance
``w(q, n) = 1 - clamp((R[q, n] - θ) / ramp, 0, 1)`` (``ramp = 0``: ``1[R[q, n] <= θ]``, hard exclusion), so that
captions of other images that describe the query about as well as its own are not pushed away
(``false_negatives.py``); it needs ``relevance`` even when ``kendall_weight`` is 0.
The legacy ``objective`` names map onto the two knobs (:data:`OBJECTIVES`): ``"bcls"`` = Triplet-SN + Kendall,
``"triplet_sn"`` / ``"vse"`` / ``"infonce"`` = that binary loss alone (Kendall weight 0).
Each direction's term is ``sum of its terms / count_reducer(number of its terms)``, so a distributed trainer can
normalise every process's sum by the global count.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .false_negatives import check_false_negative_args, negative_weights
from .loss_baselines import _infonce_terms, _vse_terms, infonce_loss, vse_triplet_loss
from .loss_kendall import _check_kendall_args, _check_relevance, _kendall_parts, kendall_ranking_loss, relevance_sort_order
from .loss_triplet_sn import _check_mask, _check_positive, _check_sim, _triplet_sn_terms, triplet_sn_loss


__all__ = [
    "BINARY_LOSSES",
    "OBJECTIVES",
    "bcls_loss",
    "infonce_loss",
    "kendall_ranking_loss",
    "relevance_sort_order",
    "triplet_sn_loss",
    "vse_triplet_loss",
]

BINARY_LOSSES = ("triplet_sn", "vse", "infonce")
# Legacy objective name -> (binary loss, whether the Kendall term is on).
OBJECTIVES = {"bcls": ("triplet_sn", True), "triplet_sn": ("triplet_sn", False), "vse": ("vse", False), "infonce": ("infonce", False)}


def resolve_objective(objective: Optional[str], binary_loss: str, kendall_weight: float) -> Tuple[str, float]:
    """``(binary_loss, kendall_weight)`` of a legacy ``objective`` name (None: the two knobs as given)."""
    if objective is None:
        if binary_loss not in BINARY_LOSSES:
            raise ValueError(f"`binary_loss` must be one of {BINARY_LOSSES}, got {binary_loss!r}")
        return binary_loss, float(kendall_weight)
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {tuple(OBJECTIVES)} or None, got {objective!r}")
    binary, with_kendall = OBJECTIVES[objective]
    return binary, float(kendall_weight) if with_kendall else 0.0


def _infonce_temperature(value) -> "float | torch.Tensor":
    """A fixed temperature (float), or a learned one: a 0-d tensor that keeps its graph (e.g. ``1 / logit_scale.exp()``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"`infonce_temperature` must be a scalar, got shape {tuple(value.shape)}")
        _check_positive(float(value.detach()), "infonce_temperature")
        return value.reshape(()).float()
    return _check_positive(value, "infonce_temperature")


def _normalise(total: torch.Tensor, count: torch.Tensor, count_reducer: Optional[Callable]) -> torch.Tensor:
    count = count.to(total.dtype)
    if count_reducer is not None:
        count = count_reducer(count)
    return total / count.clamp_min(1)


def bcls_loss(
    sim: torch.Tensor,
    positive_mask: torch.Tensor,
    relevance: Optional[torch.Tensor] = None,
    *,
    binary_loss: str = "triplet_sn",
    objective: Optional[str] = None,
    margin: float = 0.2,
    soft_negative_temperature: float = 0.1,
    kendall_weight: float = 0.2,
    kendall_window_size: Optional[int] = 32,
    kendall_label_gap: float = 0.15,
    kendall_surrogate: str = "hinge",
    kendall_temperature: float = 0.1,
    kendall_hard_mining: bool = True,
    infonce_temperature: float = 0.05,
    false_negative_threshold: Optional[float] = None,
    false_negative_ramp: float = 0.0,
    sort_order_i2t: Optional[torch.Tensor] = None,
    sort_order_t2i: Optional[torch.Tensor] = None,
    sim_t2i: Optional[torch.Tensor] = None,
    positive_mask_t2i: Optional[torch.Tensor] = None,
    relevance_t2i: Optional[torch.Tensor] = None,
    count_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Symmetric BCLS loss: ``loss = binary + kendall_weight * kendall``, each the mean of i2t and t2i.

    Args:
        sim: ``[N_img, N_txt]`` image-text similarities (image→text queries are the rows).
        positive_mask: ``[N_img, N_txt]`` bool, True for pairs of the same image.
        relevance: ``[N_img, N_txt]`` continuous labels, or None for the binary term alone.
        binary_loss: the binary-label term, ``"triplet_sn"``, ``"vse"`` or ``"infonce"``.
        objective: legacy name that sets both knobs (``"bcls"`` = Triplet-SN + Kendall; ``"triplet_sn"``, ``"vse"``,
            ``"infonce"`` = binary alone); None (default) uses ``binary_loss`` and ``kendall_weight`` as given.
        margin, soft_negative_temperature: Triplet-SN (``margin`` is also VSE++'s).
        kendall_weight, kendall_window_size, kendall_label_gap, kendall_surrogate, kendall_temperature,
        kendall_hard_mining: arguments of :func:`kendall_ranking_loss`.
        infonce_temperature: temperature of :func:`infonce_loss`; a float, or a 0-d tensor for a learned temperature.
        false_negative_threshold, false_negative_ramp: relevance-aware negatives of the binary term (``θ`` and the
            width of the soft ramp, 0 = hard exclusion; see the module docstring); None (default): every negative
            counts fully.
        sort_order_i2t, sort_order_t2i: optional precomputed ``relevance_sort_order`` of each direction's relevance.
        sim_t2i, positive_mask_t2i, relevance_t2i: text→image matrices (rows are texts); default to the transposes.
        count_reducer: maps a direction's local term count (0-d float tensor) to the count it is normalised by
            (e.g. an all-reduce sum across processes); identity by default.

    Returns:
        ``dict(loss=..., triplet=..., kendall=...)``; ``triplet`` is the binary term (whichever ``binary_loss``) and
        ``kendall`` is 0 when it is not used.
    """
    binary_loss, kendall_weight = resolve_objective(objective, binary_loss, kendall_weight)
    sim = _check_sim(sim, "sim")
    positive_mask = _check_mask(positive_mask, sim, "positive_mask")
    sim_t2i = sim.T if sim_t2i is None else _check_sim(sim_t2i, "sim_t2i")
    if positive_mask_t2i is None:
        positive_mask_t2i = _check_mask(positive_mask.T, sim_t2i, "positive_mask.T (default positive_mask_t2i)")
    else:
        positive_mask_t2i = _check_mask(positive_mask_t2i, sim_t2i, "positive_mask_t2i")
    threshold, ramp = check_false_negative_args(false_negative_threshold, false_negative_ramp)
    if threshold is not None and relevance is None:
        raise ValueError(
            "`false_negative_threshold` weights negatives by their relevance: pass `relevance` (continuous labels)"
        )
    use_kendall = relevance is not None and kendall_weight != 0
    if use_kendall or threshold is not None:
        relevance = _check_relevance(relevance, sim, "relevance")
        if relevance_t2i is None:
            relevance_t2i = relevance.T
            if relevance_t2i.shape != sim_t2i.shape:
                raise ValueError(
                    f"relevance.T (default relevance_t2i) has shape {tuple(relevance_t2i.shape)} but sim_t2i has "
                    f"shape {tuple(sim_t2i.shape)}"
                )
        else:
            relevance_t2i = _check_relevance(relevance_t2i, sim_t2i, "relevance_t2i")
    if use_kendall:
        window, gap, kendall_temperature = _check_kendall_args(
            kendall_window_size, kendall_label_gap, kendall_surrogate, kendall_temperature
        )

    directions = ((sim, positive_mask, relevance, sort_order_i2t), (sim_t2i, positive_mask_t2i, relevance_t2i, sort_order_t2i))
    if binary_loss == "triplet_sn":
        tau = _check_positive(soft_negative_temperature, "soft_negative_temperature")
    elif binary_loss == "infonce":
        infonce_temperature = _infonce_temperature(infonce_temperature)
    triplet = sim.new_zeros(())
    kendall = sim.new_zeros(())
    for dir_sim, dir_mask, dir_rel, dir_order in directions:
        weights = None if threshold is None else negative_weights(dir_rel, threshold, ramp)
        if binary_loss == "triplet_sn":
            terms = _triplet_sn_terms(dir_sim, dir_mask, float(margin), tau, weights)
        elif binary_loss == "vse":
            terms = _vse_terms(dir_sim, dir_mask, float(margin), weights, binary_weights=ramp == 0)
        else:
            terms = _infonce_terms(dir_sim, dir_mask, infonce_temperature, weights)
        count = torch.tensor(terms.numel(), device=dir_sim.device)
        triplet = triplet + _normalise(terms.sum(), count, count_reducer) / 2
        if use_kendall:
            total, count, _ = _kendall_parts(
                dir_sim, dir_rel, window, gap, kendall_surrogate, kendall_temperature, bool(kendall_hard_mining),
                dir_order, want_terms=False,
            )
            kendall = kendall + _normalise(total, count, count_reducer) / 2
    return {"loss": triplet + kendall_weight * kendall, "triplet": triplet, "kendall": kendall}
