"""Pair-view rows → a BCLS training batch with binary and continuous labels.

``BCLSDataCollator(processor, relevance)(rows)`` returns::

    pixel_values         float32 [B, 3, H, W]
    input_ids, attention_mask (+ token_type_ids if the tokenizer makes them)   [B, L]
    image_ids            int64 [B]       positives: image_ids[a] == image_ids[b]
    caption_ids          int64 [B]
    relevance            float32 [B, B]  R[a, b] = relevance(image of pair a, caption of pair b)   (with labels)
    reference_embeds, reference_mask, caption_embeds     (streamed labels only: what R was built from, for the
                         multi-process loss; see trainer_bcls.labels.streamed_relevance)
    relevance_order_i2t  int64 [B, B]    relevance_sort_order(R)     (the SW-HS sort order, precomputed here)
    relevance_order_t2i  int64 [B, B]    relevance_sort_order(R.T)
    return_loss          True

With ``hard_negatives_per_row=k`` (rows carry the mined ``hard_negative_caption_ids`` / ``hard_negatives`` columns of
:func:`~trainer_bcls.training.hard_negative_mining.mine_hard_negatives`), each row adds up to k of its image's mined
captions as extra text candidates (the i-th pair of an image takes them from position ``caption_id mod n`` on, so the
five pairs of an image use different ones; a caption already in the batch is not added twice)::

    hard_negative_caption_ids   int64 [E]
    hard_negative_image_ids     int64 [E]       the image each extra caption belongs to (positives by image id)
    hard_negative_input_ids, hard_negative_attention_mask (+ token_type_ids)   [E, L]   (when tokenising)
    relevance            float32 [B, B + E]  the extra candidates' columns follow the paired captions'
    relevance_order_i2t  int64 [B, B + E];   relevance_order_t2i over R[:, :B].T (text queries: paired captions only)

Relevance comes from :class:`~trainer_bcls.labels.relevance.RelevanceLabels` (cached caption embeddings: a lookup and a
small matmul, no model call), so the collator is cheap and picklable and runs inside DataLoader worker processes; or
from :class:`~trainer_bcls.labels.streamed_relevance.StreamedRelevanceLabels` (captions embedded on arrival, the
references of a row = the captions its sample carries: the row's ``captions`` list, else its own ``caption``).
Give the Trainer ``remove_unused_columns=False`` so that rows keep ``image``/``caption``/``image_id``/``caption_id``.

Bad rows: a missing/corrupt image or an empty/non-string caption raises :class:`InvalidDataError` naming the file and
row; with ``skip_invalid=True`` the row is dropped from the batch (counted in ``num_skipped``, per process, and
logged) and the labels are built for the remaining rows only. For corrupt images to reach the collator, the image
column must not be decoded by ``datasets`` first: pass ``trainer_bcls.data.loaders.without_image_decoding(pairs)``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from modeling_bcls.losses import relevance_sort_order

from ..data.errors import InvalidDataError
from ..data.image_loading import ImageLoadError, load_image
from ..labels.relevance import RelevanceLabels
from ..labels.streamed_relevance import StreamedRelevanceLabels

logger = logging.getLogger(__name__)

ROW_KEYS = ("image", "caption", "image_id", "caption_id")


class BCLSDataCollator:
    """Collate pair-view rows into model inputs + labels (see the module docstring for the output).

    Args:
        processor: a ``BCLSProcessor`` (or anything called as ``processor(images=, text=, padding=, truncation=,
            max_length=, return_tensors="pt")`` returning ``pixel_values``, ``input_ids``, ``attention_mask``).
        relevance: the training split's :class:`RelevanceLabels`; ``None`` gives a batch without relevance keys.
        max_length: caption truncation length in tokens (``None``: no truncation).
        skip_invalid: drop bad rows (counted, logged) instead of raising.
        image_transform: a picklable ``PIL.Image -> PIL.Image`` callable applied before the processor, e.g.
            :class:`~trainer_bcls.data.augmentation.RandomResizedCropFlip` (off by default).
        hard_negatives_per_row: mined hard negatives added per row as extra text candidates (0: none).
    """

    def __init__(
        self,
        processor,
        relevance: RelevanceLabels | StreamedRelevanceLabels | None = None,
        max_length: int | None = 64,
        skip_invalid: bool = False,
        image_transform: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
        hard_negatives_per_row: int = 0,
    ):
        if hard_negatives_per_row < 0:
            raise ValueError(f"hard_negatives_per_row must be >= 0, got {hard_negatives_per_row}")
        if hard_negatives_per_row and isinstance(relevance, StreamedRelevanceLabels):
            raise ValueError("mined hard negatives are caption ids of a map-style split: they do not combine with "
                             "streamed relevance labels")
        self.hard_negatives_per_row = int(hard_negatives_per_row)
        self.processor = processor
        self.relevance = relevance
        self.max_length = max_length
        self.skip_invalid = skip_invalid
        self.image_transform = image_transform
        self.num_skipped = 0
        # Set by BCLSTrainer when the lock-boundary caches hold every image / caption of the split
        # (`feature_cache.py`): the batch then carries ids only, no pixels / tokens.
        self.load_images = True
        self.tokenize = True
        self.invalid_image_ids: frozenset[int] = frozenset()

    def _skip(self, error: InvalidDataError) -> None:
        if not self.skip_invalid:
            raise error
        self.num_skipped += 1
        logger.warning("skipping a bad row (%d skipped so far in this process): %s", self.num_skipped, error)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        images, captions, image_ids, caption_ids, references, kept_rows = [], [], [], [], [], []
        for k, row in enumerate(rows):
            missing = [key for key in ROW_KEYS if key not in row and (key != "image" or self.load_images)]
            if missing:
                raise KeyError(
                    f"batch row {k} has no {missing} (keys: {sorted(row)}); pass pair-view rows "
                    "(trainer_bcls.data.loaders.load_pairs) and set remove_unused_columns=False in the training arguments"
                )
            where = f"batch row {k}: image_id {row['image_id']}, caption_id {row['caption_id']}"
            if row.get("filename"):
                where += f", file {row['filename']}"
            caption = row["caption"]
            if not isinstance(caption, str) or not caption.strip():
                self._skip(InvalidDataError(f"{where}: caption must be a non-empty string, got {caption!r:.80}"))
                continue
            if int(row["image_id"]) in self.invalid_image_ids:
                self._skip(InvalidDataError(f"{where}: the image could not be loaded (see the feature cache's warning)"))
                continue
            if self.load_images:
                try:
                    image = load_image(row["image"], where=where)
                except ImageLoadError as err:
                    self._skip(err)
                    continue
                if self.image_transform is not None:
                    image = self.image_transform(image)
                images.append(image)
            captions.append(caption)
            references.append(row.get("captions") or [caption])
            image_ids.append(int(row["image_id"]))
            caption_ids.append(int(row["caption_id"]))
            kept_rows.append(k)
        if not captions:
            raise InvalidDataError(f"every row of a batch of {len(rows)} was invalid (see the warnings above)")
        extra_ids, extra_images, extra_texts = self._hard_negatives([rows[k] for k in kept_rows], set(caption_ids))

        batch: dict[str, Any] = {}
        if self.load_images or self.tokenize:
            inputs = self.processor(
                images=images if self.load_images else None,
                text=captions + extra_texts if self.tokenize else None,
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            )
            for key, value in inputs.items():
                if self.tokenize and key != "pixel_values" and extra_ids:
                    batch[f"hard_negative_{key}"] = value[len(captions):]
                    value = value[: len(captions)]
                batch[key] = value
        if self.load_images:
            batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
        batch["image_ids"] = torch.tensor(image_ids, dtype=torch.int64)
        batch["caption_ids"] = torch.tensor(caption_ids, dtype=torch.int64)
        if self.hard_negatives_per_row:
            batch["hard_negative_caption_ids"] = torch.tensor(extra_ids, dtype=torch.int64)
            batch["hard_negative_image_ids"] = torch.tensor(extra_images, dtype=torch.int64)
        if isinstance(self.relevance, StreamedRelevanceLabels):
            batch.update(self.relevance.batch_inputs(references, captions, image_ids))
            relevance = batch["relevance"]
            batch["relevance_order_t2i"] = relevance_sort_order(relevance.T.contiguous())
        elif self.relevance is not None:
            image_array, caption_array = np.asarray(image_ids), np.asarray(caption_ids)
            relevance = self.relevance.batch_matrix(image_array, caption_array)
            batch["relevance_order_t2i"] = relevance_sort_order(relevance.T.contiguous())
            if extra_ids:
                extra = self.relevance.candidate_matrix(image_array, caption_array, np.asarray(extra_ids))
                relevance = torch.cat([relevance, extra], dim=1)
            batch["relevance"] = relevance
        if self.relevance is not None:
            batch["relevance_order_i2t"] = relevance_sort_order(relevance)
        batch["return_loss"] = True
        return batch

    def _hard_negatives(self, rows: list[dict[str, Any]], in_batch: set[int]) -> tuple[list[int], list[int], list[str]]:
        """Up to ``hard_negatives_per_row`` mined captions per row (see the module docstring): caption ids, their
        images and texts, without captions already in the batch or repeated."""
        k = self.hard_negatives_per_row
        if not k:
            return [], [], []
        ids, images, texts, seen = [], [], [], set(in_batch)
        for row in rows:
            if "hard_negative_caption_ids" not in row:
                raise KeyError(
                    f"hard_negatives_per_row={k} but the rows have no hard_negative_caption_ids column (keys: "
                    f"{sorted(row)}): mine them first (examples/mine_hard_negatives.py) and train on its output"
                )
            mined = row["hard_negative_caption_ids"] or []
            mined_images = row["hard_negative_image_ids"] or []
            mined_texts = row["hard_negatives"] or []
            if not (len(mined) == len(mined_images) == len(mined_texts)):
                raise InvalidDataError(
                    f"image_id {row['image_id']}: hard_negative_caption_ids, hard_negative_image_ids and "
                    f"hard_negatives have different lengths ({len(mined)}, {len(mined_images)}, {len(mined_texts)})"
                )
            start = int(row["caption_id"]) % len(mined) if mined else 0
            for j in range(min(k, len(mined))):
                position = (start + j) % len(mined)
                caption_id = int(mined[position])
                if caption_id in seen:
                    continue
                seen.add(caption_id)
                ids.append(caption_id)
                images.append(int(mined_images[position]))
                texts.append(mined_texts[position])
        if ids and isinstance(self.relevance, RelevanceLabels):
            index = self.relevance.index
            ids_array = np.asarray(ids)
            bad = np.flatnonzero((ids_array >= index.num_captions) | (ids_array < 0))
            if not len(bad):
                bad = np.flatnonzero(index.caption_image_ids[ids_array] != np.asarray(images))
            if len(bad):
                k = int(bad[0])
                raise InvalidDataError(
                    f"mined caption_id {ids[k]} (hard_negative_image_ids {images[k]}) is not a caption of that image in "
                    f"the training split ({index.num_captions} captions): were the hard negatives mined on other data?"
                )
        return ids, images, texts

    def __repr__(self) -> str:
        return (
            f"BCLSDataCollator(relevance={self.relevance!r}, max_length={self.max_length}, "
            f"skip_invalid={self.skip_invalid}, image_transform={self.image_transform!r}, "
            f"hard_negatives_per_row={self.hard_negatives_per_row})"
        )


__all__ = ["BCLSDataCollator"]
