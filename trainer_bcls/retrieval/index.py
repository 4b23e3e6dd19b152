"""Embed a gallery once, store it, search it: an on-disk index of normalised image embeddings.

An index folder holds

- `embeddings.safetensors`: one tensor `embeddings`, float32 [N, D], row i = `model.encode_image` of `paths[i]`
  (L2-normalised, so the inner product is the cosine similarity, the model's retrieval score);
- `index.json`: `paths` (sorted) with their change `stamps`, the model name and fingerprint (sha256 of its
  weights), `dim`, `normalized`, `bf16` (the precision the images were embedded in);
- `index.faiss`: a FAISS `IndexFlatIP` over the same rows, written when `faiss` is importable.

Search returns, per query q, the top k rows by s_i = <q, e_i>: FAISS when available, otherwise an exact torch
matrix product with the same results. Indexing into an existing folder embeds only keys it does not hold yet and
refuses a different model (fingerprint) or precision; changed files are re-embedded and deleted ones dropped, so an
incremental build equals a one-shot build.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.errors import InvalidDataError, SkipReport
from ..fingerprint import weights_fingerprint
from ..evaluation.split_evaluation import encode_images, encode_texts
from ..data.image_loading import ImageLoadError, load_image
from .image_sources import IMAGE_SUFFIXES, ImageSource
from .inference_device import prepare_for_inference

logger = logging.getLogger(__name__)

INDEX_FORMAT = "bcls-retrieval-index"
INDEX_VERSION = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
METADATA_FILE = "index.json"
FAISS_FILE = "index.faiss"


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


model_fingerprint = weights_fingerprint  # the index records the weights it was built with


@dataclass
class RetrievalModel:
    """A model ready for indexing/search: placed on its device, with its processor, name and weight fingerprint."""

    model: Any
    processor: Any
    name: str
    fingerprint: str
    bf16: bool = False

    @classmethod
    def from_model(cls, model, processor, name: str, device: str | torch.device | None = None, bf16: bool = False):
        """Fingerprint `model` as it is, then place it ([`prepare_for_inference`])."""
        fingerprint = model_fingerprint(model)
        return cls(prepare_for_inference(model, device, bf16), processor, name, fingerprint, bf16)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device | None = None, bf16: bool = False):
        """Load a saved BCLS model and processor (a local folder is recorded by its absolute path)."""
        from modeling_bcls import BCLSModel, BCLSProcessor

        name = str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else str(name_or_path)
        model = BCLSModel.from_pretrained(name_or_path)
        return cls.from_model(model, BCLSProcessor.from_pretrained(name_or_path), name, device, bf16)


@dataclass
class SearchHit:
    rank: int
    path: str
    score: float


@dataclass
class IndexingReport:
    """What one indexing run did: new rows, rows re-embedded because their file changed, rows of deleted images
    removed, unchanged rows kept, unreadable images skipped."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    already_indexed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    total: int = 0  # rows in the index afterwards


class RetrievalIndex:
    """Normalised image embeddings with their paths, searchable by inner product (FAISS or exact)."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        paths: Sequence[str],
        model_name: str,
        model_fingerprint: str,
        bf16: bool = False,
        use_faiss: bool | None = None,
        stamps: Sequence[str | None] | None = None,
    ) -> None:
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} do not match {len(paths)} paths")
        if len(set(paths)) != len(paths):
            raise ValueError("duplicate paths in the index")
        stamps = [None] * len(paths) if stamps is None else list(stamps)
        if len(stamps) != len(paths):
            raise ValueError(f"{len(stamps)} stamps for {len(paths)} paths")
        self.embeddings, self.paths, self.stamps = embeddings.contiguous(), list(paths), stamps
        self.model_name, self.model_fingerprint, self.bf16 = model_name, model_fingerprint, bf16
        if use_faiss and not faiss_available():
            raise ImportError("use_faiss=True needs faiss: pip install faiss-cpu (or bcls[faiss])")
        self.use_faiss = faiss_available() if use_faiss is None else use_faiss
        self._faiss_index = None

    # -- properties ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def backend(self) -> str:
        return "faiss" if self.use_faiss else "exact"

    def check_model(self, fingerprint: str, bf16: bool | None = None, where: str = "the index") -> None:
        """Refuse a model whose weights differ from the indexing model's (and a different precision, if given)."""
        if fingerprint != self.model_fingerprint:
            raise ValueError(
                f"{where} was built with model {self.model_name} ({self.model_fingerprint}); the given model has "
                f"different weights ({fingerprint}). Use the same model, or index into a new folder."
            )
        if bf16 is not None and bf16 != self.bf16:
            raise ValueError(f"{where} was embedded with bf16={self.bf16}; pass the same --bf16 setting to add to it")

    # -- adding and searching -----------------------------------------------------------------------------------
    def add(self, embeddings: torch.Tensor, paths: Sequence[str], stamps: Sequence[str | None] | None = None) -> None:
        """Append rows, then keep all rows sorted by path (so the result does not depend on the order of adds).
        `stamps` are the change markers of the images ([`ImageSource.stamp`]), stored to detect changed files."""
        known = set(self.paths)
        duplicates = [p for p in paths if p in known]
        if duplicates:
            raise ValueError(f"{len(duplicates)} path(s) already indexed, e.g. {duplicates[0]}")
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32).reshape(-1, self.dim)
        all_paths = self.paths + list(paths)
        all_stamps = self.stamps + (list(stamps) if stamps is not None else [None] * len(paths))
        order = sorted(range(len(all_paths)), key=all_paths.__getitem__)
        self.embeddings = torch.cat([self.embeddings, embeddings])[torch.as_tensor(order, dtype=torch.long)]
        self.paths = [all_paths[i] for i in order]
        self.stamps = [all_stamps[i] for i in order]
        self._faiss_index = None

    def remove(self, paths: Sequence[str]) -> None:
        """Drop the rows of `paths` (unknown paths are ignored)."""
        drop = set(paths)
        keep = [i for i, path in enumerate(self.paths) if path not in drop]
        self.embeddings = self.embeddings[torch.as_tensor(keep, dtype=torch.long)]
        self.paths = [self.paths[i] for i in keep]
        self.stamps = [self.stamps[i] for i in keep]
        self._faiss_index = None

    def _faiss(self):
        import faiss

        if self._faiss_index is None or self._faiss_index.ntotal != len(self):
            index = faiss.IndexFlatIP(self.dim)
            index.add(np.ascontiguousarray(self.embeddings.numpy(), dtype=np.float32))
            self._faiss_index = index
        return self._faiss_index

    def search(self, queries: torch.Tensor, top_k: int = 10) -> list[list[SearchHit]]:
        """Top `top_k` rows by inner product for each row of `queries` [Q, D] (normalise them first for cosine)."""
        queries = torch.as_tensor(queries, dtype=torch.float32).reshape(-1, self.dim)
        k = min(top_k, len(self))
        if k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        if self.use_faiss:
            scores, rows = self._faiss().search(np.ascontiguousarray(queries.numpy()), k)
        else:
            scores, rows = [], []
            for start in range(0, len(queries), 1024):
                top = torch.topk(queries[start : start + 1024] @ self.embeddings.T, k=k, dim=1)
                scores.append(top.values)
                rows.append(top.indices)
            scores, rows = torch.cat(scores).numpy(), torch.cat(rows).numpy()
        return [
            [SearchHit(rank + 1, self.paths[int(r)], float(s)) for rank, (s, r) in enumerate(zip(score_row, row))]
            for score_row, row in zip(scores, rows)
        ]

    # -- files --------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write the embeddings, the metadata and (FAISS available) `index.faiss`; each file replaced atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "model": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "dim": self.dim,
            "normalized": True,
            "bf16": self.bf16,
            "count": len(self),
            "paths": self.paths,
            "stamps": self.stamps,
        }
        _replace(folder / EMBEDDINGS_FILE, lambda tmp: save_file({"embeddings": self.embeddings}, tmp))
        if faiss_available():
            import faiss

            _replace(folder / FAISS_FILE, lambda tmp: faiss.write_index(self._faiss(), tmp))
        elif (folder / FAISS_FILE).exists():
            (folder / FAISS_FILE).unlink()  # stale: it would miss the rows added now
        _replace(folder / METADATA_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=1)))

    @classmethod
    def load(cls, folder: str | os.PathLike, use_faiss: bool | None = None) -> "RetrievalIndex":
        folder = Path(folder)
        metadata_path = folder / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(f"no {METADATA_FILE} in {folder}: not a retrieval index (build one with `index`)")
        try:
            metadata = json.loads(metadata_path.read_text())
        except json.JSONDecodeError as err:
            raise InvalidDataError(f"{metadata_path} is not valid JSON: {err}") from err
        if metadata.get("format") != INDEX_FORMAT:
            raise InvalidDataError(f"{metadata_path} is not a {INDEX_FORMAT} file")
        try:
            embeddings = load_file(str(folder / EMBEDDINGS_FILE))["embeddings"]
        except Exception as err:  # missing, truncated or foreign file
            raise InvalidDataError(f"cannot read {folder / EMBEDDINGS_FILE}: {type(err).__name__}: {err}") from err
        count, dim = metadata["count"], metadata["dim"]
        if tuple(embeddings.shape) != (count, dim) or len(metadata["paths"]) != count:
            raise InvalidDataError(
                f"{folder}: embeddings {tuple(embeddings.shape)} do not match {METADATA_FILE} "
                f"({metadata['count']} paths, dim {metadata['dim']}); the index is damaged, rebuild it"
            )
        index = cls(embeddings, metadata["paths"], metadata["model"], metadata["model_fingerprint"],
                    metadata.get("bf16", False), use_faiss, metadata.get("stamps"))
        if index.use_faiss and (folder / FAISS_FILE).is_file():
            import faiss

            stored = faiss.read_index(str(folder / FAISS_FILE))
            if stored.ntotal == len(index) and stored.d == index.dim:
                index._faiss_index = stored
            else:
                logger.warning("%s does not match the embeddings; rebuilding it in memory", folder / FAISS_FILE)
        return index


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# embedding a source in batches


class _SourceRows(torch.utils.data.Dataset):
    """Rows of an [`ImageSource`]; a bad image yields its error instead of raising (the caller skips or raises)."""

    def __init__(self, source: ImageSource, positions: Sequence[int]) -> None:
        self.source, self.positions = source, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        position = self.positions[i]
        try:
            return position, self.source.load(position), None
        except InvalidDataError as err:
            return position, None, str(err)


def _collate(items, processor):
    good = [(position, image) for position, image, error in items if error is None]
    errors = [(position, error) for position, _, error in items if error is not None]
    pixel_values = processor(images=[image for _, image in good], return_tensors="pt")["pixel_values"] if good else None
    return [position for position, _ in good], pixel_values, errors


@torch.no_grad()
def embed_image_source(
    model,
    processor,
    source: ImageSource,
    positions: Sequence[int] | None = None,
    batch_size: int = 64,
    skip_invalid: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
) -> tuple[list[int], torch.Tensor, list[tuple[str, str]]]:
    """`model.encode_image` of the images at `positions` (default: all), decoded `batch_size` at a time.

    Returns (positions embedded, float32 embeddings [n, D], skipped (key, error)). An unreadable image raises
    [`ImageLoadError`] naming the file, or with `skip_invalid` is logged and listed in the skips.
    """
    positions = list(range(len(source))) if positions is None else list(positions)
    loader = torch.utils.data.DataLoader(
        _SourceRows(source, positions), batch_size=batch_size, num_workers=num_workers,
        collate_fn=functools.partial(_collate, processor=processor),
    )  # fmt: skip
    done, embeds, skipped = [], [], []
    report = SkipReport()
    with tqdm(total=len(positions), desc="Indexing images", unit="img", disable=not show_progress) as bar:
        for batch_positions, pixel_values, errors in loader:
            for position, error in errors:
                if not skip_invalid:
                    raise ImageLoadError(f"{error} (pass --skip_invalid to skip unreadable images)")
                logger.warning("skipped: %s", error)
                report.skip("unreadable image", source.keys[position])
                skipped.append((source.keys[position], error))
            if pixel_values is not None:
                embeds.append(model.encode_image(pixel_values.to(model.device, model.dtype)).float().cpu())
                done.extend(batch_positions)
            bar.update(len(batch_positions) + len(errors))
    report.log(logger, "embed_image_source")
    dim = model.config.projection_dim
    return done, (torch.cat(embeds) if embeds else torch.zeros(0, dim)), skipped


def build_index(
    retrieval_model: RetrievalModel,
    source: ImageSource,
    output: str | os.PathLike | None = None,
    batch_size: int = 64,
    skip_invalid: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
    use_faiss: bool | None = None,
) -> tuple[RetrievalIndex, IndexingReport]:
    """Index `source` into `output` (saved there; `None`: in memory only).

    An existing index at `output` is first checked to be of `retrieval_model` (same weights and precision), then
    brought up to date: only images it lacks or whose file changed (size / mtime, or bytes for datasets) are
    embedded, and rows of this source's images that no longer exist are removed. Rows stay sorted by path, so the
    result equals a one-shot build of the same images."""
    if len(source) == 0:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InvalidDataError(f"no images found in {source.name} (image suffixes: {suffixes})")
    if output is not None and (Path(output) / METADATA_FILE).exists():
        index = RetrievalIndex.load(output, use_faiss=use_faiss)
        index.check_model(retrieval_model.fingerprint, retrieval_model.bf16, where=f"index {output}")
    else:
        dim = retrieval_model.model.config.projection_dim
        index = RetrievalIndex(torch.zeros(0, dim), [], retrieval_model.name, retrieval_model.fingerprint,
                               retrieval_model.bf16, use_faiss)
    stamps = [source.stamp(i) for i in range(len(source))]
    indexed = dict(zip(index.paths, index.stamps))
    present = set(source.keys)
    deleted = [path for path in index.paths if path not in present and source.covers(path)]
    changed = [i for i, key in enumerate(source.keys) if key in indexed and indexed[key] != stamps[i]]
    positions = [i for i, key in enumerate(source.keys) if key not in indexed] + changed
    report = IndexingReport(already_indexed=len(source) - len(positions), updated=len(changed), removed=len(deleted))
    if len(index):
        logger.info("%s: %d image(s) unchanged, embedding %d new and %d changed, removing %d deleted", output,
                    report.already_indexed, len(positions) - len(changed), len(changed), len(deleted))
    done, embeds, report.skipped = embed_image_source(
        retrieval_model.model, retrieval_model.processor, source, sorted(positions), batch_size, skip_invalid,
        num_workers, show_progress,
    )  # fmt: skip
    index.remove(deleted + [source.keys[i] for i in changed])
    index.add(embeds, [source.keys[p] for p in done], [stamps[p] for p in done])
    changed_set = set(changed)
    report.added, report.total = sum(1 for p in done if p not in changed_set), len(index)
    if output is not None:
        index.save(output)
    return index, report


# ---------------------------------------------------------------------------------------------------------------------
# queries


def _max_length(processor) -> int | None:
    length = getattr(getattr(processor, "tokenizer", None), "model_max_length", None)
    return int(length) if length is not None and length < 100_000 else None


def embed_text_queries(retrieval_model: RetrievalModel, texts: Sequence[str]) -> torch.Tensor:
    """Normalised text embeddings [Q, D] of `texts` (`model.encode_text`, truncated to the tokenizer's length)."""
    return encode_texts(retrieval_model.model, retrieval_model.processor, list(texts),
                        max_length=_max_length(retrieval_model.processor), show_progress=False)


def embed_image_queries(retrieval_model: RetrievalModel, images: Sequence[str | os.PathLike]) -> torch.Tensor:
    """Normalised image embeddings [Q, D] of image files; an unreadable file raises [`ImageLoadError`]."""
    loaded = [load_image(path, where="query image") for path in images]
    return encode_images(retrieval_model.model, retrieval_model.processor, loaded, show_progress=False)
