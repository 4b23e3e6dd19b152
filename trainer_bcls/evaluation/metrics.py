# Copyright 2024 The BCLS Authors. Licensed under the Apache License, Version 2.0.
"""Image-text retrieval metrics: chunked Recall@K / rank statistics, mAP@R and R-Precision (ECCV Caption, with
binary or extended positives), relevance-aware ranking metrics (Kendall tau-b, nDCG@k) and Kendall tau-c against
human judgments (Flickr8k-Expert / CrowdFlower).

This file is self-contained (numpy / torch / datasets / evaluate and the standard library only, no package or
relative imports) so that it is both ``trainer_bcls.evaluation.metrics`` and an ``evaluate`` module script::

    metric = evaluate.load("path/to/trainer_bcls/evaluation/metrics.py")

Conventions (used everywhere below):

* similarity ``s(i, j) = <image_i, text_j>`` (dot product; the model already L2-normalises the embeddings);
* rank of a query = 1-based rank of its *first* correct item, with ties counted optimistically:
  ``rank = 1 + #{candidates c : s(c) > max_{p positive} s(p)}`` (strictly greater). This is O(N) per query
  (no sort). A full sort breaks ties arbitrarily; the reference that matches this convention is a stable
  lexicographic sort by (score descending, positives first);
* ``R@K = 100 * mean(rank <= K)`` (percent), ``rsum = sum of the i2t and t2i R@K`` (VSE++ / SCAN),
  ``medr = floor(median(rank - 1)) + 1`` and ``meanr = mean(rank)`` exactly as VSE++;
* mAP@R and R-Precision (ECCV Caption): for a query with R positives, ``R-P = P@R`` and
  ``mAP@R = (1/R) sum_{r<=R} P@r 1[item r is positive]``, on the list sorted by (score descending, positives
  first), the same optimistic tie rule; computed from a top-R per query, never a full sort.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import datasets
import evaluate
import numpy as np
import torch


logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]
RelevanceLike = Union[torch.Tensor, np.ndarray, Callable[[np.ndarray], ArrayLike]]

# Rows x columns processed at once by the relevance metrics (several int64 work tensors of this size).
_RELEVANCE_BLOCK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------------------------
# Input helpers
# ----------------------------------------------------------------------------------------------------------------


def _to_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def _float_tensor(x: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    """Float tensor of rank ``ndim`` (float64 and integers -> float64, other floats -> float32), finite, or a
    ValueError."""
    t = _to_tensor(x)
    if t.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {tuple(t.shape)}.")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"`{name}` must be real-valued, got dtype {t.dtype}.")
    t = t.to(torch.float64 if t.dtype == torch.float64 or not t.is_floating_point() else torch.float32)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)[0].tolist()
        raise ValueError(f"`{name}` contains NaN or inf at index {tuple(bad)} (row {bad[0]}).")
    return t


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    return int(chunk_size)


def _prepare_retrieval_inputs(
    image_embeds: ArrayLike, text_embeds: ArrayLike, caption_image_ids: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = _float_tensor(image_embeds, "image_embeds", 2)
    texts = _float_tensor(text_embeds, "text_embeds", 2)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            "`image_embeds` and `text_embeds` must have the same dimension, "
            f"got {images.shape[1]} and {texts.shape[1]}."
        )
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise ValueError(f"Need at least one image and one caption, got {images.shape[0]} and {texts.shape[0]}.")
    if images.dtype != texts.dtype:
        images, texts = images.double(), texts.double()
    ids = _to_tensor(caption_image_ids)
    if ids.ndim != 1 or ids.shape[0] != texts.shape[0]:
        raise ValueError(
            f"`caption_image_ids` must have shape [{texts.shape[0]}] (one image row per caption), "
            f"got {tuple(ids.shape)}."
        )
    if ids.is_floating_point():
        if not bool((ids == ids.round()).all()):
            raise ValueError("`caption_image_ids` must hold integer image row indices.")
    ids = ids.long()
    bad = torch.nonzero((ids < 0) | (ids >= images.shape[0])).flatten()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"`caption_image_ids[{j}]` = {int(ids[j])} is not a row of `image_embeds` (0 <= id < {images.shape[0]})."
        )
    counts = torch.bincount(ids, minlength=images.shape[0])
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        raise ValueError(
            f"{empty.numel()} image(s) have no caption, so their image->text rank is undefined; "
            f"first image rows: {empty[:10].tolist()}."
        )
    return images, texts, ids


# ----------------------------------------------------------------------------------------------------------------
# Ranks
# ----------------------------------------------------------------------------------------------------------------


def similarity_chunks(
    queries: ArrayLike, gallery: ArrayLike, chunk_size: int = 1024
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, queries[start:start + chunk_size] @ gallery.T)``: at most ``chunk_size x len(gallery)`` floats
    are alive at once."""
    chunk_size = _check_chunk_size(chunk_size)
    q, g = _to_tensor(queries), _to_tensor(gallery)
    if q.dtype != g.dtype:
        dtype = torch.promote_types(q.dtype, g.dtype)
        q, g = q.to(dtype), g.to(dtype)
    for start in range(0, q.shape[0], chunk_size):
        yield start, q[start : start + chunk_size] @ g.T


_LANE_GROUP = 8 * 255  # bytes summed per int64 lane group without carry between bytes


def _greater_buffer(rows: int, n: int) -> torch.Tensor:
    return torch.zeros(rows, -(-n // _LANE_GROUP) * _LANE_GROUP, dtype=torch.bool)


def _ranks_from_best(
    sim_chunk: torch.Tensor, best: torch.Tensor, buffer: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """rank = 1 + #{c : s(c) > best}  (O(N) per query, optimistic on ties).

    The comparison is written into a zero-padded bool buffer whose bytes (0/1) are summed 8 at a time as int64
    words over groups of 255 words (each byte lane stays <= 255, so no carry), then the lane bytes are summed:
    ~4x faster than reducing a bool tensor directly. ``buffer`` (from ``_greater_buffer``, >= rows) is reused
    across chunks: its padding columns are never written.
    """
    rows, n = sim_chunk.shape
    greater = _greater_buffer(rows, n) if buffer is None else buffer[:rows]
    padded = greater.shape[1]
    torch.gt(sim_chunk, best[:, None], out=greater[:, :n])
    lanes = greater.view(torch.int64).view(rows, padded // _LANE_GROUP, 255).sum(dim=2)
    return 1 + lanes.view(torch.uint8).sum(dim=1, dtype=torch.int64)


def first_hit_ranks(sim_chunk: ArrayLike, positive_mask_chunk: ArrayLike) -> torch.Tensor:
    """1-based rank of the first positive of each query row.

    ``rank_q = 1 + #{c : s(q, c) > max_{p : mask[q, p]} s(q, p)}`` (ties counted optimistically).

    Args:
        sim_chunk: ``[Q, N]`` scores of Q queries against N candidates.
        positive_mask_chunk: ``[Q, N]`` bool, True where the candidate is correct; every row needs one.
    Returns:
        LongTensor ``[Q]``.
    """
    sim = _to_tensor(sim_chunk)
    mask = _to_tensor(positive_mask_chunk).bool()
    if sim.ndim != 2 or mask.shape != sim.shape:
        raise ValueError(
            "`sim_chunk` and `positive_mask_chunk` must be 2-D of equal shape, "
            f"got {tuple(sim.shape)} and {tuple(mask.shape)}."
        )
    missing = torch.nonzero(~mask.any(dim=1)).flatten()
    if missing.numel():
        raise ValueError(f"Query row {int(missing[0])} has no positive candidate.")
    if torch.isnan(sim).any():
        raise ValueError(f"`sim_chunk` contains NaN (row {int(torch.nonzero(torch.isnan(sim))[0, 0])}).")
    best = sim.masked_fill(~mask, -math.inf).amax(dim=1)
    return _ranks_from_best(sim, best)


def retrieval_ranks(
    image_embeds: ArrayLike, text_embeds: ArrayLike, caption_image_ids: ArrayLike, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query 1-based ranks ``(i2t [Ni], t2i [Nt])``, chunked over queries (see :func:`retrieval_metrics`)."""
    chunk_size = _check_chunk_size(chunk_size)
    images, texts, ids = _prepare_retrieval_inputs(image_embeds, text_embeds, caption_image_ids)
    return _i2t_ranks(images, texts, ids, chunk_size, None), _t2i_ranks(images, texts, ids, chunk_size, None)


def _i2t_ranks(images, texts, ids, chunk_size, on_chunk) -> torch.Tensor:
    num_images = images.shape[0]
    # captions grouped by image: captions of images [s, e) are by_image[lo:hi]
    sorted_ids, by_image = torch.sort(ids, stable=True)
    ranks = torch.empty(num_images, dtype=torch.long)
    buffer = _greater_buffer(min(chunk_size, num_images), texts.shape[0])
    for start, sim in similarity_chunks(images, texts, chunk_size):
        end = start + sim.shape[0]
        lo, hi = torch.searchsorted(sorted_ids, torch.tensor([start, end])).tolist()
        rows, cols = sorted_ids[lo:hi] - start, by_image[lo:hi]
        best = torch.full((sim.shape[0],), -math.inf, dtype=sim.dtype)
        best.scatter_reduce_(0, rows, sim[rows, cols], reduce="amax")  # best positive, from this very chunk
        ranks[start:end] = _ranks_from_best(sim, best, buffer)
        if on_chunk is not None:
            on_chunk(start, sim)
        del sim  # free this chunk before the generator computes the next one
    return ranks


def _t2i_ranks(images, texts, ids, chunk_size, on_chunk) -> torch.Tensor:
    ranks = torch.empty(texts.shape[0], dtype=torch.long)
    buffer = _greater_buffer(min(chunk_size, texts.shape[0]), images.shape[0])
    for start, sim in similarity_chunks(texts, images, chunk_size):
        end = start + sim.shape[0]
        positive = sim[torch.arange(sim.shape[0]), ids[start:end]]
        ranks[start:end] = _ranks_from_best(sim, positive, buffer)
        if on_chunk is not None:
            on_chunk(start, sim)
        del sim  # free this chunk before the generator computes the next one
    return ranks


def rank_summary(ranks: ArrayLike, ks: Sequence[int] = (1, 5, 10), prefix: str = "") -> dict[str, float]:
    """``{prefix}r{k}`` = 100 * mean(rank <= k), ``{prefix}medr`` = floor(median(rank - 1)) + 1 (VSE++),
    ``{prefix}meanr`` = mean(rank)."""
    r = _to_tensor(ranks).double()
    out = {f"{prefix}r{k}": 100.0 * float((r <= k).double().mean()) for k in ks}
    out[f"{prefix}medr"] = float(np.floor(np.median(r.numpy() - 1)) + 1)
    out[f"{prefix}meanr"] = float(r.mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# mAP@R and R-Precision (ECCV Caption, Chun et al. 2022), binary or extended positives
# ----------------------------------------------------------------------------------------------------------------


def _precision_at_r_rows(
    sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, num_relevant: torch.Tensor, recall_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row of ``sim [Q, N]``: ``(sum of P@pos over positives at pos <= R, #positives in the top R,
    first-hit rank)`` from the top ``min(N, max(R, recall_k))`` scores only (no sort of the rows).

    ``rows, cols [P]``: the query's positives in the gallery (unique pairs); ``num_relevant [Q]``: R per query
    (>= its in-gallery positives; positives outside the gallery count in R and are never retrieved).
    Tie rule (optimistic, as the ranks): the list is sorted by (score descending, positives first), so the k-th
    positive by score sits at ``pos_k = k + #{negatives c : s(c) > s(p_k)}`` and ``P@pos_k = k / pos_k``. Only
    positions <= R matter, and those need only the candidates above the R-th largest score: a top-k. The
    first-hit rank is ``1 + #{c : s(c) > best positive}``, exact up to ``recall_k`` (larger: > recall_k), and
    the largest int64 for a query with no positive in the gallery.
    """
    q, n = sim.shape
    k = min(n, max(int(num_relevant.max()) if q else 0, recall_k, 1))
    values, index = torch.topk(sim, k, dim=1)
    first = torch.full((q,), torch.iinfo(torch.long).max, dtype=torch.long)
    ap = torch.zeros(q, dtype=torch.float64)
    hits = torch.zeros(q, dtype=torch.long)
    if rows.numel() == 0:
        return ap, hits, first
    keys = rows * n + cols
    in_top = torch.arange(q)[:, None] * n + index
    negative_values = values.masked_fill(torch.isin(in_top, keys), -math.inf)
    scores = sim[rows, cols]
    negatives_above = (negative_values[rows] > scores[:, None]).sum(dim=1)
    # k of each positive: its 1-based place among its query's positives by score descending
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    counts = torch.bincount(rows, minlength=q)
    group_start = torch.cumsum(counts, 0) - counts
    kth = torch.empty_like(rows)
    kth[order] = torch.arange(rows.numel()) - group_start[rows[order]] + 1
    position = kth + negatives_above
    hit = position <= num_relevant[rows]
    ap.index_add_(0, rows[hit], kth[hit].double() / position[hit].double())
    hits += torch.bincount(rows[hit], minlength=q)
    best = torch.full((q,), -math.inf, dtype=sim.dtype).scatter_reduce_(0, rows, scores, reduce="amax")
    has_positive = counts > 0
    first[has_positive] = 1 + (values[has_positive] > best[has_positive, None]).sum(dim=1)
    return ap, hits, first


def map_at_r(
    sim_chunk: ArrayLike, positive_mask_chunk: ArrayLike, num_relevant: Optional[ArrayLike] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mAP@R, R-Precision)`` per query row (fractions, float64 ``[Q]``), ECCV Caption's definitions.

    For a query with R positives, ``R-P = P@R`` and ``mAP@R = (1/R) sum_{r<=R} P@r * 1[item r is positive]``,
    ``P@r`` = positives among the first r / r. Ranking: score descending, ties broken in favour of positives.
    ``num_relevant [Q]`` (default: the mask's row sums) may exceed them: the extra positives are not in the
    gallery and count as misses (also when R exceeds the gallery size).
    """
    sim = _to_tensor(sim_chunk)
    mask = _to_tensor(positive_mask_chunk).bool()
    if sim.ndim != 2 or mask.shape != sim.shape:
        raise ValueError(
            "`sim_chunk` and `positive_mask_chunk` must be 2-D of equal shape, "
            f"got {tuple(sim.shape)} and {tuple(mask.shape)}."
        )
    if torch.isnan(sim).any():
        raise ValueError(f"`sim_chunk` contains NaN (row {int(torch.nonzero(torch.isnan(sim))[0, 0])}).")
    rows, cols = torch.nonzero(mask, as_tuple=True)
    in_gallery = mask.sum(dim=1)
    r = in_gallery if num_relevant is None else _to_tensor(num_relevant).long()
    if r.shape != in_gallery.shape or bool((r < in_gallery).any()):
        raise ValueError(f"`num_relevant` must have shape [{sim.shape[0]}] and be >= each row's positives.")
    if bool((r < 1).any()):
        raise ValueError(f"Query row {int(torch.nonzero(r < 1)[0])} has no positive.")
    ap, hits, _ = _precision_at_r_rows(sim, rows, cols, r)
    return ap / r, hits.double() / r


@dataclasses.dataclass(frozen=True)
class ExtendedPositives:
    """Complete positive sets of some queries, scored with mAP@R, R-Precision and R@K under ``prefix``.

    ``i2t[image_row] = caption rows``, ``t2i[caption_row] = image rows`` (rows of ``image_embeds`` /
    ``text_embeds``). Only the listed queries are scored (ECCV Caption scores its 1,332 / 1,261 annotated ones),
    and the lists replace the binary positives: add those yourself (:func:`with_binary_positives`).
    ``i2t_outside[image_row]`` / ``t2i_outside``: positives of a listed query that are not in the gallery; they
    count in R and are never retrieved.
    """

    i2t: Mapping[int, Sequence[int]] = dataclasses.field(default_factory=dict)
    t2i: Mapping[int, Sequence[int]] = dataclasses.field(default_factory=dict)
    i2t_outside: Mapping[int, int] = dataclasses.field(default_factory=dict)
    t2i_outside: Mapping[int, int] = dataclasses.field(default_factory=dict)
    prefix: str = "eccv_"


def with_binary_positives(extended: ExtendedPositives, caption_image_ids: ArrayLike) -> ExtendedPositives:
    """``extended`` with each listed query's binary positives added (i2t: the image's captions, t2i: its image)."""
    ids = np.asarray(_to_tensor(caption_image_ids).long())
    captions_of: dict[int, list[int]] = {}
    for caption, image in enumerate(ids.tolist()):
        captions_of.setdefault(image, []).append(caption)
    i2t = {int(q): list(dict.fromkeys([*captions_of.get(int(q), []), *map(int, v)])) for q, v in extended.i2t.items()}
    t2i = {}
    for q, v in extended.t2i.items():
        if not 0 <= int(q) < len(ids):
            raise ValueError(f"{extended.prefix}t2i: query caption row {q} is not a caption (0 <= row < {len(ids)}).")
        t2i[int(q)] = list(dict.fromkeys([int(ids[int(q)]), *map(int, v)]))
    return dataclasses.replace(extended, i2t=i2t, t2i=t2i)


class _PrecisionAtR:
    """Accumulates mAP@R, R-P (and R@K) of the listed queries of one direction, chunk by chunk."""

    def __init__(
        self, positives: Mapping[int, Sequence[int]], outside: Mapping[int, int], num_queries: int,
        num_gallery: int, what: str, recall_k: int = 0,
    ) -> None:
        queries = sorted(int(q) for q in positives)
        for q in queries:
            if not 0 <= q < num_queries:
                raise ValueError(f"{what}: query row {q} is not a query (0 <= row < {num_queries}).")
        for q in outside:
            if int(q) not in positives:
                raise ValueError(f"{what}: query row {q} has positives outside the gallery but no list of positives.")
        lists = []
        for q in queries:
            items = sorted({int(c) for c in positives[q]})
            if items and not (0 <= items[0] and items[-1] < num_gallery):
                bad = next(c for c in items if not 0 <= c < num_gallery)
                raise ValueError(f"{what}: positive {bad} of query {q} is not a gallery row (0 <= row < {num_gallery}).")
            lists.append(items)
        counts = [len(items) for items in lists]
        extra = [int(outside.get(q, 0)) for q in queries]
        if any(e < 0 for e in extra):
            raise ValueError(f"{what}: a negative count of positives outside the gallery.")
        self.queries = torch.tensor(queries, dtype=torch.long)
        self.items = torch.tensor([c for items in lists for c in items], dtype=torch.long)
        self.offsets = torch.zeros(len(queries) + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
        self.num_relevant = torch.tensor(counts, dtype=torch.long) + torch.tensor(extra, dtype=torch.long)
        empty = torch.nonzero(self.num_relevant < 1).flatten()
        if empty.numel():
            raise ValueError(f"{what}: query row {queries[int(empty[0])]} has no positive.")
        self.recall_k = recall_k
        self.ap = torch.zeros(len(queries), dtype=torch.float64)
        self.hits = torch.zeros(len(queries), dtype=torch.long)
        self.first = torch.zeros(len(queries), dtype=torch.long)

    @classmethod
    def binary_i2t(cls, ids: torch.Tensor, num_images: int) -> "_PrecisionAtR":
        self = cls.__new__(cls)
        sorted_ids, by_image = torch.sort(ids, stable=True)
        counts = torch.bincount(ids, minlength=num_images)
        self.queries = torch.arange(num_images)
        self.items, self.num_relevant = by_image, counts
        self.offsets = torch.zeros(num_images + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(counts, 0)
        self.recall_k = 0
        self.ap = torch.zeros(num_images, dtype=torch.float64)
        self.hits = torch.zeros(num_images, dtype=torch.long)
        self.first = torch.zeros(num_images, dtype=torch.long)
        return self

    def add(self, start: int, sim: torch.Tensor) -> None:
        lo, hi = torch.searchsorted(self.queries, torch.tensor([start, start + sim.shape[0]])).tolist()
        if lo == hi:
            return
        local = self.queries[lo:hi] - start
        sub = sim if hi - lo == sim.shape[0] else sim[local]
        a, b = int(self.offsets[lo]), int(self.offsets[hi])
        rows = torch.repeat_interleave(torch.arange(hi - lo), self.offsets[lo + 1 : hi + 1] - self.offsets[lo:hi])
        ap, hits, first = _precision_at_r_rows(sub, rows, self.items[a:b], self.num_relevant[lo:hi], self.recall_k)
        self.ap[lo:hi], self.hits[lo:hi], self.first[lo:hi] = ap, hits, first

    def result(self, prefix: str, direction: str, ks: Sequence[int] = ()) -> dict[str, float]:
        r = self.num_relevant.double()
        out = {
            f"{prefix}{direction}_map_at_r": 100.0 * float((self.ap / r).mean()),
            f"{prefix}{direction}_r_precision": 100.0 * float((self.hits.double() / r).mean()),
        }
        for k in ks:
            out[f"{prefix}{direction}_r{k}"] = 100.0 * float((self.first <= k).double().mean())
        return out


# ----------------------------------------------------------------------------------------------------------------
# Kendall tau (exact, O(n log n) per row, vectorised over rows)
# ----------------------------------------------------------------------------------------------------------------


def _tied_pairs(*sorted_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows sorted so that equal key tuples are adjacent: (sum over tie groups of t(t-1)/2, #distinct)."""
    b, n = sorted_keys[0].shape
    new = torch.ones(b, n, dtype=torch.bool)  # True where a tie group starts
    new[:, 1:] = False
    for key in sorted_keys:
        new[:, 1:] |= key[:, 1:] != key[:, :-1]
    pos = torch.arange(n).expand(b, n)
    group_start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values
    return (pos - group_start).sum(dim=1), new.sum(dim=1)


def _strict_inversions(v: torch.Tensor) -> torch.Tensor:
    """``#{i < j : v[i] > v[j]}`` per row in O(n log n).

    Top-down radix partition on the position bits: elements are visited by value descending (ties: position
    descending, so that equal values never count); at bit ``l`` each block of ``2^(l+1)`` positions splits into a
    left and right half, and every right-half element adds the number of left-half elements of its block already
    visited (larger value). A stable partition (cumsum + scatter) then yields the blocks of the next level.
    """
    b, n = v.shape
    inversions = torch.zeros(b, dtype=torch.long)
    if n < 2:
        return inversions
    order = torch.sort(v.flip(1), dim=1, descending=True, stable=True).indices
    pos = ((n - 1) - order).to(torch.int32)  # positions, visited by value desc then position desc
    k = torch.arange(n, dtype=torch.int32)
    for level in range((n - 1).bit_length() - 1, -1, -1):
        bit = (pos >> level) & 1  # 1 = right half of its block
        start = (k >> (level + 1)) << (level + 1)  # sequence index where the block of k starts
        before = torch.cumsum(1 - bit, dim=1, dtype=torch.int32) + (bit - 1)  # left-half elements before k
        left_before = before - before[:, start]  # ... within k's block
        inversions += (left_before * bit).sum(dim=1, dtype=torch.int64)
        if level == 0:
            break
        num_left = torch.clamp(n - start, max=1 << level)
        new_index = (start + left_before).add_(bit * (num_left + k - start - 2 * left_before))
        pos = torch.empty_like(pos).scatter_(1, new_index.long(), pos)
    return inversions


def _kendall_statistics(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact pair counts per row of ``x, y [B, n]``: S = n_c - n_d, x/y tie pairs, #distinct values.

    Knight's algorithm: sort lexicographically by (x, y); then discordant pairs = strict inversions of y
    in that order, and ``n_c - n_d = n0 - t_x - t_y + t_xy - 2 n_d`` with ``n0 = n(n-1)/2``.
    """
    b, n = x.shape
    order_y = torch.sort(y, dim=1, stable=True).indices
    y_sorted = y.gather(1, order_y)
    lex = order_y.gather(1, torch.sort(x.gather(1, order_y), dim=1, stable=True).indices)
    xs, ys = x.gather(1, lex), y.gather(1, lex)
    ties_x, distinct_x = _tied_pairs(xs)
    ties_y, distinct_y = _tied_pairs(y_sorted)
    ties_xy, _ = _tied_pairs(xs, ys)
    n0 = n * (n - 1) // 2
    discordant = _strict_inversions(ys)
    return {
        "s": n0 - ties_x - ties_y + ties_xy - 2 * discordant,
        "n0": torch.full((b,), n0, dtype=torch.long),
        "ties_x": ties_x,
        "ties_y": ties_y,
        "distinct_x": distinct_x,
        "distinct_y": distinct_y,
        "lex": lex,
    }


def _tau_b_from_stats(st: dict[str, torch.Tensor]) -> torch.Tensor:
    denom = torch.sqrt((st["n0"] - st["ties_x"]).double() * (st["n0"] - st["ties_y"]).double())
    tau = st["s"].double() / denom
    return torch.where(denom > 0, tau, torch.full_like(tau, math.nan))


def _pair_rows(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    xt, yt = _to_tensor(x), _to_tensor(y)
    if xt.shape != yt.shape or xt.ndim not in (1, 2):
        raise ValueError(f"`x` and `y` must be 1-D or 2-D of equal shape, got {tuple(xt.shape)} and {tuple(yt.shape)}.")
    batch_shape = tuple(xt.shape[:-1])
    xt = _float_tensor(xt.reshape(-1, xt.shape[-1]), "x", 2)
    yt = _float_tensor(yt.reshape(-1, yt.shape[-1]), "y", 2)
    return xt, yt, batch_shape


def kendall_tau_b(x: ArrayLike, y: ArrayLike) -> torch.Tensor:
    """Exact Kendall tau-b along the last dimension of ``x, y`` (``[n]`` or ``[B, n]``), float64 of shape
    ``x.shape[:-1]``: ``tau_b = (n_c - n_d) / sqrt((n0 - t_x)(n0 - t_y))``; NaN where x or y is constant.
    O(n log n) per row."""
    xt, yt, batch_shape = _pair_rows(x, y)
    return _tau_b_from_stats(_kendall_statistics(xt, yt)).reshape(batch_shape)


def kendall_tau_c(x: ArrayLike, y: ArrayLike) -> float:
    """Exact Stuart's Kendall tau-c of two 1-D samples (scipy ``kendalltau(variant="c")``):
    ``tau_c = 2 (n_c - n_d) / (n^2 (m - 1) / m)``, ``m = min(#distinct x, #distinct y)``; NaN if m < 2."""
    xt, yt = _to_tensor(x), _to_tensor(y)
    if xt.ndim != 1 or xt.shape != yt.shape:
        raise ValueError(f"`x` and `y` must be 1-D of equal length, got {tuple(xt.shape)} and {tuple(yt.shape)}.")
    n = xt.shape[0]
    if n < 2:
        return math.nan
    st = _kendall_statistics(_float_tensor(xt[None], "x", 2), _float_tensor(yt[None], "y", 2))
    m = int(torch.minimum(st["distinct_x"], st["distinct_y"])[0])
    if m < 2:
        return math.nan
    return float(2.0 * float(st["s"][0]) / (n * n * (m - 1) / m))


# ----------------------------------------------------------------------------------------------------------------
# nDCG and relevance-aware metrics
# ----------------------------------------------------------------------------------------------------------------


def _ndcg_from_order(relevance: torch.Tensor, lex: torch.Tensor, k: int) -> torch.Tensor:
    """nDCG@k given ``lex``: candidates in ascending (score, relevance) order, i.e. the ranking is its reverse."""
    k = min(k, relevance.shape[1])
    gains = relevance.double().clamp_min(0.0)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    top = gains.gather(1, lex[:, -k:].flip(1))
    ideal = torch.topk(gains, k, dim=1).values
    dcg, idcg = (top * discount).sum(1), (ideal * discount).sum(1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-300), torch.zeros_like(dcg))


def ndcg_at_k(scores: ArrayLike, relevance: ArrayLike, k: int = 10) -> torch.Tensor:
    """nDCG@k along the last dimension (``[n]`` or ``[B, n]``), float64 of shape ``scores.shape[:-1]``.

    Candidates ranked by score descending, ties broken towards the more relevant one (optimistic, like the
    ranks). ``DCG@k = sum_{p=1..k} g_p / log2(p + 1)`` with linear gain ``g = max(relevance, 0)``;
    ``nDCG = DCG / IDCG`` with IDCG from the k largest gains; 0 when IDCG = 0 (sklearn convention).
    """
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    st, rt, batch_shape = _pair_rows(scores, relevance)
    order_r = torch.sort(rt, dim=1, stable=True).indices
    lex = order_r.gather(1, torch.sort(st.gather(1, order_r), dim=1, stable=True).indices)
    return _ndcg_from_order(rt, lex, k).reshape(batch_shape)


def _relevance_rows(sim: torch.Tensor, rel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau_b [B], ndcg@k [B]) of rows, in blocks of bounded size, sharing one lexicographic sort."""
    taus, ndcgs = [], []
    step = max(1, _RELEVANCE_BLOCK_ELEMENTS // max(1, sim.shape[1]))
    for s in range(0, sim.shape[0], step):
        st = _kendall_statistics(sim[s : s + step], rel[s : s + step])
        taus.append(_tau_b_from_stats(st))
        ndcgs.append(_ndcg_from_order(rel[s : s + step], st["lex"], k))
    return torch.cat(taus), torch.cat(ndcgs)


class _RelevanceAccumulator:
    def __init__(self, k: int):
        self.k, self.taus, self.ndcgs = k, [], []

    def add(self, sim: torch.Tensor, rel: torch.Tensor) -> None:
        tau, ndcg = _relevance_rows(sim, rel, self.k)
        self.taus.append(tau)
        self.ndcgs.append(ndcg)

    def result(self, prefix: str) -> dict[str, float]:
        tau, ndcg = torch.cat(self.taus), torch.cat(self.ndcgs)
        undefined = int(torch.isnan(tau).sum())
        if undefined:
            logger.warning(
                "%sKendall tau-b undefined (constant similarity or relevance) for %d of %d queries; "
                "they are left out of the mean.", prefix, undefined, tau.numel(),
            )
        mean_tau = float(tau[~torch.isnan(tau)].mean()) if undefined < tau.numel() else math.nan
        return {f"{prefix}kendall_tau_b": mean_tau, f"{prefix}ndcg@{self.k}": float(ndcg.mean())}


def _relevance_chunk(
    relevance: RelevanceLike, start: int, end: int, num_columns: int, transpose: bool = False
) -> torch.Tensor:
    """Rows ``start:end`` of the relevance matrix (of its transpose if ``transpose``), checked."""
    if callable(relevance) and not isinstance(relevance, (torch.Tensor, np.ndarray)):
        block = relevance(np.arange(start, end))
        what = f"relevance(image rows {start}..{end - 1})"
    else:
        block = relevance[:, start:end].T if transpose else relevance[start:end]
        what = f"relevance[{':, ' if transpose else ''}{start}:{end}]"
    t = _to_tensor(block)
    if t.shape != (end - start, num_columns):
        raise ValueError(f"{what} must have shape {(end - start, num_columns)}, got {tuple(t.shape)}.")
    t = t.to(torch.float64 if t.dtype == torch.float64 or not t.is_floating_point() else torch.float32).contiguous()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        r, c = torch.nonzero(~finite)[0].tolist()
        image, caption = (c, r + start) if transpose else (r + start, c)
        raise ValueError(f"{what}: relevance of image {image} and caption {caption} is NaN or inf.")
    return t


# ----------------------------------------------------------------------------------------------------------------
# Main entry point
# ----------------------------------------------------------------------------------------------------------------


def retrieval_metrics(
    image_embeds: ArrayLike,
    text_embeds: ArrayLike,
    caption_image_ids: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    relevance: Optional[RelevanceLike] = None,
    ndcg_k: int = 10,
    precision_at_r: bool = True,
    extended_positives: Optional[Union[ExtendedPositives, Sequence[ExtendedPositives]]] = None,
) -> dict[str, float]:
    """Image->text and text->image retrieval metrics, chunked over queries.

    Args:
        image_embeds: ``[Ni, D]`` (torch or numpy), L2-normalised; similarity is the dot product.
        text_embeds: ``[Nt, D]``.
        caption_image_ids: ``[Nt]`` int, row in ``image_embeds`` of each caption's image. Every image needs >= 1
            caption; an image query is a hit at K if ANY of its captions is in the top K.
        ks: recall cut-offs.
        chunk_size: queries per chunk; at most ``chunk_size x max(Ni, Nt)`` similarities are alive at once.
        relevance: optional continuous relevance, an array ``[Ni, Nt]`` or a callable
            ``relevance(image_indices: np.ndarray) -> [len(image_indices), Nt]`` (rows fetched chunk by chunk).
        ndcg_k: cut-off of the relevance nDCG.
        precision_at_r: also mAP@R and R-Precision with the binary positives (see :func:`map_at_r`).
        extended_positives: one or more :class:`ExtendedPositives` (e.g. ECCV Caption's): mAP@R, R-Precision and
            R@K of their listed queries under their prefix, from the same similarity chunks.

    Returns:
        ``i2t_r{k}``, ``t2i_r{k}`` (percent), ``rsum``, ``i2t_medr``, ``i2t_meanr``, ``t2i_medr``, ``t2i_meanr``;
        with ``relevance``: ``kendall_tau_b`` (mean over image queries of tau-b between the similarity row and
        the relevance row over all Nt captions; rows where it is undefined are left out) and ``ndcg@{ndcg_k}``
        (see :func:`ndcg_at_k`); if ``relevance`` is an array, also ``t2i_kendall_tau_b`` and ``t2i_ndcg@{ndcg_k}``
        over caption queries (columns of ``relevance``); with ``precision_at_r``: ``i2t_map_at_r``,
        ``i2t_r_precision`` (R = the image's captions), ``t2i_map_at_r``, ``t2i_r_precision`` (R = 1, so both equal
        t2i R@1), in percent; per ``extended_positives`` ``e``: ``{e.prefix}{i2t,t2i}_{map_at_r,r_precision,r{k}}``
        and ``{e.prefix}{i2t,t2i}_num_queries`` for each direction with listed queries.
    """
    chunk_size = _check_chunk_size(chunk_size)
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"`ks` must be positive, got {ks}.")
    images, texts, ids = _prepare_retrieval_inputs(image_embeds, text_embeds, caption_image_ids)
    num_images, num_texts = images.shape[0], texts.shape[0]

    i2t_rel = t2i_rel = None
    on_i2t = on_t2i = None
    if relevance is not None:
        is_matrix = not callable(relevance) or isinstance(relevance, (torch.Tensor, np.ndarray))
        if is_matrix:
            if not isinstance(relevance, (torch.Tensor, np.ndarray)):
                relevance = np.asarray(relevance)
            if tuple(relevance.shape) != (num_images, num_texts):
                raise ValueError(
                    f"`relevance` must have shape {(num_images, num_texts)}, got {tuple(relevance.shape)}."
                )
        i2t_rel = _RelevanceAccumulator(ndcg_k)

        def on_i2t(start: int, sim: torch.Tensor) -> None:
            i2t_rel.add(sim, _relevance_chunk(relevance, start, start + sim.shape[0], num_texts))

        if is_matrix:
            t2i_rel = _RelevanceAccumulator(ndcg_k)

            def on_t2i(start: int, sim: torch.Tensor) -> None:
                t2i_rel.add(sim, _relevance_chunk(relevance, start, start + sim.shape[0], num_images, transpose=True))

    i2t_callbacks = [on_i2t] if on_i2t is not None else []
    t2i_callbacks = [on_t2i] if on_t2i is not None else []
    binary_i2t = _PrecisionAtR.binary_i2t(ids, num_images) if precision_at_r else None
    if binary_i2t is not None:
        i2t_callbacks.append(binary_i2t.add)
    if isinstance(extended_positives, ExtendedPositives):
        extended_positives = [extended_positives]
    extended = []
    for e in extended_positives or ():
        acc = {}
        for direction, lists, outside, nq, ng in (
            ("i2t", e.i2t, e.i2t_outside, num_images, num_texts), ("t2i", e.t2i, e.t2i_outside, num_texts, num_images),
        ):
            if lists:
                acc[direction] = _PrecisionAtR(lists, outside, nq, ng, f"{e.prefix}{direction}", max(ks, default=0))
                (i2t_callbacks if direction == "i2t" else t2i_callbacks).append(acc[direction].add)
        extended.append((e.prefix, acc))

    def call_all(callbacks):
        if not callbacks:
            return None

        def on_chunk(start: int, sim: torch.Tensor) -> None:
            for callback in callbacks:
                callback(start, sim)

        return on_chunk

    i2t = _i2t_ranks(images, texts, ids, chunk_size, call_all(i2t_callbacks))
    t2i = _t2i_ranks(images, texts, ids, chunk_size, call_all(t2i_callbacks))

    out_i2t, out_t2i = rank_summary(i2t, ks, "i2t_"), rank_summary(t2i, ks, "t2i_")
    out = {f"i2t_r{k}": out_i2t[f"i2t_r{k}"] for k in ks}
    out.update({f"t2i_r{k}": out_t2i[f"t2i_r{k}"] for k in ks})
    out["rsum"] = sum(out.values())
    for key in ("i2t_medr", "i2t_meanr"):
        out[key] = out_i2t[key]
    for key in ("t2i_medr", "t2i_meanr"):
        out[key] = out_t2i[key]
    if binary_i2t is not None:
        out.update(binary_i2t.result("", "i2t"))
        t2i_top = 100.0 * float((t2i == 1).double().mean())  # R = 1: AP = P@1 = 1[rank = 1]
        out.update({"t2i_map_at_r": t2i_top, "t2i_r_precision": t2i_top})
    if i2t_rel is not None:
        out.update(i2t_rel.result(""))
    if t2i_rel is not None:
        out.update(t2i_rel.result("t2i_"))
    for prefix, acc in extended:
        for direction, accumulator in acc.items():
            out.update(accumulator.result(prefix, direction, ks))
            out[f"{prefix}{direction}_num_queries"] = int(accumulator.queries.numel())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Human judgments (Flickr8k-Expert / CrowdFlower)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Judgment:
    """One human score: caption ``caption_image#caption_index`` judged for ``query_image``."""

    query_image: str
    caption_image: str
    caption_index: int
    score: float


def load_judgments(path: Union[str, os.PathLike], score_columns: Optional[Sequence[int]] = None) -> list[Judgment]:
    """Parse ``query_image<TAB>caption_image#k<TAB>score[<TAB>score...]`` lines; each score is its own Judgment.

    Blank lines are skipped. ``score_columns`` (0-based among the score fields) keeps only some scores, e.g.
    ``(0,)`` for CrowdFlowerAnnotations.txt whose fields are (percent yes, #yes, #no). Malformed lines raise a
    ValueError naming ``path:line``.
    """
    judgments: list[Judgment] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            where = f"{os.fspath(path)}:{lineno}"
            fields = [field.strip() for field in line.split("\t")]
            if len(fields) < 3:
                raise ValueError(
                    f"{where}: expected 'query_image<TAB>caption_image#k<TAB>score[...]', "
                    f"got {len(fields)} field(s): {line!r}"
                )
            query, caption_id, scores = fields[0], fields[1], fields[2:]
            if not query:
                raise ValueError(f"{where}: empty query image field.")
            caption_image, sep, index = caption_id.rpartition("#")
            if not sep or not caption_image:
                raise ValueError(f"{where}: caption id {caption_id!r} is not of the form 'image#k'.")
            try:
                caption_index = int(index)
            except ValueError:
                raise ValueError(f"{where}: caption index {index!r} in {caption_id!r} is not an integer.") from None
            if caption_index < 0:
                raise ValueError(f"{where}: caption index {caption_index} in {caption_id!r} is negative.")
            selected = range(len(scores)) if score_columns is None else score_columns
            for column in selected:
                if not 0 <= column < len(scores):
                    raise ValueError(
                        f"{where}: score column {column} requested but the line has {len(scores)} score(s)."
                    )
                try:
                    score = float(scores[column])
                except ValueError:
                    raise ValueError(f"{where}: score {column + 1} = {scores[column]!r} is not a number.") from None
                if not math.isfinite(score):
                    raise ValueError(f"{where}: score {column + 1} = {scores[column]!r} is not finite.")
                judgments.append(Judgment(query, caption_image, caption_index, score))
    return judgments


def judgment_correlation(
    judgments: Sequence[Judgment], similarity_fn: Callable[[str, str, int], Optional[float]]
) -> dict[str, float]:
    """Kendall tau-c between model similarity and human scores over all (query, caption, score) pairs.

    ``similarity_fn(query_image, caption_image, caption_index)`` returns the model similarity, or None (or NaN)
    when the image/caption is unknown: such pairs are counted in ``num_missing`` and logged. Returns
    ``{"kendall_tau_c", "num_pairs", "num_missing"}``.
    """
    cache: dict[tuple[str, str, int], Optional[float]] = {}
    sims, scores, missing = [], [], []
    for judgment in judgments:
        key = (judgment.query_image, judgment.caption_image, judgment.caption_index)
        if key not in cache:
            value = similarity_fn(*key)
            cache[key] = None if value is None or not math.isfinite(float(value)) else float(value)
        if cache[key] is None:
            missing.append(key)
            continue
        sims.append(cache[key])
        scores.append(judgment.score)
    if missing:
        logger.warning(
            "%d of %d judgment pairs have no model similarity and are skipped (first: %s#%d for %s).",
            len(missing), len(judgments), missing[0][1], missing[0][2], missing[0][0],
        )
    tau = kendall_tau_c(np.asarray(sims, dtype=np.float64), np.asarray(scores, dtype=np.float64)) if sims else math.nan
    return {"kendall_tau_c": tau, "num_pairs": len(sims), "num_missing": len(missing)}


# ----------------------------------------------------------------------------------------------------------------
# evaluate module
# ----------------------------------------------------------------------------------------------------------------

_DESCRIPTION = """\
Image-text retrieval metrics for BCLS: image->text and text->image Recall@K, rsum, median and mean rank,
computed in chunks of queries, plus optional relevance-aware Kendall tau-b and nDCG@k.
"""

_CITATION = """\
@inproceedings{faghri2018vse++,
  title={VSE++: Improving Visual-Semantic Embeddings with Hard Negatives},
  author={Faghri, Fartash and Fleet, David J and Kiros, Jamie Ryan and Fidler, Sanja},
  booktitle={BMVC}, year={2018}
}
"""

_KWARGS_DESCRIPTION = """\
One input row per (image, caption) pair, i.e. the BCLS pair view:
    image_embeds: embedding of the pair's image (list/array of D floats).
    text_embeds: embedding of the pair's caption (list/array of D floats).
    image_ids: integer id of the pair's image; rows sharing an id share the image.
Compute keyword arguments:
    ks (default (1, 5, 10)), chunk_size (default 1024), ndcg_k (default 10),
    relevance: optional [Ni, Nt] array or callable (see retrieval_metrics), rows = images in ascending
        image_id order, columns = captions in the order the rows were added,
    image_embed_atol (default 1e-2): rows of one image_id must have image embeddings equal within this
        tolerance (None disables the check),
    precision_at_r (default True): also mAP@R and R-Precision,
    extended_positives: optional ExtendedPositives (rows and columns numbered as for relevance).
Returns: the retrieval_metrics dictionary (i2t_r1, ..., rsum, i2t_medr, ..., i2t_map_at_r, i2t_r_precision, ...).
Example:
    >>> metric = evaluate.load("trainer_bcls/evaluation/metrics.py")
    >>> metric.add_batch(image_embeds=out.image_embeds, text_embeds=out.text_embeds, image_ids=batch["image_ids"])
    >>> metric.compute()
"""


class BCLSRetrievalMetric(evaluate.Metric):
    """Retrieval metrics as an ``evaluate`` module, fed row-wise in the pair view.

    Each row is one (image, caption) pair: ``image_embeds`` [D], ``text_embeds`` [D], ``image_ids`` (int). This is
    exactly what a BCLS eval batch produces (``BCLSOutput.image_embeds``, ``.text_embeds`` and the batch's
    ``image_ids``), so ``add_batch`` can be called per batch and works with ``num_process`` > 1. At ``compute``
    time the images are de-duplicated by ``image_id`` (image rows in ascending id order, first occurrence kept),
    captions keep the row order, and :func:`retrieval_metrics` runs chunked on ``[Ni, D]`` x ``[Nt, D]``: the
    cache holds ``O((Ni + Nt) D)`` floats, never the ``Ni x Nt`` similarity matrix.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "image_embeds": datasets.Sequence(datasets.Value("float32")),
                    "text_embeds": datasets.Sequence(datasets.Value("float32")),
                    "image_ids": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://github.com/fartashf/vsepp"],
        )

    def _compute(
        self,
        image_embeds,
        text_embeds,
        image_ids,
        ks: Sequence[int] = (1, 5, 10),
        chunk_size: int = 1024,
        relevance: Optional[RelevanceLike] = None,
        ndcg_k: int = 10,
        image_embed_atol: Optional[float] = 1e-2,
        precision_at_r: bool = True,
        extended_positives: Optional[Union[ExtendedPositives, Sequence[ExtendedPositives]]] = None,
    ) -> dict[str, float]:
        if len(image_ids) == 0:
            raise ValueError("No (image, caption) rows were added to the metric.")
        try:
            images = np.asarray(image_embeds, dtype=np.float32)
            texts = np.asarray(text_embeds, dtype=np.float32)
        except ValueError as err:
            raise ValueError(f"All embeddings must have the same dimension ({err}).") from None
        if images.ndim != 2 or texts.ndim != 2:
            raise ValueError(f"Embeddings must be 2-D, got shapes {images.shape} and {texts.shape}.")
        ids = np.asarray(image_ids, dtype=np.int64)
        unique_ids, first_row, caption_image_ids = np.unique(ids, return_index=True, return_inverse=True)
        unique_images = images[first_row]
        if image_embed_atol is not None:
            diff = np.abs(images - unique_images[caption_image_ids]).max(axis=1)
            bad = np.flatnonzero(diff > image_embed_atol)
            if bad.size:
                row = int(bad[0])
                raise ValueError(
                    f"Row {row}: image_ids={int(ids[row])} has an image embedding differing by {diff[row]:.3g} from "
                    f"row {int(first_row[caption_image_ids[row]])} of the same image "
                    f"(> image_embed_atol={image_embed_atol})."
                )
        return retrieval_metrics(
            unique_images, texts, caption_image_ids.reshape(-1), ks=ks, chunk_size=chunk_size,
            relevance=relevance, ndcg_k=ndcg_k, precision_at_r=precision_at_r, extended_positives=extended_positives,
        )
