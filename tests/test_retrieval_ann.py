"""Approximate FAISS index types, exact re-scoring, incremental adds into a trained index and memory-mapped loading
(`trainer_bcls.retrieval.ann`, `RetrievalIndex(index_type=...)`; issue 23 items 1-2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer_bcls.retrieval import ann
from trainer_bcls.retrieval.index import METADATA_FILE, RetrievalIndex, faiss_available

pytestmark = pytest.mark.skipif(not faiss_available(), reason="needs faiss (pip install faiss-cpu)")


def clustered(rows: int, dim: int = 32, centres: int = 50, spread: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Unit vectors around `centres` random unit centres (real embeddings cluster; uniform ones do not)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, rows)] + spread * rng.standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim)
    return torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))


def make(x: torch.Tensor, index_type: str, **kwargs) -> RetrievalIndex:
    paths = [f"img{i:06d}.jpg" for i in range(len(x))]
    return RetrievalIndex(x, paths, "m", "sha256:x", index_type=index_type, **kwargs)


def recall(index: RetrievalIndex, exact: RetrievalIndex, queries: torch.Tensor, k: int = 10, **kwargs) -> float:
    got = index.search(queries, k, **kwargs)
    want = exact.search(queries, k)
    return float(np.mean([len({h.path for h in g} & {h.path for h in w}) / k for g, w in zip(got, want)]))


@pytest.fixture(scope="module")
def gallery() -> tuple[torch.Tensor, torch.Tensor]:
    data = clustered(6000, seed=0)
    return data[:5000], data[5000:5100]  # gallery, queries from the same distribution


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_ivf_and_hnsw_recall_against_the_exact_index_on_clustered_data(gallery, index_type):
    x, queries = gallery
    exact = make(x, "flat", use_faiss=False)
    index = make(x, index_type)
    assert recall(index, exact, queries) >= 0.95
    assert index.backend == f"faiss-{index_type}" and index.trained_rows == 5000


def test_fewer_lists_probed_lose_recall_and_more_win_it_back(gallery):
    x, queries = gallery
    exact, index = make(x, "flat", use_faiss=False), make(x, "ivf", index_params={"nlist": 128})
    low, high = recall(index, exact, queries, nprobe=1), recall(index, exact, queries, nprobe=128)
    assert low < 0.95 and high == 1.0  # nprobe reaches FAISS: all lists probed is exact


def test_rescore_gives_exact_scores_and_recovers_ivfpq_recall(gallery):
    x, queries = gallery
    exact = make(x, "flat", use_faiss=False)
    index = make(x, "ivfpq", index_params={"pq_m": 8})
    plain = recall(index, exact, queries)
    rescored = index.search(queries, 10, rescore=True, nprobe=32)
    for q, hits in zip(queries, rescored):
        rows = [index.paths.index(h.path) for h in hits]
        assert np.allclose([h.score for h in hits], (x[rows] @ q).numpy(), atol=1e-6)  # exact, not PQ, scores
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert recall(index, exact, queries, rescore=True, nprobe=32) > max(plain, 0.9)


def test_rows_added_go_into_the_trained_index_until_it_has_grown_past_the_retrain_factor(gallery):
    x, queries = gallery
    index = make(x[:2000], "ivf")
    trained = index._faiss()
    index.add(x[2000:3000], [f"new{i:05d}.jpg" for i in range(1000)])
    assert index._faiss() is trained and trained.ntotal == 3000 and index.trained_rows == 2000  # not retrained
    hits = index.search(x[2500:2501], 1, nprobe=64)[0]
    assert hits[0].path == "new00500.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-5)  # ids follow the sort
    index.remove(["new00500.jpg", "img000007.jpg"])
    assert index._faiss() is trained and trained.ntotal == 2998
    assert index.search(x[2500:2501], 1, nprobe=64)[0][0].path != "new00500.jpg"
    index.add(x[3000:5000] * 1.0, [f"more{i:05d}.jpg" for i in range(2000)])
    index.add(clustered(3100, seed=5), [f"again{i:05d}.jpg" for i in range(3100)])  # 8098 > 4 × 2000
    assert index._faiss() is not trained and index.trained_rows == len(index) == 8098


def test_hnsw_removal_rebuilds_and_still_finds_the_rest(gallery):
    x, _ = gallery
    index = make(x[:2000], "hnsw")
    index._faiss()
    index.remove([f"img{i:06d}.jpg" for i in range(0, 2000, 2)])
    hits = index.search(x[1:2], 1)[0]
    assert hits[0].path == "img000001.jpg" and index._faiss().ntotal == 1000


def test_saved_approximate_index_records_its_type_and_mmap_load_gives_the_same_hits(gallery, tmp_path):
    x, queries = gallery
    index = make(x, "ivf", index_params={"nlist": 64})
    index.search_defaults = {"nprobe": 8}
    before = index.search(queries, 10)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / METADATA_FILE).read_text())
    assert manifest["version"] == 3 and manifest["index"]["type"] == "ivf"
    assert manifest["index"]["params"] == {"nlist": 64} and manifest["index"]["search"] == {"nprobe": 8}
    for mmap in (False, True):
        loaded = RetrievalIndex.load(tmp_path / "idx", mmap=mmap)
        assert loaded.index_type == "ivf" and loaded._faiss_index is not None and loaded.mmapped == mmap
        assert (loaded.embeddings_map is not None) == mmap
        if mmap:
            assert np.shares_memory(loaded.embeddings.numpy(), loaded.embeddings_map)  # the file, not a copy
        after = loaded.search(queries, 10)
        assert [[h.path for h in hits] for hits in after] == [[h.path for h in hits] for hits in before]
        assert np.allclose([[h.score for h in hits] for hits in after], [[h.score for h in hits] for hits in before])


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_mmap_load_of_each_type_returns_the_same_hits(gallery, tmp_path, index_type):
    x, queries = gallery
    index = make(x, index_type)
    before = [[h.path for h in hits] for hits in index.search(queries[:20], 5, rescore=True)]
    index.save(tmp_path / "idx")
    loaded = RetrievalIndex.load(tmp_path / "idx", mmap=True)
    assert [[h.path for h in hits] for hits in loaded.search(queries[:20], 5, rescore=True)] == before
    loaded.add(x[:3] * 1.0, ["zz1", "zz2", "zz3"])  # a mapped index takes new rows (retrained in memory)
    assert {h.path for h in loaded.search(x[:1], 3)[0]} >= {"zz1"}


def test_auto_chooses_by_size_and_memory_budget():
    assert ann.resolve("auto", 10_000, 256)[0] == "flat"
    assert ann.resolve("auto", 500_000, 256)[0] == "ivf"
    kind, params = ann.resolve("auto", 500_000, 256, max_memory=ann.parse_memory("100M"))
    assert kind == "ivfpq" and ann.memory_bytes(kind, 500_000, 256, params) <= 100 * 2**20
    with pytest.raises(ValueError, match="--max_index_memory"):
        ann.resolve("auto", 500_000, 256, max_memory=1_000_000)
    with pytest.raises(ValueError, match="--max_index_memory"):
        ann.parse_memory("lots")
    assert ann.parse_memory("1.5G") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="--index_type 'annoy'"):
        ann.check_index_type("annoy")


def test_small_approximate_index_searches_exactly_and_trains_when_large_enough():
    x = clustered(500)
    index = make(x, "ivf")
    assert index._faiss() is None and index.search(x[:1], 1)[0][0].path == "img000000.jpg"
    index.add(clustered(1000, seed=3), [f"b{i:04d}" for i in range(1000)])
    assert index._faiss() is not None and index._faiss().ntotal == 1500


def test_newer_manifest_version_is_refused(tmp_path):
    make(clustered(10), "flat").save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / METADATA_FILE).read_text())
    (tmp_path / "idx" / METADATA_FILE).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        RetrievalIndex.load(tmp_path / "idx")
