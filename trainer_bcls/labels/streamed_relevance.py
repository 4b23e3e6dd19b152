"""Relevance labels for streamed data: captions embedded as they arrive, references = the sample's own captions.

A streamed sample (one image, one or several captions) brings its references with it. For a batch of pairs
``(image of sample a, caption_a)`` carrying the reference captions ``refs(a)`` of their samples::

    R[a, b] = max_{c ∈ refs(a)} cos(e(c), e(caption_b)),     R[a, b] = 1 where image_ids[a] == image_ids[b]

— the same formula as :class:`~trainer_bcls.labels.relevance.RelevanceLabels`, but ``refs(a)`` are the captions
the *sample* carries, not every caption of the image in the split (a stream has no split-wide caption index). When
a sample carries all captions of its image (Flickr / COCO shards), the labels equal the map-style ``"all"`` labels;
with one caption per sample (LAION-style alt-text) they equal the map-style ``"paired"`` labels.

Captions are embedded on arrival by a dense :class:`CaptionEmbedder` (the sentence embedder; TF-IDF must be fitted
on the whole split first and cannot label a stream) through a bounded on-disk cache keyed by caption text
(:class:`~trainer_bcls.labels.caption_embedding_store.CaptionEmbeddingStore`). :meth:`batch_inputs` is what the
collator calls (in DataLoader workers too): it returns the label matrix and the embeddings it was built from
(``reference_embeds [B, K, D]``, ``reference_mask [B, K]``, ``caption_embeds [B, D]``), which the multi-process loss
gathers to rebuild the cross-process blocks with :func:`relevance_from_embeddings` — no split-wide ids needed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cache import bcls_cache_dir
from .caption_embedders import CaptionEmbedder
from .caption_embedding_store import CaptionEmbeddingStore, caption_digest

logger = logging.getLogger(__name__)

__all__ = ["STREAM_LABEL_KEYS", "StreamedRelevanceLabels", "relevance_from_embeddings"]

STREAM_LABEL_KEYS = ("reference_embeds", "reference_mask", "caption_embeds")


def relevance_from_embeddings(
    reference_embeds: torch.Tensor,
    reference_mask: torch.Tensor,
    caption_embeds: torch.Tensor,
    row_image_ids: torch.Tensor,
    column_image_ids: torch.Tensor,
) -> torch.Tensor:
    """``R[a, b] = max_{k: mask[a, k]} ref[a, k] · cap[b]``, clipped to [-1, 1], and 1 where the image ids match.

    Shapes: ``reference_embeds [A, K, D]``, ``reference_mask [A, K]`` (bool), ``caption_embeds [B, D]``,
    ``row_image_ids [A]``, ``column_image_ids [B]`` → ``float32 [A, B]``."""
    sim = torch.einsum("akd,bd->akb", reference_embeds.float(), caption_embeds.float())
    sim = sim.masked_fill(~reference_mask.bool()[:, :, None], float("-inf")).amax(dim=1).clamp(-1.0, 1.0)
    positive = row_image_ids.reshape(-1, 1) == column_image_ids.reshape(1, -1)
    return torch.where(positive, torch.ones_like(sim), sim).contiguous()


class StreamedRelevanceLabels:
    """Labels of streamed samples: embed-on-arrival with a bounded cache (see the module docstring).

    Args:
        embedder: a dense :class:`CaptionEmbedder` (``SentenceEmbeddingRelevance``); TF-IDF is refused.
        cache_dir: the caption-embedding cache (default ``<bcls cache>/stream_caption_embeddings``); ``None`` with
            ``use_cache=False`` keeps embeddings in memory only.
        max_cache_gb: on-disk bound of the cache (it stops growing past it).
        max_references: references kept per sample (the first ones; the batch pads to this many).
        max_memory_rows: in-memory bound of the cache, in captions.
    """

    references = "sample"

    def __init__(
        self,
        embedder: CaptionEmbedder,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        max_cache_gb: float = 2.0,
        max_references: int = 8,
        max_memory_rows: int = 500_000,
    ):
        from .caption_embedders import TfidfRelevance

        if isinstance(embedder, TfidfRelevance) or embedder.is_lookup:
            raise ValueError(
                f"{embedder.name} cannot label a stream: TF-IDF is fitted on every caption of the split and a "
                "precomputed file is indexed by split caption ids; streamed relevance embeds captions as they arrive "
                "(--relevance sentence), or use --relevance none"
            )
        if max_references < 1:
            raise ValueError(f"max_references must be >= 1, got {max_references}")
        self.embedder = embedder
        self.embedder_key = embedder.cache_key
        self.max_references = max_references
        folder = None
        if use_cache:
            import hashlib

            root = Path(cache_dir) if cache_dir is not None else bcls_cache_dir("stream_caption_embeddings")
            folder = root / hashlib.sha256(self.embedder_key.encode()).hexdigest()[:24]
        self.store = CaptionEmbeddingStore(folder, self.embedder_key, max_cache_gb=max_cache_gb,
                                           max_memory_rows=max_memory_rows)
        self.num_encoded = 0  # captions embedded by the model in this process

    def embed(self, captions: Sequence[str]) -> np.ndarray:
        """``float32 [N, D]`` rows for ``captions`` (cache first; the missing unique captions in one model call)."""
        digests = [caption_digest(c) for c in captions]
        found = self.store.get(digests)
        missing: dict[bytes, str] = {}
        for digest, caption, row in zip(digests, captions, found):
            if row is None:
                missing.setdefault(digest, caption)
        if missing:
            rows = np.asarray(self.embedder.embed(list(missing.values()), show_progress_bar=False), dtype=np.float32)
            self.num_encoded += len(missing)
            self.store.put(list(missing), rows)
            new = dict(zip(missing, rows))
            found = [row if row is not None else new[d] for d, row in zip(digests, found)]
        if not found:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(found).astype(np.float32, copy=False)

    def batch_inputs(
        self, references: Sequence[Sequence[str]], captions: Sequence[str], image_ids: Sequence[int] | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The labels of a batch of pairs and the embeddings they come from.

        ``references[a]``: the captions carried by pair a's sample (its own caption is used when empty);
        returns ``relevance [B, B]`` and ``reference_embeds [B, K, D]``, ``reference_mask [B, K]``,
        ``caption_embeds [B, D]`` with ``K = max_references``."""
        refs = [list(r)[: self.max_references] or [c] for r, c in zip(references, captions)]
        flat = [c for r in refs for c in r]
        rows = self.embed(list(captions) + flat)
        dim = rows.shape[1]
        caption_embeds = torch.from_numpy(rows[: len(captions)].copy())
        reference_embeds = torch.zeros(len(refs), self.max_references, dim)
        reference_mask = torch.zeros(len(refs), self.max_references, dtype=torch.bool)
        position = len(captions)
        for a, r in enumerate(refs):
            reference_embeds[a, : len(r)] = torch.from_numpy(rows[position : position + len(r)])
            reference_mask[a, : len(r)] = True
            position += len(r)
        ids = torch.as_tensor(np.asarray(image_ids, dtype=np.int64))
        relevance = relevance_from_embeddings(reference_embeds, reference_mask, caption_embeds, ids, ids)
        return {"relevance": relevance, "reference_embeds": reference_embeds, "reference_mask": reference_mask,
                "caption_embeds": caption_embeds}

    def flush(self) -> None:
        """Write this process's new caption embeddings to the cache now (also done every few thousand and at exit)."""
        self.store.flush()

    def __repr__(self) -> str:
        return (f"StreamedRelevanceLabels(embedder={self.embedder_key!r}, references='sample', "
                f"max_references={self.max_references}, cache={self.store.folder})")
