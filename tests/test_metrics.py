"""Tests for trainer_bcls.evaluation.metrics against brute-force references (full sorts, O(n^2) pair counts, scipy)."""

import ast
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from trainer_bcls.evaluation import metrics as M


METRICS_PATH = Path(M.__file__).resolve()
RANK_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
)


# ------------------------------------------------------------------------------------------------ references


def reference_ranks(sim: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Full sort per query: score descending, ties broken in favour of positives (the documented convention)."""
    ranks = []
    for scores, pos in zip(sim, positive):
        order = np.lexsort((~pos, -scores))  # last key is primary
        ranks.append(np.flatnonzero(pos[order])[0] + 1)
    return np.asarray(ranks)


def reference_metrics(image_embeds, text_embeds, caption_image_ids, ks=(1, 5, 10)):
    sim = np.asarray(image_embeds, dtype=np.float64) @ np.asarray(text_embeds, dtype=np.float64).T
    ids = np.asarray(caption_image_ids)
    positive = ids[None, :] == np.arange(sim.shape[0])[:, None]
    i2t, t2i = reference_ranks(sim, positive), reference_ranks(sim.T, positive.T)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks <= k)
    out["rsum"] = sum(out.values())
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = np.floor(np.median(ranks - 1)) + 1
        out[f"{name}_meanr"] = ranks.mean()
    return out, i2t, t2i


def brute_pair_counts(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    iu = np.triu_indices(len(x), k=1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    return (dx * dy).sum(), (dx == 0).sum(), (dy == 0).sum(), len(iu[0])


def brute_tau_b(x, y):
    s, tx, ty, n0 = brute_pair_counts(x, y)
    denom = math.sqrt((n0 - tx) * (n0 - ty))
    return s / denom if denom > 0 else math.nan


def brute_tau_c(x, y):
    s, _, _, _ = brute_pair_counts(x, y)
    n, m = len(x), min(len(np.unique(x)), len(np.unique(y)))
    return 2 * s / (n * n * (m - 1) / m) if m > 1 else math.nan


def brute_ndcg(scores, relevance, k=10):
    gains = np.maximum(np.asarray(relevance, dtype=np.float64), 0)
    order = np.lexsort((-gains, -np.asarray(scores)))  # score desc, ties: more relevant first
    discount = 1 / np.log2(np.arange(2, k + 2))
    top, ideal = gains[order][:k], np.sort(gains)[::-1][:k]
    idcg = (ideal * discount[: len(ideal)]).sum()
    return (top * discount[: len(top)]).sum() / idcg if idcg > 0 else 0.0


def random_gallery(rng, num_images, num_texts, dim, quantised=False):
    """Every image gets one caption, the rest go to random images; quantised = small integers (exact ties)."""
    ids = np.concatenate([np.arange(num_images), rng.integers(0, num_images, num_texts - num_images)])
    rng.shuffle(ids)
    if quantised:
        images = rng.integers(-1, 2, (num_images, dim)).astype(np.float32)
        texts = rng.integers(-1, 2, (num_texts, dim)).astype(np.float32)
    else:
        images = rng.standard_normal((num_images, dim))
        texts = rng.standard_normal((num_texts, dim))
        images /= np.linalg.norm(images, axis=1, keepdims=True)
        texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts, ids


def assert_metrics_close(got, expected, keys=RANK_KEYS):
    for key in keys:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


# ------------------------------------------------------------------------------------------------ ranks


def test_first_hit_ranks_ties_are_optimistic():
    sim = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.5, 0.9, 0.9, 0.1], [0.3, 0.3, 0.3, 0.3], [0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    # strictly greater than the best positive: 0, 0, 0 (all tied), 1 (0.4 > 0.3)
    assert M.first_hit_ranks(sim, mask).tolist() == [1, 1, 1, 2]
    assert M.first_hit_ranks(sim.numpy(), mask.numpy()).tolist() == [1, 1, 1, 2]
    assert reference_ranks(sim.numpy(), mask.numpy()).tolist() == [1, 1, 1, 2]
    # a plain stable argsort puts the tied positive second on row 0: the convention matters
    assert int(np.flatnonzero(np.argsort(-sim[0].numpy(), kind="stable") == 2)[0]) + 1 == 2
    with pytest.raises(ValueError, match="Query row 1 has no positive"):
        M.first_hit_ranks(sim[:2], torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool))


def test_hand_made_gallery_with_ties_and_single_caption_image():
    images = np.array([[2, 0], [0, 2], [1, 1]], dtype=np.float32)
    texts = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=np.float32)
    ids = np.array([0, 0, 1, 2])  # image 0 has two captions, images 1 and 2 one each
    i2t, t2i = M.retrieval_ranks(images, texts, ids, chunk_size=2)
    assert i2t.tolist() == [1, 1, 2]
    assert t2i.tolist() == [1, 3, 1, 2]
    out = M.retrieval_metrics(images, texts, ids, chunk_size=2)
    expected = {
        "i2t_r1": 200 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0, "t2i_r1": 50.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
        "rsum": 200 / 3 + 450.0, "i2t_medr": 1.0, "i2t_meanr": 4 / 3, "t2i_medr": 1.0, "t2i_meanr": 1.75,
        # image 0 (R = 2): its captions at positions 1 and 4 -> AP 1/2, R-P 1/2; image 1: 1, 1; image 2: 0, 0
        "i2t_map_at_r": 50.0, "i2t_r_precision": 50.0, "t2i_map_at_r": 50.0, "t2i_r_precision": 50.0,
    }
    assert set(out) == set(expected)
    assert_metrics_close(out, expected, keys=tuple(expected))
    assert_metrics_close(out, reference_metrics(images, texts, ids)[0])


@pytest.mark.parametrize(
    "num_images,num_texts,dim,chunk_size,quantised",
    [(1, 1, 3, 1, False), (5, 5, 4, 2, False), (13, 41, 8, 4, False), (37, 150, 16, 16, False),
     (64, 300, 8, 1024, False), (29, 101, 3, 7, True), (40, 200, 2, 9, True)],
)
def test_retrieval_metrics_match_full_argsort(num_images, num_texts, dim, chunk_size, quantised):
    rng = np.random.default_rng(num_images * 1000 + num_texts)
    images, texts, ids = random_gallery(rng, num_images, num_texts, dim, quantised)
    expected, i2t_ref, t2i_ref = reference_metrics(images, texts, ids)
    i2t, t2i = M.retrieval_ranks(images, texts, ids, chunk_size=chunk_size)
    assert i2t.tolist() == i2t_ref.tolist()
    assert t2i.tolist() == t2i_ref.tolist()
    assert_metrics_close(M.retrieval_metrics(images, texts, ids, chunk_size=chunk_size), expected)
    # torch inputs give the same result
    got = M.retrieval_metrics(
        torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(ids), chunk_size=chunk_size
    )
    assert_metrics_close(got, expected)


def test_custom_ks_and_rsum():
    rng = np.random.default_rng(3)
    images, texts, ids = random_gallery(rng, 20, 60, 4)
    out = M.retrieval_metrics(images, texts, ids, ks=(2, 3), chunk_size=6)
    expected = reference_metrics(images, texts, ids, ks=(2, 3))[0]
    assert_metrics_close(out, expected, keys=("i2t_r2", "i2t_r3", "t2i_r2", "t2i_r3", "rsum"))
    assert "i2t_r1" not in out


def test_similarity_chunks_cover_the_matrix():
    rng = np.random.default_rng(0)
    q, g = torch.from_numpy(rng.standard_normal((10, 4))), torch.from_numpy(rng.standard_normal((7, 4)))
    chunks = list(M.similarity_chunks(q, g, chunk_size=3))
    assert [start for start, _ in chunks] == [0, 3, 6, 9]
    assert max(sim.shape[0] for _, sim in chunks) == 3
    torch.testing.assert_close(torch.cat([sim for _, sim in chunks]), q @ g.T)


def test_retrieval_input_errors():
    images, texts = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"caption_image_ids\[2\]` = 5"):
        M.retrieval_metrics(images, texts, [0, 1, 5])
    with pytest.raises(ValueError, match=r"have no caption.*\[2\]"):
        M.retrieval_metrics(images, texts, [0, 1, 1])
    with pytest.raises(ValueError, match="same dimension"):
        M.retrieval_metrics(images, texts[:, :2], [0, 1, 2])
    bad = texts.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="text_embeds.*row 1"):
        M.retrieval_metrics(images, bad, [0, 1, 2])
    with pytest.raises(ValueError, match="chunk_size"):
        M.retrieval_metrics(images, texts, [0, 1, 2], chunk_size=0)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        M.retrieval_metrics(images, texts, [0, 1])


# ------------------------------------------------------------------------------------------------ Kendall / nDCG


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 31, 64, 100])
def test_strict_inversions_match_brute_force(n):
    rng = np.random.default_rng(n)
    v = torch.from_numpy(rng.integers(0, 4, (5, n)).astype(np.float64))
    brute = (v[:, :, None] > v[:, None, :]).triu(1).sum((1, 2))
    assert M._strict_inversions(v).tolist() == brute.tolist()


@pytest.mark.parametrize("n,levels", [(2, 2), (5, 3), (17, 4), (60, 1000), (128, 6)])
def test_kendall_tau_b_matches_brute_force_and_scipy(n, levels):
    rng = np.random.default_rng(n + levels)
    x = rng.integers(0, levels, (6, n)).astype(np.float32)
    y = rng.integers(0, 3, (6, n)).astype(np.float64)
    x[0] = 1.0  # constant row: undefined
    got = M.kendall_tau_b(x, y)
    assert got.shape == (6,) and got.dtype == torch.float64
    expected = np.array([brute_tau_b(a, b) for a, b in zip(x, y)])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert math.isnan(float(got[0]))
    for a, b, g in zip(x[1:], y[1:], got[1:]):
        assert float(g) == pytest.approx(stats.kendalltau(a, b, variant="b").statistic, abs=1e-12, nan_ok=True)
    assert float(M.kendall_tau_b(x[-1], y[-1])) == pytest.approx(expected[-1], abs=1e-12, nan_ok=True)


def test_kendall_tau_c_matches_brute_force_and_scipy():
    rng = np.random.default_rng(7)
    for n, levels in [(2, 2), (10, 3), (57, 5), (300, 4), (200, 1000)]:
        x = rng.integers(0, levels, n).astype(np.float64)
        y = rng.integers(0, 4, n).astype(np.float64)
        got = M.kendall_tau_c(x, y)
        if math.isnan(brute_tau_c(x, y)):
            assert math.isnan(got)
            continue
        assert got == pytest.approx(brute_tau_c(x, y), abs=1e-12)
        assert got == pytest.approx(stats.kendalltau(x, y, variant="c").statistic, abs=1e-12)
    assert math.isnan(M.kendall_tau_c([1.0], [2.0]))
    assert math.isnan(M.kendall_tau_c([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="equal length"):
        M.kendall_tau_c([1.0, 2.0], [1.0])


def test_ndcg_matches_brute_force_and_sklearn():
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 4, (8, 30)).astype(np.float64)  # many score ties
    rel = rng.integers(0, 3, (8, 30)) / 2.0
    rel[0] = 0.0  # IDCG = 0 -> 0
    rel[1, :5] = -0.5  # negative relevance is a zero gain
    got = M.ndcg_at_k(scores, rel, k=10)
    expected = [brute_ndcg(s, r, 10) for s, r in zip(scores, rel)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert float(got[0]) == 0.0
    assert float(M.ndcg_at_k(scores[2], rel[2], k=50)) == pytest.approx(brute_ndcg(scores[2], rel[2], 50))
    from sklearn.metrics import ndcg_score  # no ties: every convention agrees

    s, r = rng.standard_normal((5, 40)), rng.random((5, 40))
    assert float(M.ndcg_at_k(s, r, 10).mean()) == pytest.approx(ndcg_score(r, s, k=10), abs=1e-12)


def test_relevance_metrics_match_brute_force():
    rng = np.random.default_rng(5)
    images, texts, ids = random_gallery(rng, 23, 70, 3, quantised=True)  # ties in similarity
    relevance = rng.integers(0, 4, (23, 70)) / 3.0  # ties in relevance
    relevance[4] = 0.5  # constant row: tau undefined, left out
    sim = images.astype(np.float64) @ texts.astype(np.float64).T

    def mean_defined(values):
        values = np.asarray(values)
        return values[~np.isnan(values)].mean()

    expected = {
        "kendall_tau_b": mean_defined([brute_tau_b(s, r) for s, r in zip(sim, relevance)]),
        "ndcg@10": np.mean([brute_ndcg(s, r) for s, r in zip(sim, relevance)]),
        "t2i_kendall_tau_b": mean_defined([brute_tau_b(s, r) for s, r in zip(sim.T, relevance.T)]),
        "t2i_ndcg@10": np.mean([brute_ndcg(s, r) for s, r in zip(sim.T, relevance.T)]),
    }
    out = M.retrieval_metrics(images, texts, ids, chunk_size=5, relevance=relevance)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert_metrics_close(out, reference_metrics(images, texts, ids)[0])

    calls = []

    def relevance_fn(image_indices):
        calls.append(image_indices.tolist())
        return torch.from_numpy(relevance[image_indices])

    lazy = M.retrieval_metrics(images, texts, ids, chunk_size=5, relevance=relevance_fn)
    assert calls[0] == [0, 1, 2, 3, 4] and len(calls) == 5  # fetched chunk by chunk
    assert lazy["kendall_tau_b"] == pytest.approx(expected["kendall_tau_b"], abs=1e-12)
    assert lazy["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-12)
    assert "t2i_kendall_tau_b" not in lazy

    with pytest.raises(ValueError, match=r"relevance\(image rows 0\.\.4\) must have shape"):
        M.retrieval_metrics(images, texts, ids, chunk_size=5, relevance=lambda idx: relevance[idx, :-1])
    with pytest.raises(ValueError, match="shape"):
        M.retrieval_metrics(images, texts, ids, relevance=relevance[:-1])
    bad = relevance.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="image 7 and caption 3"):
        M.retrieval_metrics(images, texts, ids, chunk_size=5, relevance=bad)


# ------------------------------------------------------------------------------------------------ judgments


def test_load_judgments(tmp_path):
    path = tmp_path / "ExpertAnnotations.txt"
    path.write_bytes(
        b"1056338697_4f7d7ce270.jpg\t114051287_dd85625a04.jpg#2\t1\t1\t2\n"
        b"\n"
        b"1056338697_4f7d7ce270.jpg\t1056338697_4f7d7ce270.jpg#0\t4\t3.5\t4\r\n"
        b"a.jpg\tb#c.jpg#4\t0.25\n"
    )
    got = M.load_judgments(path)
    assert len(got) == 7
    assert got[0] == M.Judgment("1056338697_4f7d7ce270.jpg", "114051287_dd85625a04.jpg", 2, 1.0)
    assert [j.score for j in got[:3]] == [1.0, 1.0, 2.0]
    assert got[4] == M.Judgment("1056338697_4f7d7ce270.jpg", "1056338697_4f7d7ce270.jpg", 0, 3.5)
    assert got[6] == M.Judgment("a.jpg", "b#c.jpg", 4, 0.25)
    first_only = M.load_judgments(str(path), score_columns=(0,))
    assert [j.score for j in first_only] == [1.0, 4.0, 0.25]


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ("a.jpg\tb.jpg#1", "got 2 field"),
        ("a.jpg", "got 1 field"),
        ("a.jpg\tb.jpg#1\t1\thigh", "score 2 = 'high' is not a number"),
        ("a.jpg\tb.jpg\t1", "'b.jpg' is not of the form 'image#k'"),
        ("a.jpg\tb.jpg#x\t1", "caption index 'x'"),
        ("a.jpg\tb.jpg#1\tnan", "not finite"),
    ],
)
def test_load_judgments_malformed_lines_name_the_line(tmp_path, bad_line, message):
    path = tmp_path / "judgments.txt"
    path.write_text("q.jpg\tc.jpg#0\t3\n\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        M.load_judgments(path)
    assert f"{path}:3:" in str(err.value)


def test_load_judgments_missing_score_column(tmp_path):
    path = tmp_path / "crowdflower.txt"
    path.write_text("q.jpg\tc.jpg#0\t0.5\t1\t1\nq.jpg\tc.jpg#1\t0.5\n")
    with pytest.raises(ValueError, match=r":2: score column 2 requested"):
        M.load_judgments(path, score_columns=(0, 2))


def test_judgment_correlation(caplog):
    rng = np.random.default_rng(2)
    judgments = [
        M.Judgment(f"q{q}.jpg", f"c{c}.jpg", k, float(rng.integers(1, 5)))
        for q in range(6) for c in range(5) for k in range(2) for _ in range(3)
    ]
    keys = [(f"q{q}.jpg", f"c{c}.jpg", k) for q in range(6) for c in range(5) for k in range(2)]
    sims = {key: float(rng.integers(0, 6)) for key in keys}
    calls = []

    def similarity_fn(query, caption_image, caption_index):
        calls.append((query, caption_image, caption_index))
        return None if caption_image == "c4.jpg" else sims[(query, caption_image, caption_index)]

    with caplog.at_level(logging.WARNING):
        out = M.judgment_correlation(judgments, similarity_fn)
    assert out["num_missing"] == 6 * 2 * 3 and out["num_pairs"] == len(judgments) - 36
    assert "36 of 180 judgment pairs" in caplog.text
    assert len(calls) == len(sims)  # one call per unique (query, caption)
    kept = [j for j in judgments if j.caption_image != "c4.jpg"]
    x = [sims[(j.query_image, j.caption_image, j.caption_index)] for j in kept]
    y = [j.score for j in kept]
    assert out["kendall_tau_c"] == pytest.approx(brute_tau_c(x, y), abs=1e-12)
    assert out["kendall_tau_c"] == pytest.approx(stats.kendalltau(x, y, variant="c").statistic, abs=1e-12)
    empty = M.judgment_correlation(judgments[:3], lambda *key: None)
    assert math.isnan(empty["kendall_tau_c"]) and empty["num_pairs"] == 0 and empty["num_missing"] == 3


# ------------------------------------------------------------------------------------------------ evaluate module


def test_metrics_file_is_self_contained():
    tree = ast.parse(METRICS_PATH.read_text())
    allowed = {"__future__", "dataclasses", "logging", "math", "os", "typing", "numpy", "torch", "datasets", "evaluate"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            assert node.module.split(".")[0] in allowed, node.module
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] in allowed for alias in node.names), node.lineno
    import evaluate

    modules = [o for o in vars(M).values() if isinstance(o, type) and issubclass(o, evaluate.EvaluationModule)]
    assert modules == [M.BCLSRetrievalMetric]


def test_metric_class_pair_view_dedup_and_errors():
    rng = np.random.default_rng(9)
    images, texts, ids = random_gallery(rng, 6, 15, 4)
    image_ids = np.array([10, 30, 20, 50, 40, 60])[ids]  # arbitrary ids; rows = sorted unique ids
    metric = M.BCLSRetrievalMetric(keep_in_memory=True)
    metric.add_batch(image_embeds=images[ids][:8], text_embeds=texts[:8], image_ids=image_ids[:8])
    metric.add_batch(image_embeds=torch.from_numpy(images[ids][8:]), text_embeds=torch.from_numpy(texts[8:]),
                     image_ids=torch.from_numpy(image_ids[8:]))
    order = np.argsort([10, 30, 20, 50, 40, 60])
    relevance = rng.random((6, 15))
    out = metric.compute(chunk_size=4, relevance=relevance)
    # image rows in ascending image_id order
    direct = M.retrieval_metrics(images[order], texts, np.argsort(order)[ids], chunk_size=4, relevance=relevance)
    for key in direct:
        assert out[key] == pytest.approx(direct[key], abs=1e-5), key

    bad = images[ids].copy()
    bad[3] += 0.1
    metric = M.BCLSRetrievalMetric(keep_in_memory=True)
    with pytest.raises(ValueError, match=r"Row \d+: image_ids=\d+ has an image embedding differing"):
        metric.compute(image_embeds=bad, text_embeds=texts, image_ids=image_ids)


EVALUATE_SCRIPT = r"""
import json, sys
import numpy as np
import evaluate

metric = evaluate.load(sys.argv[1], keep_in_memory=True)
assert type(metric).__name__ == "BCLSRetrievalMetric", type(metric)
assert "trainer_bcls" not in sys.modules, "the module script imported the package"
data = np.load(sys.argv[2])
for s in range(0, len(data["ids"]), 16):
    metric.add_batch(image_embeds=data["pair_images"][s:s + 16], text_embeds=data["texts"][s:s + 16],
                     image_ids=data["ids"][s:s + 16])
print("RESULT=" + json.dumps(metric.compute(chunk_size=7)))
"""


def test_evaluate_load_from_local_path(tmp_path):
    rng = np.random.default_rng(4)
    images, texts, ids = random_gallery(rng, 12, 50, 8)
    images, texts = images.astype(np.float32), texts.astype(np.float32)
    np.savez(tmp_path / "data.npz", pair_images=images[ids], texts=texts, ids=ids)
    (tmp_path / "run.py").write_text(EVALUATE_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(METRICS_PATH), str(tmp_path / "data.npz")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT=")[-1])
    assert (tmp_path / "modules" / "evaluate_modules" / "metrics" / "metrics").is_dir()
    expected = reference_metrics(images, texts, ids)[0]
    assert_metrics_close(got, expected)
