"""FAISS index types for [`RetrievalIndex`]: exact or approximate inner-product search, chosen by size and memory.

| type | what it does | memory of the FAISS index (N rows, dim D) |
| --- | --- | --- |
| `flat` | `IndexFlatIP`: every row scored, exact | 4·N·D |
| `ivf` | `IndexIVFFlat`: k-means into `nlist` lists; a query scans the `nprobe` nearest lists; scores exact | 4·N·D + 8·N |
| `hnsw` | `IndexHNSWFlat` (`M` links per node): a graph walk of breadth `ef_search`; scores exact | (4·D + 8·M + 8)·N |
| `ivfpq` | `IndexIVFPQ`: like `ivf`, rows stored as `pq_m` bytes of product-quantisation codes; scores approximate (re-score them exactly with `rescore`) | (pq_m + 8)·N |
| `auto` | `flat` up to 50,000 rows; above, `ivf` when it fits `max_memory`, else `ivfpq` with the most bytes per row that fit | |

Approximate indexes hold rows under stable ids (`ids`, stored beside the embeddings), so rows added later go into the
trained index (`add_with_ids`) without retraining; the index is retrained from all rows once the gallery has grown past
[`RETRAIN_FACTOR`] × the rows it was trained on (k-means centres of a small gallery describe a large one badly).
Removing rows of an `hnsw` index rebuilds its graph (FAISS cannot delete from it); `ivf` / `ivfpq` delete in place.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
REQUESTABLE_TYPES = INDEX_TYPES + ("auto",)
APPROXIMATE_TYPES = ("ivf", "hnsw", "ivfpq")
RETRAIN_FACTOR = 4.0  # retrain once the gallery holds more than this many times the rows it was trained on
AUTO_FLAT_MAX_ROWS = 50_000  # `auto`: exact search below this size (a few ms per query)
MIN_TRAIN_ROWS = 1_000  # an approximate type over fewer rows searches exactly (nothing to cluster)
KMEANS_ITERATIONS = 10
TRAIN_POINTS_PER_LIST = 50  # k-means sample: at most this many rows per list
DEFAULT_HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 512
_PQ_BITS = 8


def check_index_type(value: str, flag: str = "--index_type") -> str:
    if value not in REQUESTABLE_TYPES:
        raise ValueError(f"{flag} {value!r} is not one of {', '.join(REQUESTABLE_TYPES)}")
    return value


def parse_memory(text: str | int | None, flag: str = "--max_index_memory") -> int | None:
    """Bytes of `"4G"`, `"512M"`, `"300K"`, `"1000000"` (powers of 1024); `None` stays `None`."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise ValueError(f"{flag} must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"{flag} {text!r} is not a size such as 4G, 512M or 1000000 (bytes)")
    value = float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2) or "_")
    if value < 1:
        raise ValueError(f"{flag} must be positive, got {text!r}")
    return int(value)


def default_nlist(rows: int) -> int:
    """Inverted lists for `rows`: about 2·√rows, with at least 39 training rows per list (FAISS's minimum)."""
    return max(1, min(int(2 * math.sqrt(rows)), rows // 39))


def _pq_m_choices(dim: int) -> list[int]:
    return [m for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32) if m >= 1 and dim % m == 0] or [1]


def default_params(index_type: str, rows: int, dim: int) -> dict[str, int]:
    if index_type in ("ivf", "ivfpq"):
        params = {"nlist": default_nlist(rows)}
        if index_type == "ivfpq":
            params["pq_m"] = _pq_m_choices(dim)[1 if len(_pq_m_choices(dim)) > 1 else 0]  # D/4 bytes per row
        return params
    if index_type == "hnsw":
        return {"M": DEFAULT_HNSW_M}
    return {}


def memory_bytes(index_type: str, rows: int, dim: int, params: dict[str, int]) -> int:
    """Estimated resident bytes of the FAISS index (the embeddings file is memory-mapped, not counted)."""
    if index_type == "flat":
        return 4 * rows * dim
    if index_type == "ivf":
        return (4 * dim + 8) * rows + 4 * dim * params["nlist"]
    if index_type == "hnsw":
        return (4 * dim + 8 * params["M"] + 8) * rows
    if index_type == "ivfpq":
        return (params["pq_m"] + 8) * rows + 4 * dim * (params["nlist"] + 2**_PQ_BITS)
    raise ValueError(f"unknown index type {index_type!r}")


def resolve(requested: str, rows: int, dim: int, max_memory: int | None = None,
            params: dict[str, int] | None = None) -> tuple[str, dict[str, int]]:
    """The concrete type and parameters for `requested` (`auto` chooses by `rows` and `max_memory` bytes)."""
    check_index_type(requested)
    if requested != "auto":
        return requested, {**default_params(requested, rows, dim), **(params or {})}
    fits = lambda kind, p: max_memory is None or memory_bytes(kind, rows, dim, p) <= max_memory  # noqa: E731
    if rows <= AUTO_FLAT_MAX_ROWS and fits("flat", {}):
        return "flat", {}
    ivf = default_params("ivf", rows, dim)
    if fits("ivf", ivf):
        return "ivf", ivf
    for m in _pq_m_choices(dim):
        candidate = {**ivf, "pq_m": m}
        if fits("ivfpq", candidate):
            return "ivfpq", candidate
    smallest = memory_bytes("ivfpq", rows, dim, {**ivf, "pq_m": _pq_m_choices(dim)[-1]})
    raise ValueError(f"--max_index_memory {max_memory} bytes is too small for {rows} rows of dim {dim}: the "
                     f"smallest index (ivfpq, {_pq_m_choices(dim)[-1]} bytes per row) needs about {smallest} bytes")


def build(index_type: str, params: dict[str, int], vectors: np.ndarray, ids: np.ndarray, seed: int = 0):
    """A trained FAISS index of `index_type` over `vectors` (float32 [N, D]) labelled by `ids` (int64 [N])."""
    import faiss

    rows, dim = vectors.shape
    if index_type == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap2(inner)
    elif index_type in ("ivf", "ivfpq"):
        nlist = max(1, min(int(params["nlist"]), rows))
        quantizer = faiss.IndexFlatIP(dim)
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, int(params["pq_m"]), _PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # owned by the IVF index from here on
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = seed
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        sample = vectors
        limit = max(TRAIN_POINTS_PER_LIST * nlist, 2**_PQ_BITS * 40 if index_type == "ivfpq" else 0)
        if rows > limit:
            chosen = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
            sample = vectors[chosen]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    else:
        raise ValueError(f"not an approximate index type: {index_type!r}")
    add(index, vectors, ids)
    return index


def add(index, vectors: np.ndarray, ids: np.ndarray, chunk: int = 65536) -> None:
    """Add rows to a trained index, `chunk` at a time (a memory-mapped source is read piece by piece)."""
    for start in range(0, len(ids), chunk):
        index.add_with_ids(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32),
                           np.ascontiguousarray(ids[start : start + chunk], dtype=np.int64))


def remove(index, ids: np.ndarray) -> bool:
    """Delete `ids` in place; `False` when the type cannot (HNSW: the caller rebuilds)."""
    import faiss

    if isinstance(index, faiss.IndexIDMap2):
        return False
    index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
    return True


def search_parameters(index_type: str, nprobe: int | None, ef_search: int | None):
    """Per-call FAISS search parameters (thread-safe: the index itself is not changed)."""
    import faiss

    if index_type in ("ivf", "ivfpq") and nprobe is not None:
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    if index_type == "hnsw" and ef_search is not None:
        return faiss.SearchParametersHNSW(efSearch=int(ef_search))
    return None


def default_search(index_type: str, params: dict[str, Any]) -> dict[str, int]:
    """Search-time defaults recorded in the manifest: `nprobe` (lists scanned), `ef_search` (graph breadth)."""
    if index_type in ("ivf", "ivfpq"):
        return {"nprobe": max(16, int(params.get("nlist", 1)) // 64)}
    if index_type == "hnsw":
        return {"ef_search": DEFAULT_EF_SEARCH}
    return {}


def read(path: str, mmap: bool, index_type: str = "flat"):
    """Read a FAISS index file; `mmap`: the lists / vectors stay in the file (paged in on use, read-only)."""
    import faiss

    if not mmap:
        return faiss.read_index(path)
    if index_type in ("ivf", "ivfpq"):  # the inverted lists are mapped
        return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)  # flat, HNSW: the vectors
