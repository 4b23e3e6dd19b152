"""Streamed relevance labels: equal to a brute-force reference, to the map-style labels, and a bounded cache."""

import hashlib
import zlib

import numpy as np
import pytest
import torch

from trainer_bcls.labels.caption_embedders import CaptionEmbedder, TfidfRelevance, l2_normalize
from trainer_bcls.labels.caption_embedding_store import CaptionEmbeddingStore, caption_digest
from trainer_bcls.labels.relevance import RelevanceLabels
from trainer_bcls.labels.streamed_relevance import StreamedRelevanceLabels, relevance_from_embeddings


class WordHashEmbedder(CaptionEmbedder):
    """Dense bag of hashed words (dim 64): deterministic, no model, graded similarity between captions."""

    def __init__(self):
        self.calls = 0

    @property
    def cache_key(self) -> str:
        return "word-hash-64"

    def embed(self, captions, show_progress_bar=True):
        self.calls += 1
        out = np.zeros((len(captions), 64), dtype=np.float32)
        for i, caption in enumerate(captions):
            for word in caption.lower().split():
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
        return l2_normalize(out)


SAMPLES = [  # (image id, captions carried by the sample)
    (11, ["a red circle on the left", "big red round shape"]),
    (12, ["a blue square at the top"]),
    (13, ["green triangle", "a small green triangle on white", "triangle in green"]),
    (14, ["a red square on the left"]),
]


def brute_force(pairs, embed) -> np.ndarray:
    """R[a, b] = max over sample a's captions of cos(e(c), e(caption_b)); 1 where the images are the same."""
    matrix = np.zeros((len(pairs), len(pairs)), dtype=np.float32)
    for a, (image_a, refs_a, _) in enumerate(pairs):
        for b, (image_b, _, caption_b) in enumerate(pairs):
            matrix[a, b] = 1.0 if image_a == image_b else max(float(embed(c) @ embed(caption_b)) for c in refs_a)
    return matrix


def test_labels_equal_brute_force(tmp_path):
    embedder = WordHashEmbedder()
    labels = StreamedRelevanceLabels(embedder, cache_dir=tmp_path)
    pairs = [(i, refs, refs[k % len(refs)]) for k, (i, refs) in enumerate(SAMPLES)]
    pairs.append((13, SAMPLES[2][1], SAMPLES[2][1][2]))  # a second pair of image 13: a positive off the diagonal
    out = labels.batch_inputs([p[1] for p in pairs], [p[2] for p in pairs], [p[0] for p in pairs])
    expected = brute_force(pairs, lambda c: embedder.embed([c])[0])
    np.testing.assert_allclose(out["relevance"].numpy(), expected, atol=1e-6)
    assert out["relevance"][2, 4] == 1 and out["relevance"][0, 3] < 1
    assert out["reference_mask"].sum(1).tolist() == [2, 1, 3, 1, 3]
    assert labels.num_encoded == len({c for _, refs in SAMPLES for c in refs})  # each unique caption once


def test_all_captions_in_sample_equal_map_style_all(synthetic_dir):
    """When every sample carries all captions of its image, the streamed labels are the map-style "all" labels."""
    from trainer_bcls.data.loaders import load_pairs

    pairs = load_pairs(synthetic_dir, "train").select(range(40))
    embedder = WordHashEmbedder()
    map_labels = RelevanceLabels.build(pairs, embedder, use_cache=False, show_progress_bar=False)
    index = map_labels.index
    rows = [pairs[i] for i in range(0, 40, 3)]
    references = [[index.captions[j] for j in index.captions_of(r["image_id"])] for r in rows]
    streamed = StreamedRelevanceLabels(embedder, use_cache=False)
    out = streamed.batch_inputs(references, [r["caption"] for r in rows], [r["image_id"] for r in rows])
    expected = map_labels.batch_matrix([r["image_id"] for r in rows], [r["caption_id"] for r in rows])
    torch.testing.assert_close(out["relevance"], expected, atol=1e-6, rtol=0)
    # one caption per sample (LAION-style): the map-style "paired" labels
    paired = RelevanceLabels(index, map_labels.embeddings, "paired")
    out = streamed.batch_inputs([[r["caption"]] for r in rows], [r["caption"] for r in rows],
                                [r["image_id"] for r in rows])
    expected = paired.batch_matrix([r["image_id"] for r in rows], [r["caption_id"] for r in rows])
    torch.testing.assert_close(out["relevance"], expected, atol=1e-6, rtol=0)


def test_relevance_from_embeddings_blocks_equal_whole():
    """Cross blocks (rows of one process × columns of all) equal the corresponding block of the whole matrix."""
    torch.manual_seed(0)
    refs = torch.nn.functional.normalize(torch.randn(6, 3, 8), dim=-1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    caps = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ids = torch.tensor([1, 2, 3, 1, 5, 6])
    whole = relevance_from_embeddings(refs, mask, caps, ids, ids)
    block = relevance_from_embeddings(refs[3:], mask[3:], caps, ids[3:], ids)
    torch.testing.assert_close(block, whole[3:])
    expected = max(float(refs[1, 0] @ caps[4]), -1.0)
    assert whole[1, 4].item() == pytest.approx(expected) and whole[0, 3] == 1 and whole[3, 0] == 1


def test_tfidf_refused():
    with pytest.raises(ValueError, match="cannot label a stream"):
        StreamedRelevanceLabels(TfidfRelevance())


def test_cache_reused_across_instances_and_bounded(tmp_path):
    captions = [f"caption number {i} with words {i % 7}" for i in range(50)]
    first = StreamedRelevanceLabels(WordHashEmbedder(), cache_dir=tmp_path)
    rows = first.embed(captions)
    first.store.flush()
    second = StreamedRelevanceLabels(WordHashEmbedder(), cache_dir=tmp_path)
    np.testing.assert_array_equal(second.embed(captions), rows)
    assert second.num_encoded == 0 and second.store.num_read == 50  # read from the part on disk
    # bounded: parts of 10 rows x (64 float32 + 16-byte key) ~ 3 KiB each; a 10 KiB limit keeps at most 3
    store = CaptionEmbeddingStore(tmp_path / "bounded", "k", max_cache_gb=10 * 1024 / 2**30, flush_every=10,
                                  max_memory_rows=25)
    for start in range(0, 50, 10):
        store.put([caption_digest(c) for c in captions[start : start + 10]], rows[start : start + 10])
    parts = list((tmp_path / "bounded").glob("part-*.safetensors"))
    assert 1 <= len(parts) <= 3 and store.disk_bytes() <= 10 * 1024
    assert len(store) == 25  # memory bound: the oldest rows dropped
    assert store.get([caption_digest(captions[0])]) == [None]
    assert store.get([caption_digest(captions[49])])[0] is not None
