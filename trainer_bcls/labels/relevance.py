"""Continuous relevance labels from cached caption embeddings.

For image ``i`` and caption ``j`` of a split::

    relevance(i, j) = max_{c ∈ refs(i)} cos(e(c), e(j)),    and relevance(i, j) = 1 if caption j belongs to image i

where ``refs(i)`` are all captions of image ``i`` in the split (``references="all"``), or, inside a batch, only the
caption paired with ``i`` (``references="paired"``: ``R[a, b] = cos(e(caption_a), e(caption_b))``). Positives are
found through the caption → image index (never by comparing caption text). Values are cosines, so they lie in
[-1, 1]; only their order (and gaps) matter to the Kendall term.

Caption embeddings are computed once per (split captions, embedder) and cached on disk as safetensors keyed by a
content hash of the captions and the embedder's ``cache_key``; a second build encodes nothing (``num_encoded == 0``).
Labels for any batch are then a lookup plus a small matmul, cheap enough for DataLoader workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from datasets import Dataset

from ..cache import bcls_cache_dir
from .caption_embedders import (
    CaptionEmbedder,
    Embeddings,
    PrecomputedRelevance,
    SentenceEmbeddingRelevance,
    TfidfRelevance,
    caption_key,
)
from ..data.caption_index import ImageCaptionIndex
from ..data.errors import InvalidDataError

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionEmbedder",
    "PrecomputedRelevance",
    "RelevanceLabels",
    "SentenceEmbeddingRelevance",
    "TfidfRelevance",
    "build_relevance_labels",
]

CACHE_FORMAT_VERSION = "1"


def _as_ids(ids, limit: int, name: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= limit):
        bad = ids[(ids < 0) | (ids >= limit)][0]
        raise InvalidDataError(
            f"{name} {bad} out of range: these relevance labels cover {limit} {name.split('_')[0]}s "
            "(were they built for another split?)"
        )
    return ids


class RelevanceLabels:
    """Caption embeddings of one split + its :class:`ImageCaptionIndex`; turns ids into relevance matrices.

    Attributes:
        index: the split's image ↔ caption index.
        embeddings: ``[N_captions, D]`` L2-normalised rows by caption id (dense float32 or sparse CSR for TF-IDF).
        references: ``"all"`` or ``"paired"`` (used by :meth:`batch_matrix`).
        num_encoded: captions encoded by a model when building (0 when read from the cache or precomputed).
        cache_path: the safetensors cache file, if any.
    """

    MAX_REFS_LOOP = 16

    def __init__(
        self,
        index: ImageCaptionIndex,
        embeddings: Embeddings,
        references: str = "all",
        *,
        embedder_key: str = "",
        num_encoded: int = 0,
        cache_path: Path | None = None,
    ):
        if references not in ("all", "paired"):
            raise ValueError(f"references must be 'all' or 'paired', got {references!r}")
        if embeddings.shape[0] != index.num_captions:
            raise InvalidDataError(f"{embeddings.shape[0]} caption embeddings for {index.num_captions} captions")
        self.index = index
        self.embeddings = embeddings
        self.references = references
        self.embedder_key = embedder_key
        self.num_encoded = num_encoded
        self.cache_path = cache_path
        self.warn_if_no_signal()

    def warn_if_no_signal(self, sample: int = 512) -> bool:
        """Warn (and return True) when the labels of a sample of captions are all equal: every negative then has
        the positive's relevance, and the Kendall term is 0 at every step (e.g. all captions alike)."""
        count = self.embeddings.shape[0]
        if count < 2:
            return False
        ids = np.unique(np.linspace(0, count - 1, num=min(sample, count)).astype(np.int64))
        sim = self._similarity(ids, ids)
        spread = float(np.nanmax(sim) - np.nanmin(sim)) if sim.size else 0.0
        if spread > 1e-6:
            return False
        logger.warning(
            "the relevance labels carry no signal: all %d sampled caption pairs have relevance %.3g (are all captions "
            "alike?); the Kendall term will be 0 at every step", sim.size, float(sim.flat[0]),
        )  # fmt: skip
        return True

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        pairs: Dataset | ImageCaptionIndex,
        embedder: CaptionEmbedder,
        references: str = "all",
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        show_progress_bar: bool = True,
    ) -> RelevanceLabels:
        """Embed the split's captions once (or read them from the cache) and return the labels.

        Args:
            pairs: a pair view (or its index).
            embedder: a :class:`CaptionEmbedder`; fitted on the split's captions first (TF-IDF).
            cache_dir: cache folder (default ``<bcls cache>/caption_embeddings``); ``use_cache=False`` disables it.
        """
        index = pairs if isinstance(pairs, ImageCaptionIndex) else ImageCaptionIndex.from_pairs(pairs)
        captions = index.captions
        embedder_key = embedder.cache_key
        cache_path = None
        if use_cache and not embedder.is_lookup:
            cache_root = Path(cache_dir) if cache_dir is not None else bcls_cache_dir("caption_embeddings")
            digest = hashlib.sha256(f"{caption_key(captions)}\n{embedder_key}".encode()).hexdigest()[:32]
            cache_path = cache_root / f"caption-embeddings-{digest}.safetensors"
            cached = _load_cache(cache_path, caption_key(captions), embedder_key, len(captions))
            if cached is not None:
                logger.info("caption embeddings of %d captions read from %s (0 encoded)", len(captions), cache_path)
                return cls(index, cached, references, embedder_key=embedder_key, num_encoded=0, cache_path=cache_path)

        start = time.perf_counter()
        embedder.fit(captions)
        embeddings = embedder.embed(captions, show_progress_bar=show_progress_bar)
        num_encoded = 0 if embedder.is_lookup else len(captions)
        logger.info(
            "%s: %d caption embeddings in %.1fs", embedder.name, len(captions), time.perf_counter() - start
        )
        if cache_path is not None:
            _save_cache(cache_path, embeddings, caption_key(captions), embedder_key)
        return cls(index, embeddings, references, embedder_key=embedder_key, num_encoded=num_encoded, cache_path=cache_path)

    # ------------------------------------------------------------------------------------------------------------
    def _similarity(self, a_ids: np.ndarray, b_ids: np.ndarray) -> np.ndarray:
        """``cos(e(a), e(b))`` for caption ids ``a_ids × b_ids``, float32 dense."""
        a, b = self.embeddings[a_ids], self.embeddings[b_ids]
        if sp.issparse(a):
            return np.asarray((a @ b.T).todense(), dtype=np.float32)
        # torch's matmul, not NumPy's: NumPy's BLAS pool ignores torch.set_num_threads and, on a busy machine,
        # its threads made this small product ~300x slower inside the collator (15 ms vs 0.05 ms for 64x384x64).
        return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b)).T).numpy()

    def _max_over_references(self, image_ids: np.ndarray, caption_ids: np.ndarray) -> np.ndarray:
        """``max_{c ∈ refs(i)} cos(e(c), e(j))`` for each (i, j).

        Up to ``MAX_REFS_LOOP`` references per image: a running max over the k-th reference of every image (an image
        with fewer references repeats its last one; max is idempotent), so memory stays ``len(i) × len(j)``.
        Beyond that: one matmul of all references and a segment max (``np.maximum.reduceat``) per image.
        """
        offsets, indices = self.index.image_caption_offsets, self.index.image_caption_indices
        starts, counts = offsets[image_ids], offsets[image_ids + 1] - offsets[image_ids]
        max_refs = int(counts.max()) if len(counts) else 0
        if max_refs <= self.MAX_REFS_LOOP:
            result = None
            for k in range(max_refs):
                sim = self._similarity(indices[starts + np.minimum(k, counts - 1)], caption_ids)
                result = sim if result is None else np.maximum(result, sim, out=result)
            return result if result is not None else np.zeros((0, len(caption_ids)), dtype=np.float32)
        block_starts = np.cumsum(counts) - counts
        positions = np.repeat(starts - block_starts, counts) + np.arange(int(counts.sum()))
        return np.maximum.reduceat(self._similarity(indices[positions], caption_ids), block_starts, axis=0)

    def _labels(self, sim: np.ndarray, image_ids: np.ndarray, caption_ids: np.ndarray) -> torch.Tensor:
        sim = np.clip(sim, -1.0, 1.0)
        sim[self.index.caption_image_ids[caption_ids][None, :] == image_ids[:, None]] = 1.0
        return torch.from_numpy(np.ascontiguousarray(sim, dtype=np.float32))

    def matrix(self, image_ids: Sequence[int] | np.ndarray | torch.Tensor, caption_ids) -> torch.Tensor:
        """``FloatTensor[len(image_ids), len(caption_ids)]``: max cosine to each image's reference captions (all of
        its captions in the split), 1 where the caption belongs to the image."""
        image_ids = _as_ids(image_ids, self.index.num_images, "image_id")
        caption_ids = _as_ids(caption_ids, self.index.num_captions, "caption_id")
        unique, inverse = np.unique(image_ids, return_inverse=True)
        return self._labels(self._max_over_references(unique, caption_ids)[inverse], image_ids, caption_ids)

    def batch_matrix(self, image_ids, caption_ids) -> torch.Tensor:
        """``FloatTensor[B, B]`` for a batch of pairs ``(image_ids[a], caption_ids[a])``: row = image of pair a,
        column = caption of pair b. ``references="all"``: as :meth:`matrix`; ``"paired"``: the reference of row a is
        only its own caption, ``R[a, b] = cos(e(caption_a), e(caption_b))``, 1 where pair b's caption is of image a."""
        image_ids = _as_ids(image_ids, self.index.num_images, "image_id")
        caption_ids = _as_ids(caption_ids, self.index.num_captions, "caption_id")
        if len(image_ids) != len(caption_ids):
            raise ValueError(f"{len(image_ids)} image ids but {len(caption_ids)} caption ids")
        wrong = np.flatnonzero(self.index.caption_image_ids[caption_ids] != image_ids)
        if len(wrong):
            a = int(wrong[0])
            raise InvalidDataError(
                f"batch pair {a}: caption_id {caption_ids[a]} belongs to image_id "
                f"{self.index.caption_image_ids[caption_ids[a]]}, not {image_ids[a]} (labels built for another split?)"
            )
        if self.references == "all":
            return self.matrix(image_ids, caption_ids)
        return self._labels(self._similarity(caption_ids, caption_ids), image_ids, caption_ids)

    def values(self, image_ids, caption_ids) -> np.ndarray:
        """``R(image_ids[k], caption_ids[k])`` for aligned id arrays (``"all"`` references: the entries of
        :meth:`matrix` without the full matrix), float32; one row-wise product per reference rank."""
        image_ids = _as_ids(image_ids, self.index.num_images, "image_id")
        caption_ids = _as_ids(caption_ids, self.index.num_captions, "caption_id")
        if len(image_ids) != len(caption_ids):
            raise ValueError(f"{len(image_ids)} image ids but {len(caption_ids)} caption ids")
        offsets, indices = self.index.image_caption_offsets, self.index.image_caption_indices
        starts, counts = offsets[image_ids], offsets[image_ids + 1] - offsets[image_ids]
        candidates = self.embeddings[caption_ids]
        result = np.full(len(image_ids), -1.0, dtype=np.float32)
        for k in range(int(counts.max()) if len(counts) else 0):
            references = self.embeddings[indices[starts + np.minimum(k, counts - 1)]]
            if sp.issparse(references):
                sim = np.asarray(references.multiply(candidates).sum(axis=1)).reshape(-1)
            else:
                sim = np.einsum("ij,ij->i", references, candidates)
            np.maximum(result, sim.astype(np.float32), out=result)
        result = np.clip(result, -1.0, 1.0)
        result[self.index.caption_image_ids[caption_ids] == image_ids] = 1.0
        return result

    def candidate_matrix(self, image_ids, caption_ids, candidate_caption_ids) -> torch.Tensor:
        """``FloatTensor[B, C]``: relevance of extra candidate captions (e.g. mined hard negatives) to the rows of a
        batch of pairs ``(image_ids[a], caption_ids[a])``, with the references of :meth:`batch_matrix` (``"all"``:
        the image's captions; ``"paired"``: the row's own caption), 1 where a candidate belongs to the row's image.
        ``candidate_matrix(i, c, c) == batch_matrix(i, c)``."""
        image_ids = _as_ids(image_ids, self.index.num_images, "image_id")
        caption_ids = _as_ids(caption_ids, self.index.num_captions, "caption_id")
        candidates = _as_ids(candidate_caption_ids, self.index.num_captions, "caption_id")
        if self.references == "all":
            return self.matrix(image_ids, candidates)
        return self._labels(self._similarity(caption_ids, candidates), image_ids, candidates)

    def iter_rows(self, chunk_size: int = 256, caption_ids=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(image_ids, matrix(image_ids, caption_ids))`` over all images in chunks (all captions by default)."""
        caption_ids = np.arange(self.index.num_captions) if caption_ids is None else caption_ids
        for start in range(0, self.index.num_images, chunk_size):
            ids = np.arange(start, min(start + chunk_size, self.index.num_images))
            yield torch.from_numpy(ids), self.matrix(ids, caption_ids)

    def full_matrix(self, chunk_size: int = 256) -> torch.Tensor:
        """``FloatTensor[N_images, N_captions]``, computed in chunks of images."""
        return torch.cat([rows for _, rows in self.iter_rows(chunk_size)])

    def __repr__(self) -> str:
        kind = "sparse" if sp.issparse(self.embeddings) else "dense"
        return (
            f"RelevanceLabels(images={self.index.num_images}, captions={self.index.num_captions}, "
            f"dim={self.embeddings.shape[1]} {kind}, references={self.references!r}, embedder={self.embedder_key!r})"
        )


# ----------------------------------------------------------------------------------------------------------------
# cache


def _save_cache(path: Path, embeddings: Embeddings, dataset_key: str, embedder_key: str) -> None:
    from safetensors.numpy import save_file

    if sp.issparse(embeddings):
        csr = sp.csr_matrix(embeddings)
        tensors = {
            "data": csr.data.astype(np.float32),
            "indices": csr.indices.astype(np.int64),
            "indptr": csr.indptr.astype(np.int64),
            "shape": np.asarray(csr.shape, dtype=np.int64),
        }
        fmt = "csr"
    else:
        tensors, fmt = {"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)}, "dense"
    metadata = {
        "format": fmt,
        "version": CACHE_FORMAT_VERSION,
        "dataset_key": dataset_key,
        "embedder_key": embedder_key,
        "num_captions": str(embeddings.shape[0]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic: readers never see a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("cached caption embeddings at %s", path)


def _load_cache(path: Path, dataset_key: str, embedder_key: str, num_captions: int) -> Embeddings | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if (
                meta.get("version") != CACHE_FORMAT_VERSION
                or meta.get("dataset_key") != dataset_key
                or meta.get("embedder_key") != embedder_key
                or meta.get("num_captions") != str(num_captions)
            ):
                logger.warning("ignoring stale caption-embedding cache %s", path)
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # a damaged cache file is recomputed, not fatal
        logger.warning("ignoring unreadable caption-embedding cache %s: %s", path, err)
        return None
    if meta["format"] == "csr":
        shape = tuple(int(x) for x in tensors["shape"])
        return sp.csr_matrix((tensors["data"], tensors["indices"], tensors["indptr"]), shape=shape)
    return tensors["embeddings"]


# ----------------------------------------------------------------------------------------------------------------


def build_relevance_labels(
    pairs: Dataset | ImageCaptionIndex | None,
    kind: str | None = "tfidf",
    model_name_or_path: str | None = None,
    embeddings_path: str | None = None,
    references: str = "all",
    cache_dir: str | os.PathLike | None = None,
    **embedder_kwargs,
) -> RelevanceLabels | None:
    """Command-line friendly factory: ``kind`` is ``"sentence"`` (``model_name_or_path``, default
    ``sentence-transformers/all-MiniLM-L6-v2``), ``"tfidf"``, ``"precomputed"`` (``embeddings_path``) or
    ``"none"``/``None`` (returns ``None``: no continuous labels)."""
    if pairs is None or kind in (None, "none", ""):
        return None
    if kind == "sentence":
        embedder: CaptionEmbedder = SentenceEmbeddingRelevance(
            model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2", **embedder_kwargs
        )
    elif kind == "tfidf":
        embedder = TfidfRelevance(**embedder_kwargs)
    elif kind == "precomputed":
        if not embeddings_path:
            raise ValueError("relevance kind 'precomputed' needs embeddings_path")
        embedder = PrecomputedRelevance(embeddings_path, **embedder_kwargs)
    else:
        raise ValueError(f"unknown relevance kind {kind!r}: expected sentence, tfidf, precomputed or none")
    return RelevanceLabels.build(pairs, embedder, references=references, cache_dir=cache_dir)
