"""Embed a gallery once, store it, search it: an on-disk index of normalised image embeddings.

An index folder holds

- `embeddings-<digest>.safetensors`: one tensor `embeddings`, float32 [N, D], row i = `model.encode_image` of
  `paths[i]` (L2-normalised, so the inner product is the cosine similarity, the model's retrieval score; finite);
- `index-<digest>.faiss`: a FAISS index over the same rows, written when `faiss` is importable: `IndexFlatIP`
  (`flat`, exact) or an approximate `ivf` / `hnsw` / `ivfpq` index ([`trainer_bcls.retrieval.ann`]), whose rows carry
  the stable ids of the tensor `faiss_ids` in the embeddings file;
- `index.json`, the manifest: `paths` (sorted) with their change `stamps`, the model name and fingerprint (sha256
  of its weights), `dim`, `normalized`, `bf16` (the precision the images were embedded in), and under `files` the
  names, sizes and sha256 digests of the two files above, and under `index` the index type, its parameters, the rows
  it was trained on and its search defaults (`nprobe`, `ef_search`).

A save writes new files under new names, then replaces `index.json` (one `os.replace`, the commit), then deletes
files no manifest names; a crash at any point leaves the previous or the new index, never a mix. A load checks that
the embeddings file is the one the manifest names (digest, count, dim); an `index.faiss` that does not belong is
rebuilt in memory from the embeddings. Version-1 folders (fixed file names) still load.

Search returns, per query q, the top k rows by s_i = <q, e_i>: FAISS when available, otherwise an exact torch
matrix product with the same results; an approximate type returns what its FAISS index finds, and `rescore` re-ranks
a wider candidate list by the exact scores of the stored embeddings. `load(mmap=True)` maps the embeddings and the
FAISS index from their files instead of reading them (pages are read on use), so an index larger than RAM searches. Indexing into an existing folder embeds only keys it does not hold yet and
refuses a different model (fingerprint) or precision; changed files are re-embedded and deleted ones dropped, so an
incremental build equals a one-shot build.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.errors import InvalidDataError, SkipReport
from ..distributed import is_distributed
from ..fingerprint import weights_fingerprint
from ..evaluation.split_evaluation import encode_images, encode_texts
from ..data.image_loading import ImageLoadError, load_image
from . import ann
from .image_sources import IMAGE_SUFFIXES, ImageSource
from .inference_device import prepare_for_inference

logger = logging.getLogger(__name__)

INDEX_FORMAT = "bcls-retrieval-index"
INDEX_VERSION = 3  # 3: the `index` entry (type, parameters) and `faiss_ids`; versions 1-2 are flat and still load
RESCORE_FACTOR = 10  # `rescore`: candidates fetched per hit asked for
EMBEDDINGS_FILE = "embeddings.safetensors"  # version 1 name; version 2 names files by digest (see `stored_file`)
METADATA_FILE = "index.json"
FAISS_FILE = "index.faiss"
PARTS_FOLDER = ".parts"  # per-process part files of a multi-process build ([`trainer_bcls.retrieval.parallel_index`])
_REQUIRED_KEYS = ("model", "model_fingerprint", "dim", "count", "paths")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stored_file(folder: str | os.PathLike, kind: str) -> Path | None:
    """The `kind` file (`"embeddings"` or `"faiss"`) that `folder`'s manifest names (`None`: none recorded)."""
    folder = Path(folder)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    if metadata.get("version", 1) < 2:
        path = folder / (EMBEDDINGS_FILE if kind == "embeddings" else FAISS_FILE)
        return path if path.exists() else None
    entry = (metadata.get("files") or {}).get(kind)
    return folder / entry["name"] if entry else None


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
        text = str(name_or_path)
        if not Path(text).exists() and (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1):
            raise FileNotFoundError(f"model folder not found: {text}")  # not a Hub id either
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
    rates: list["ProcessRate"] = field(default_factory=list)  # per process (one entry without a process group)


@dataclass
class ProcessRate:
    """Images one process embedded and the seconds its part of the build took (listing, stamps, embedding)."""

    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class RetrievalIndex:
    """Normalised image embeddings with their paths, searchable by inner product: exact (`flat`, FAISS or torch) or
    through an approximate FAISS index (`ivf`, `hnsw`, `ivfpq`, or `auto` by size and `max_memory`; see
    [`trainer_bcls.retrieval.ann`])."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        paths: Sequence[str],
        model_name: str,
        model_fingerprint: str,
        bf16: bool = False,
        use_faiss: bool | None = None,
        stamps: Sequence[str | None] | None = None,
        index_type: str = "flat",
        index_params: dict[str, int] | None = None,
        max_memory: int | None = None,
    ) -> None:
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} do not match {len(paths)} paths")
        _check_unique(paths)
        _check_finite(embeddings, paths)
        stamps = [None] * len(paths) if stamps is None else list(stamps)
        if len(stamps) != len(paths):
            raise ValueError(f"{len(stamps)} stamps for {len(paths)} paths")
        self.embeddings, self.paths, self.stamps = embeddings.contiguous(), list(paths), stamps
        self.model_name, self.model_fingerprint, self.bf16 = model_name, model_fingerprint, bf16
        if use_faiss and not faiss_available():
            raise ImportError("use_faiss=True needs faiss: pip install faiss-cpu (or bcls[faiss])")
        self.use_faiss = faiss_available() if use_faiss is None else use_faiss
        self._faiss_index = None
        self.ids = np.arange(len(paths), dtype=np.int64)  # stable row ids: the labels of an approximate index
        self.trained_rows = 0  # rows when the type was chosen / the approximate index trained (0: not yet)
        self.search_defaults: dict[str, int] = {}
        self.mmapped = False
        self._row_of: tuple[np.ndarray, np.ndarray] | None = None
        self.embeddings_map: np.memmap | None = None
        self.set_index_type(index_type, index_params, max_memory)

    def set_index_type(self, index_type: str, index_params: dict[str, int] | None = None,
                       max_memory: int | None = None) -> None:
        """Choose the FAISS index type (`flat`, `ivf`, `hnsw`, `ivfpq`, `auto`); it is (re)built on next use."""
        ann.check_index_type(index_type)
        if index_type != "flat" and not self.use_faiss:
            raise ImportError(f"--index_type {index_type} needs faiss: pip install faiss-cpu (or bcls[faiss])")
        self.requested_type, self.requested_params = index_type, dict(index_params or {})
        self.max_memory = max_memory
        self.index_type, self.index_params = ("flat", {}) if index_type == "auto" else (index_type, {})
        self.trained_rows, self._faiss_index = 0, None

    # -- properties ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def backend(self) -> str:
        if self.index_type != "flat":
            return f"faiss-{self.index_type}"
        return "faiss" if self.use_faiss else "exact"

    @property
    def approximate(self) -> bool:
        return self.index_type in ann.APPROXIMATE_TYPES

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
        `stamps` are the change markers of the images ([`ImageSource.stamp`]), stored to detect changed files.
        A trained approximate index takes the new rows as they are (no retraining) until the gallery has grown past
        `ann.RETRAIN_FACTOR` × the rows it was trained on; then it is retrained on next use."""
        known = set(self.paths)
        duplicates = [p for p in paths if p in known]
        if duplicates:
            raise ValueError(f"{len(duplicates)} path(s) already indexed: {', '.join(duplicates[:5])}")
        _check_unique(paths)
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(paths) or (len(paths) and embeddings.shape[1] != self.dim):
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} for {len(paths)} paths of an index of "
                             f"dim {self.dim}")
        embeddings = embeddings.reshape(len(paths), self.dim)
        _check_finite(embeddings, paths)
        new_ids = int(self.ids.max()) + 1 + np.arange(len(paths), dtype=np.int64) if len(self) else \
            np.arange(len(paths), dtype=np.int64)
        all_paths = self.paths + list(paths)
        all_stamps = self.stamps + (list(stamps) if stamps is not None else [None] * len(paths))
        order = sorted(range(len(all_paths)), key=all_paths.__getitem__)
        self.embeddings = torch.cat([self.embeddings, embeddings])[torch.as_tensor(order, dtype=torch.long)]
        self.paths = [all_paths[i] for i in order]
        self.stamps = [all_stamps[i] for i in order]
        self.ids = np.concatenate([self.ids, new_ids])[np.asarray(order, dtype=np.int64)]
        self._row_of = None
        if self.approximate and self._faiss_index is not None and not self.mmapped and len(paths) \
                and len(self) <= ann.RETRAIN_FACTOR * self.trained_rows:
            ann.add(self._faiss_index, embeddings.numpy(), new_ids)  # into the trained index
        elif len(paths):
            self._faiss_index = None

    def set_stamps(self, stamps: dict[str, str | None]) -> None:
        """Record new change stamps of indexed paths (same image, e.g. a touched file)."""
        self.stamps = [stamps.get(path, old) for path, old in zip(self.paths, self.stamps)]

    def remove(self, paths: Sequence[str]) -> None:
        """Drop the rows of `paths` (unknown paths are ignored)."""
        drop = set(paths)
        keep = [i for i, path in enumerate(self.paths) if path not in drop]
        if len(keep) == len(self):
            return
        dropped = np.setdiff1d(self.ids, self.ids[np.asarray(keep, dtype=np.int64)])
        self.embeddings = self.embeddings[torch.as_tensor(keep, dtype=torch.long)]
        self.paths = [self.paths[i] for i in keep]
        self.stamps = [self.stamps[i] for i in keep]
        self.ids = self.ids[np.asarray(keep, dtype=np.int64)]
        self._row_of = None
        if not (self.approximate and self._faiss_index is not None and not self.mmapped
                and ann.remove(self._faiss_index, dropped)):
            self._faiss_index = None

    def _faiss(self):
        """The FAISS index to search (built or retrained as needed); `None`: search exactly with torch."""
        if not self.use_faiss:
            return None
        rows = len(self)
        if self.trained_rows == 0 or rows > ann.RETRAIN_FACTOR * self.trained_rows:  # choose (again) by size
            if self.requested_type == "auto" or self.approximate:
                kind, params = ann.resolve(self.requested_type, rows, self.dim, self.max_memory, self.requested_params)
                if self._faiss_index is not None or (kind, params) != (self.index_type, self.index_params):
                    self._faiss_index = None
                self.index_type, self.index_params = kind, params
            self.trained_rows = rows
        if self.index_type == "flat":
            import faiss

            if self._faiss_index is None or self._faiss_index.ntotal != rows:
                index = faiss.IndexFlatIP(self.dim)
                index.add(np.ascontiguousarray(self.embeddings.numpy(), dtype=np.float32))
                self._faiss_index = index
            return self._faiss_index
        if rows < ann.MIN_TRAIN_ROWS:
            return None  # too few rows to cluster: exact
        if self._faiss_index is None:
            started = time.monotonic()
            self.index_params = {**ann.default_params(self.index_type, rows, self.dim), **self.requested_params} \
                if self.requested_type != "auto" else self.index_params
            self._faiss_index = ann.build(self.index_type, self.index_params, self.embeddings.numpy(), self.ids)
            self.trained_rows, self.mmapped = rows, False
            logger.info("trained a FAISS %s index %s over %d rows in %.1f s", self.index_type, self.index_params,
                        rows, time.monotonic() - started)
        return self._faiss_index

    def _rows(self, labels: np.ndarray) -> np.ndarray:
        """Rows of FAISS labels (stable ids); -1 (no hit) stays -1."""
        if getattr(self, "_row_of", None) is None:
            order = np.argsort(self.ids, kind="stable")
            self._row_of = (self.ids[order], order)
        sorted_ids, order = self._row_of
        where = np.clip(np.searchsorted(sorted_ids, labels), 0, max(len(sorted_ids) - 1, 0))
        found = (labels >= 0) & (len(sorted_ids) > 0) & (sorted_ids[where] == labels) if len(sorted_ids) else \
            np.zeros(labels.shape, dtype=bool)
        return np.where(found, order[where] if len(order) else -1, -1)

    def search(self, queries: torch.Tensor, top_k: int = 10, nprobe: int | None = None,
               ef_search: int | None = None, rescore: bool = False) -> list[list[SearchHit]]:
        """Top `top_k` rows by inner product for each row of `queries` [Q, D] (normalise them first for cosine).

        `nprobe` (ivf, ivfpq: inverted lists scanned) and `ef_search` (hnsw: graph breadth) trade speed for
        recall (default: the manifest's); `rescore` fetches `RESCORE_FACTOR` × `top_k` candidates from the
        approximate index and ranks them by their exact scores (the stored embeddings)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        queries = torch.as_tensor(queries, dtype=torch.float32)
        queries = queries.unsqueeze(0) if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {tuple(queries.shape)} do not fit an index of dim {self.dim}: "
                             "embed them with the model the index was built with")
        if not torch.isfinite(queries).all():
            bad = (~torch.isfinite(queries)).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"query row(s) {bad[:5]} are not finite (NaN or inf): check the model's weights")
        k = min(top_k, len(self))
        if k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        index = self._faiss() if self.use_faiss else None
        if index is not None and self.approximate:
            fetch = min(len(self), k * RESCORE_FACTOR) if rescore else k
            defaults = {**ann.default_search(self.index_type, self.index_params), **self.search_defaults}
            params = ann.search_parameters(self.index_type, nprobe or defaults.get("nprobe"),
                                           ef_search or defaults.get("ef_search"))
            scores, labels = index.search(np.ascontiguousarray(queries.numpy()), fetch, params=params)
            rows = self._rows(labels)
            if rescore:
                scores, rows = self._rescore(queries, rows, k)
        elif index is not None:
            scores, rows = index.search(np.ascontiguousarray(queries.numpy()), k)
        else:
            scores, rows = [], []
            for start in range(0, len(queries), 1024):
                top = torch.topk(queries[start : start + 1024] @ self.embeddings.T, k=k, dim=1)
                scores.append(top.values)
                rows.append(top.indices)
            scores, rows = torch.cat(scores).numpy(), torch.cat(rows).numpy()
        results = []
        for score_row, row in zip(scores, rows):
            # FAISS fills missing hits with label -1 (and score -FLT_MAX): never read that as paths[-1]
            kept = [(float(s), int(r)) for s, r in zip(score_row, row) if 0 <= int(r) < len(self) and math.isfinite(s)]
            results.append([SearchHit(rank + 1, self.paths[r], s) for rank, (s, r) in enumerate(kept)])
        return results

    def _rescore(self, queries: torch.Tensor, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores <q, e_r> of the candidate rows, best `k` kept (ties: lower row first)."""
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_rows = np.full((len(queries), k), -1, dtype=np.int64)
        for q, candidates in enumerate(rows):
            candidates = np.unique(candidates[candidates >= 0])
            if not len(candidates):
                continue
            exact = (self.embeddings[torch.as_tensor(candidates)] @ queries[q]).numpy()
            best = np.lexsort((candidates, -exact))[:k]
            out_scores[q, : len(best)], out_rows[q, : len(best)] = exact[best], candidates[best]
        return out_scores, out_rows

    # -- files --------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, build_faiss: bool = True) -> None:
        """Write the index into `folder` in one atomic step: new files under digest names, then `index.json`
        replaced (the commit), then files no manifest names removed. `build_faiss=False` (a checkpoint) writes an
        approximate FAISS index only if it is already trained (otherwise it is trained when loaded)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": self.embeddings}
        if self.requested_type != "flat":
            tensors["faiss_ids"] = torch.from_numpy(np.ascontiguousarray(self.ids))
        files = {"embeddings": _write_versioned(folder, "embeddings", ".safetensors",
                                                lambda tmp: save_file(tensors, tmp))}
        if faiss_available() and self.use_faiss:
            import faiss

            write_it = build_faiss or self.index_type == "flat" or self._faiss_index is not None
            index = self._faiss() if write_it else None
            if index is not None:
                files["faiss"] = _write_versioned(folder, "index", ".faiss", lambda tmp: faiss.write_index(index, tmp))
        defaults = {**ann.default_search(self.index_type, self.index_params), **self.search_defaults}
        metadata = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "model": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "dim": self.dim,
            "normalized": True,
            "bf16": self.bf16,
            "count": len(self),
            "files": files,
            "index": {"requested": self.requested_type, "requested_params": self.requested_params,
                      "max_memory": self.max_memory, "type": self.index_type, "params": self.index_params,
                      "trained_rows": self.trained_rows, "retrain_factor": ann.RETRAIN_FACTOR, "search": defaults},
            "paths": self.paths,
            "stamps": self.stamps,
        }
        _replace(folder / METADATA_FILE, lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=1)))
        keep = {METADATA_FILE} | {entry["name"] for entry in files.values()}
        for path in folder.iterdir():  # older versions, version-1 files, leftovers of a crashed save
            name = path.name
            ours = name.endswith((".safetensors", ".faiss", ".tmp")) and name.startswith(("embeddings", "index"))
            if ours and name not in keep and path.is_file():
                path.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: str | os.PathLike, use_faiss: bool | None = None, mmap: bool = False) -> "RetrievalIndex":
        """Read an index folder, checking that its files belong together (an error names what does not).
        `mmap`: map the embeddings and the FAISS index from their files (read-only FAISS index: for searching;
        adding rows retrains it in memory)."""
        folder = Path(folder)
        metadata_path = folder / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(f"no {METADATA_FILE} in {folder}: not a retrieval index (build one with `index`)")
        try:
            metadata = json.loads(metadata_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidDataError(f"{metadata_path} is not valid JSON: {err}") from err
        if not isinstance(metadata, dict) or metadata.get("format") != INDEX_FORMAT:
            raise InvalidDataError(f"{metadata_path} is not a {INDEX_FORMAT} file (expected a JSON object with "
                                   f"format {INDEX_FORMAT!r})")
        missing = [key for key in _REQUIRED_KEYS if key not in metadata]
        if missing:
            raise InvalidDataError(f"{metadata_path} lacks {', '.join(missing)}: the index is damaged, rebuild it")
        count, dim, paths = metadata["count"], metadata["dim"], metadata["paths"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise InvalidDataError(f"{metadata_path}: 'paths' must be a list of strings")
        version = metadata.get("version", 1)
        if not isinstance(version, int) or version > INDEX_VERSION:
            raise InvalidDataError(f"{metadata_path} has version {version!r}; this bcls reads versions up to "
                                   f"{INDEX_VERSION}: upgrade bcls or rebuild the index")
        entries = metadata.get("files") or {}
        if version >= 2:
            entry = entries.get("embeddings")
            if not isinstance(entry, dict) or Path(str(entry.get("name", ""))).name != entry.get("name"):
                raise InvalidDataError(f"{metadata_path} names no embeddings file: the index is damaged, rebuild it")
            embeddings_path = folder / entry["name"]
            if not embeddings_path.is_file():
                raise InvalidDataError(f"{embeddings_path}, named by {METADATA_FILE}, is missing; rebuild the index")
            if file_sha256(embeddings_path) != entry.get("sha256"):
                raise InvalidDataError(
                    f"{embeddings_path} does not match {METADATA_FILE} (sha256 differs: edited or damaged since it "
                    "was saved); rebuild the index into a new folder"
                )
        else:
            embeddings_path = folder / EMBEDDINGS_FILE
        try:
            embeddings, ids, mapped = _read_embeddings(embeddings_path, mmap)
        except Exception as err:  # missing, truncated or foreign file
            raise InvalidDataError(f"cannot read {embeddings_path}: {type(err).__name__}: {err}") from err
        if tuple(embeddings.shape) != (count, dim) or len(paths) != count or (ids is not None and len(ids) != count):
            raise InvalidDataError(
                f"{folder}: {embeddings_path.name} holds {tuple(embeddings.shape)[0]} rows of dim "
                f"{tuple(embeddings.shape)[1:]}, {METADATA_FILE} says count {count}, dim {dim} and lists "
                f"{len(paths)} paths; the index is damaged, rebuild it"
            )
        spec = metadata.get("index") if version >= 3 else None
        spec = spec if isinstance(spec, dict) else {}
        try:
            index = cls(embeddings, paths, metadata["model"], metadata["model_fingerprint"],
                        metadata.get("bf16", False), use_faiss, metadata.get("stamps"),
                        spec.get("requested", "flat"), spec.get("requested_params"), spec.get("max_memory"))
        except ValueError as err:
            raise InvalidDataError(f"{folder}: {err}") from err
        if spec:
            if spec.get("type") not in ann.INDEX_TYPES or not isinstance(spec.get("params", {}), dict):
                raise InvalidDataError(f"{metadata_path}: index type {spec.get('type')!r} is not one of "
                                       f"{', '.join(ann.INDEX_TYPES)}; the index is damaged, rebuild it")
            index.index_type, index.index_params = spec["type"], dict(spec.get("params") or {})
            index.trained_rows = int(spec.get("trained_rows") or 0)
            index.search_defaults = dict(spec.get("search") or {})
        if ids is not None:
            index.ids = ids.numpy().astype(np.int64)
            if len(np.unique(index.ids)) != len(index.ids):
                raise InvalidDataError(f"{embeddings_path}: faiss_ids repeat; the index is damaged, rebuild it")
        index.mmapped = False
        index.embeddings_map = mapped  # the mapped file (None: read into memory)
        faiss_entry = entries.get("faiss") if version >= 2 else None  # version 1: rebuilt in memory (it may be stale)
        if index.use_faiss and isinstance(faiss_entry, dict):
            faiss_path = folder / Path(str(faiss_entry.get("name"))).name
            if faiss_path.is_file() and file_sha256(faiss_path) == faiss_entry.get("sha256"):
                stored = ann.read(str(faiss_path), mmap, index.index_type)
                if stored.ntotal == len(index) and stored.d == index.dim:
                    index._faiss_index, index.mmapped = stored, mmap
            if index._faiss_index is None:
                logger.warning("%s does not match the embeddings; rebuilding it in memory", faiss_path)
        elif index.use_faiss and index.approximate:
            logger.info("%s holds no trained %s index yet; it is trained on first use", folder, index.index_type)
        return index


def _read_embeddings(path: Path, mmap: bool) -> tuple[torch.Tensor, torch.Tensor | None, np.memmap | None]:
    """`embeddings` (float32 [N, D]), `faiss_ids` (int64 [N], or `None`) of a safetensors file and, with `mmap`, the
    copy-on-write map of the file the embeddings view (safetensors' layout: 8-byte header size, JSON header, data)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if "embeddings" not in names:
            raise KeyError("no tensor 'embeddings'")
        ids = f.get_tensor("faiss_ids") if "faiss_ids" in names else None
        if not mmap:
            return f.get_tensor("embeddings"), ids, None
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    entry = header["embeddings"]
    shape = tuple(int(v) for v in entry["shape"])
    if entry["dtype"] != "F32" or len(shape) != 2:
        raise ValueError(f"'embeddings' is {entry['dtype']} of shape {shape}, expected F32 [N, D]")
    start, end = (int(v) for v in entry["data_offsets"])
    if end - start != 4 * shape[0] * shape[1]:
        raise ValueError(f"'embeddings' spans {end - start} bytes for shape {shape}")
    if shape[0] * shape[1] == 0:
        return torch.zeros(shape), ids, None
    mapped = np.memmap(path, dtype=np.float32, mode="c", offset=8 + header_size + start, shape=shape)
    return torch.from_numpy(mapped), ids, mapped


def _check_unique(paths: Sequence[str]) -> None:
    seen, duplicates = set(), []
    for path in paths:
        if path in seen:
            duplicates.append(path)
        seen.add(path)
    if duplicates:
        raise ValueError(f"{len(duplicates)} duplicate path(s) in the index: {', '.join(duplicates[:5])}")


def _check_finite(embeddings: torch.Tensor, paths: Sequence[str]) -> None:
    """Refuse NaN / inf rows (a NaN row would rank first or last at random and print invalid JSON)."""
    chunk = 65536  # row blocks: a memory-mapped gallery is checked without a full-size temporary
    if len(paths) and not all(torch.isfinite(embeddings[s : s + chunk]).all() for s in range(0, len(paths), chunk)):
        bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten().tolist()
        raise InvalidDataError(
            f"{len(bad)} of {len(paths)} embedding rows are not finite (NaN or inf), e.g. {paths[bad[0]]}: "
            "the model's weights or the images give no valid embedding"
        )


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_versioned(folder: Path, stem: str, suffix: str, write) -> dict[str, Any]:
    """Write a file through `write(tmp)`, then name it by its digest (`<stem>-<sha256[:16]><suffix>`)."""
    tmp = folder / f"{stem}{suffix}.{os.getpid()}.tmp"
    write(str(tmp))
    digest = file_sha256(tmp)
    name = f"{stem}-{digest[:16]}{suffix}"
    size = tmp.stat().st_size
    os.replace(tmp, folder / name)
    return {"name": name, "sha256": digest, "bytes": size}


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
    on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
) -> tuple[list[int], torch.Tensor, list[tuple[str, str]]]:
    """`model.encode_image` of the images at `positions` (default: all), decoded `batch_size` at a time.

    Returns (positions embedded, float32 embeddings [n, D], skipped (key, error)). An unreadable image raises
    [`ImageLoadError`] naming the file, or with `skip_invalid` is logged and listed in the skips. A non-finite
    embedding (a model with NaN weights) is an error naming the image. With `on_batch`, each batch's positions and
    embeddings go to it as they are made and are not kept (the returned tensor is then empty).
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
                batch = model.encode_image(pixel_values.to(model.device, model.dtype)).float().cpu()
                _check_finite(batch, [source.keys[p] for p in batch_positions])
                if on_batch is not None:
                    on_batch(list(batch_positions), batch)
                else:
                    embeds.append(batch)
                done.extend(batch_positions)
            bar.update(len(batch_positions) + len(errors))
    report.log(logger, "embed_image_source")
    dim = model.config.projection_dim
    return done, (torch.cat(embeds) if embeds else torch.zeros(0, dim)), skipped


def check_output_folder(output: str | os.PathLike) -> None:
    """Fail before any embedding when `output` cannot hold an index (a file, or a folder we cannot write)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InvalidDataError(f"--output {output} is a file, not an index folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InvalidDataError(f"--output {output} is not writable: {type(err).__name__}: {err}") from err


def same_image(old: str | None, new: str | None) -> bool:
    """Whether two change stamps name the same image: by content digest when both carry one (`...sha256:<hex>`,
    `sha1:<hex>`), else by equality (a stamp without a digest, from an older index, matches no digest stamp)."""
    if old == new:
        return True
    digest = lambda stamp: stamp.rsplit(":", 2)[-2:] if stamp and ("sha256:" in stamp or "sha1:" in stamp) else None
    return digest(old) is not None and digest(old) == digest(new)


def build_index(
    retrieval_model: RetrievalModel,
    source: ImageSource,
    output: str | os.PathLike | None = None,
    batch_size: int = 64,
    skip_invalid: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
    use_faiss: bool | None = None,
    checkpoint_seconds: float = 60.0,
    index_type: str | None = None,
    index_params: dict[str, int] | None = None,
    max_memory: int | None = None,
) -> tuple[RetrievalIndex, IndexingReport]:
    """Index `source` into `output` (saved there; `None`: in memory only).

    An existing index at `output` is first checked to be of `retrieval_model` (same weights and precision), then
    brought up to date: only images it lacks or whose content changed (sha256 of the file bytes, or of the stored
    bytes for datasets) are embedded, and rows of this source's images that no longer exist are removed. Rows stay
    sorted by path, so the result equals a one-shot build of the same images. While embedding, the rows made so far
    are saved about every `checkpoint_seconds` (at most a fifth of the time goes to saving), so a build that is
    killed resumes where it stopped when run again.

    `index_type` (`flat`, `ivf`, `hnsw`, `ivfpq`, `auto`; `None`: the folder's, else `flat`), `index_params`
    (`nlist`, `M`, `pq_m`) and `max_memory` (bytes, for `auto`) choose the FAISS index ([`trainer_bcls.retrieval.ann`]);
    changing them on an existing folder rebuilds its FAISS index, the embeddings are kept.

    In a process group of several processes (`accelerate launch`), each process embeds its share and process 0
    merges ([`trainer_bcls.retrieval.parallel_index`]); the index is then returned on process 0 only (`None`
    elsewhere). `report.rates` holds each process's images and seconds."""
    if output is not None and is_distributed():
        from .parallel_index import build_index_parallel

        return build_index_parallel(
            retrieval_model, source, output, batch_size=batch_size, skip_invalid=skip_invalid, num_workers=num_workers,
            show_progress=show_progress, use_faiss=use_faiss, checkpoint_seconds=checkpoint_seconds,
            index_type=index_type, index_params=index_params, max_memory=max_memory,
        )  # fmt: skip
    started = time.monotonic()
    index = open_index(retrieval_model, source, output, use_faiss, index_type, index_params, max_memory)
    if output is not None and (Path(output) / PARTS_FOLDER).is_dir():  # parts of a killed multi-process build
        from .parallel_index import merge_leftover_parts

        merge_leftover_parts(index, Path(output) / PARTS_FOLDER, retrieval_model)
    stamps = [source.stamp(i) for i in range(len(source))]
    indexed = dict(zip(index.paths, index.stamps))
    present = set(source.keys)
    deleted = [path for path in index.paths if path not in present and source.covers(path)]
    changed = [i for i, key in enumerate(source.keys) if key in indexed and not same_image(indexed[key], stamps[i])]
    positions = [i for i, key in enumerate(source.keys) if key not in indexed] + changed
    report = IndexingReport(already_indexed=len(source) - len(positions), updated=len(changed), removed=len(deleted))
    if len(index):
        logger.info("%s: %d image(s) unchanged, embedding %d new and %d changed, removing %d deleted", output,
                    report.already_indexed, len(positions) - len(changed), len(changed), len(deleted))
    index.remove(deleted + [source.keys[i] for i in changed])
    index.set_stamps({key: stamps[i] for i, key in enumerate(source.keys) if key in indexed})  # touched, same bytes
    pending: list[tuple[list[int], torch.Tensor]] = []
    timing = {"last": time.monotonic(), "cost": 0.0}

    def flush(save: bool) -> None:
        if pending:
            done = [p for batch, _ in pending for p in batch]
            index.add(torch.cat([e for _, e in pending]), [source.keys[p] for p in done], [stamps[p] for p in done])
            pending.clear()
        if save and output is not None:
            started = time.monotonic()
            index.save(output, build_faiss=not pending_checkpoint[0])
            timing["cost"], timing["last"] = time.monotonic() - started, time.monotonic()

    pending_checkpoint = [False]

    def on_batch(batch_positions: list[int], embeddings: torch.Tensor) -> None:
        pending.append((batch_positions, embeddings))
        if output is not None and time.monotonic() - timing["last"] >= max(checkpoint_seconds, 4 * timing["cost"]):
            pending_checkpoint[0] = True
            flush(save=True)  # a partial index: a re-run embeds only what is missing
            pending_checkpoint[0] = False

    done, _, report.skipped = embed_image_source(
        retrieval_model.model, retrieval_model.processor, source, sorted(positions), batch_size, skip_invalid,
        num_workers, show_progress, on_batch=on_batch,
    )  # fmt: skip
    flush(save=output is not None)
    changed_set = set(changed)
    report.added, report.total = sum(1 for p in done if p not in changed_set), len(index)
    report.rates = [ProcessRate(len(done), time.monotonic() - started)]
    return index, report


def open_index(retrieval_model: RetrievalModel, source: ImageSource, output: str | os.PathLike | None,
               use_faiss: bool | None = None, index_type: str | None = None,
               index_params: dict[str, int] | None = None, max_memory: int | None = None) -> RetrievalIndex:
    """The index at `output` (checked to be of `retrieval_model`), or a new empty one, with the requested type."""
    if len(source) == 0:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InvalidDataError(f"no images found in {source.name} (image suffixes: {suffixes})")
    if output is not None:
        check_output_folder(output)
    if output is not None and (Path(output) / METADATA_FILE).exists():
        index = RetrievalIndex.load(output, use_faiss=use_faiss)
        index.check_model(retrieval_model.fingerprint, retrieval_model.bf16, where=f"index {output}")
    else:
        dim = retrieval_model.model.config.projection_dim
        index = RetrievalIndex(torch.zeros(0, dim), [], retrieval_model.name, retrieval_model.fingerprint,
                               retrieval_model.bf16, use_faiss)
    if index_type is not None and (index_type, dict(index_params or {}), max_memory) != (
            index.requested_type, index.requested_params, index.max_memory):
        if len(index):
            logger.info("%s: index type %s -> %s (the FAISS index is rebuilt)", output, index.requested_type, index_type)
        index.set_index_type(index_type, index_params, max_memory)
    return index


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
