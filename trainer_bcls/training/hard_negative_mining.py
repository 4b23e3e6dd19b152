"""Mined hard negatives: for each training image, the captions of other images that a first-pass model scores
highest but whose continuous relevance says they do not describe it.

For image ``i`` with embedding ``v_i``, captions ``t_c`` (all captions of the split) and relevance ``R[i, c]``
(:class:`~trainer_bcls.labels.relevance.RelevanceLabels`, the image's own captions as references)::

    candidates(i) = the range_max captions of other images with the highest s(i, c) = v_i · t_c
    kept(i)       = [c ∈ candidates(i) in decreasing s : R[i, c] < θ  and  s(i, c) <= (1 − m) · mean_{p ∈ own(i)} s(i, p)]
    mined(i)      = the first num_negatives of kept(i)

``θ = relevance_threshold`` keeps likely false negatives (captions about as relevant as the image's own) out;
``m = relative_margin`` (optional) also drops candidates scored too close to the image's own captions. This follows
sentence-transformers' ``mine_hard_negatives`` (``range_max``, ``relative_margin``, ``num_negatives``), with the
graded labels in place of its ``max_score`` cut. The result is the pair view with three list columns per row (the
same for every pair of an image): ``hard_negative_caption_ids``, ``hard_negative_image_ids`` and ``hard_negatives``
(the texts); :class:`~trainer_bcls.training.collator.BCLSDataCollator` with ``hard_negatives_per_row`` adds them to
batches as extra, negative-only text candidates.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import torch
from datasets import Dataset

from ..data.caption_index import ImageCaptionIndex
from ..data.loaders import without_image_decoding
from ..evaluation.split_evaluation import EncodedSplit, encode_split
from ..labels.relevance import RelevanceLabels

logger = logging.getLogger(__name__)

MINED_COLUMNS = ("hard_negative_caption_ids", "hard_negative_image_ids", "hard_negatives")


def mine_from_embeddings(
    encoded: EncodedSplit,
    relevance: RelevanceLabels,
    *,
    num_negatives: int = 5,
    range_max: int = 50,
    relevance_threshold: float = 0.5,
    relative_margin: float | None = None,
    chunk_size: int = 512,
) -> tuple[list[list[int]], dict[str, float]]:
    """The mined caption ids of every image (list index = image id) and counts of what was left out."""
    if num_negatives < 1 or range_max < num_negatives:
        raise ValueError(f"need 1 <= num_negatives <= range_max, got num_negatives={num_negatives}, range_max={range_max}")
    if relative_margin is not None and not 0 <= relative_margin < 1:
        raise ValueError(f"relative_margin must be in [0, 1), got {relative_margin}")
    if not np.isfinite(relevance_threshold):
        raise ValueError(f"relevance_threshold must be a finite number, got {relevance_threshold}")
    caption_images = torch.as_tensor(encoded.caption_image_ids)
    texts = encoded.text_embeds.float()
    num_images = encoded.image_embeds.shape[0]
    range_max = min(range_max, texts.shape[0])
    mined: list[list[int]] = []
    left_out = {"relevance": 0, "margin": 0, "short_images": 0}
    for start in range(0, num_images, chunk_size):
        ids = torch.arange(start, min(start + chunk_size, num_images))
        scores = encoded.image_embeds[ids].float() @ texts.T  # [c, N_captions]
        own = caption_images[None, :] == ids[:, None]
        positive_mean = (scores * own).sum(1) / own.sum(1).clamp_min(1)
        top_scores, top = scores.masked_fill(own, float("-inf")).topk(range_max, dim=1)  # sorted, descending
        flat_images = ids[:, None].expand_as(top).reshape(-1).numpy()
        rel = torch.from_numpy(relevance.values(flat_images, top.reshape(-1).numpy())).view_as(top_scores)
        keep = torch.isfinite(top_scores) & (rel < relevance_threshold)
        left_out["relevance"] += int((torch.isfinite(top_scores) & ~keep).sum())
        if relative_margin is not None:
            close = top_scores > (1 - relative_margin) * positive_mean[:, None]
            left_out["margin"] += int((keep & close).sum())
            keep &= ~close
        for row in range(len(ids)):
            chosen = top[row][keep[row]][:num_negatives].tolist()
            left_out["short_images"] += len(chosen) < num_negatives
            mined.append(chosen)
    counts = {
        "images": num_images,
        "mined_per_image": float(np.mean([len(m) for m in mined])) if mined else 0.0,
        "candidates_left_out_as_relevant": left_out["relevance"],
        "candidates_left_out_by_margin": left_out["margin"],
        "images_with_fewer_than_num_negatives": left_out["short_images"],
    }
    return mined, counts


def encode_split_from_caches(
    model, pairs: Dataset, processor, cache_dir, *, batch_size: int = 64, max_length: int | None = None,
    show_progress: bool = True,
) -> EncodedSplit:
    """:func:`encode_split` for a model with locked towers, from the lock-boundary feature caches that training
    filled (``feature_cache_dir``): only what is not cached yet runs through the towers, then the projections."""
    from .feature_cache import build_feature_caches, cached_text_pooled, cached_vision_pooled
    from .tower_freezing import freeze_towers

    freeze_towers(model, freeze_vision_model=True, freeze_text_model=True)  # no gradient here: the towers are locked
    caches = build_feature_caches(  # undecoded images: keyed by file, as in training
        model, without_image_decoding(pairs), processor, max_length=max_length, cache_images=True, cache_text=True,
        gradcache=False, cache_dir=cache_dir, batch_size=batch_size, show_progress=show_progress,
    )
    if caches.vision is None or caches.text is None or caches.invalid_image_ids:
        raise ValueError("the feature caches cover not every image and caption of the split: mine without them")
    index = ImageCaptionIndex.from_pairs(pairs)
    device = next(model.parameters()).device
    image_ids = torch.arange(index.num_images, device=device)
    caption_ids = torch.arange(index.num_captions, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image_embeds = torch.cat([
                model(vision_pooled_output=cached_vision_pooled(model, caches.vision, ids, nullcontext)).image_embeds
                for ids in image_ids.split(1024)])
            text_embeds = torch.cat([
                model(text_pooled_output=cached_text_pooled(model, caches.text, ids, nullcontext)).text_embeds
                for ids in caption_ids.split(1024)])
    finally:
        model.train(was_training)
    return EncodedSplit(image_embeds=image_embeds.cpu(), text_embeds=text_embeds.cpu(), index=index)


def mine_hard_negatives(
    model,
    pairs: Dataset,
    processor,
    relevance: RelevanceLabels,
    *,
    num_negatives: int = 5,
    range_max: int = 50,
    relevance_threshold: float = 0.5,
    relative_margin: float | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    feature_cache_dir=None,
    show_progress: bool = True,
) -> tuple[Dataset, dict[str, float]]:
    """Embed the split with ``model`` (each image once, every caption) and mine (see the module docstring).

    ``feature_cache_dir``: the lock-boundary feature caches of training (a model whose towers were locked): the
    pooled tower outputs are read from there (:func:`encode_split_from_caches`) instead of running the towers.
    Returns the pair view with the :data:`MINED_COLUMNS` added, and the counts of :func:`mine_from_embeddings`.
    """
    if relevance.index.num_captions != len(pairs):
        raise ValueError(
            f"the relevance labels cover {relevance.index.num_captions} captions but the pair view has {len(pairs)} "
            "rows: build them from the same split"
        )
    present = [c for c in MINED_COLUMNS if c in pairs.column_names]
    if present:
        raise ValueError(f"the pairs already have mined columns {present}: mine from the plain pair view")
    if feature_cache_dir is not None:
        encoded = encode_split_from_caches(model, pairs, processor, feature_cache_dir, batch_size=batch_size,
                                           max_length=max_length, show_progress=show_progress)
    else:
        encoded = encode_split(model, pairs, processor, batch_size, max_length, show_progress)
    mined, counts = mine_from_embeddings(
        encoded, relevance, num_negatives=num_negatives, range_max=range_max,
        relevance_threshold=relevance_threshold, relative_margin=relative_margin,
    )
    captions = relevance.index.captions
    caption_images = encoded.caption_image_ids
    image_ids = pairs["image_id"]
    columns = {
        "hard_negative_caption_ids": [mined[i] for i in image_ids],
        "hard_negative_image_ids": [[int(caption_images[c]) for c in mined[i]] for i in image_ids],
        "hard_negatives": [[captions[c] for c in mined[i]] for i in image_ids],
    }
    for name, values in columns.items():
        pairs = pairs.add_column(name, values)
    logger.info("mined hard negatives: %s", counts)
    return pairs, counts


__all__ = ["MINED_COLUMNS", "encode_split_from_caches", "mine_from_embeddings", "mine_hard_negatives"]
