"""mAP@R and R-Precision (issue 21): brute-force loops over a full small matrix, and the `eccv_caption` package's
own implementation on synthetic rankings (its `Metrics` takes `{query_id: [ranked ids]}` dicts)."""

import json
import math

import numpy as np
import pytest
import torch

from trainer_bcls.evaluation import metrics as M


# ------------------------------------------------------------------------------------------------ references


def ranked(scores: np.ndarray, positive: set) -> list[int]:
    """Candidates by score descending, ties broken in favour of positives (the documented rule), then by index."""
    return sorted(range(len(scores)), key=lambda c: (-scores[c], c not in positive, c))


def brute_ap_rp(scores: np.ndarray, positive: set, num_relevant: int) -> tuple[float, float]:
    """Plain loops: P@r over the first r items (a missing item past the list's end is not a positive)."""
    order = ranked(scores, positive)
    ap = 0.0
    for r in range(1, num_relevant + 1):
        found = sum(1 for c in order[:r] if c in positive)
        if r <= len(order) and order[r - 1] in positive:
            ap += found / r
    found_r = sum(1 for c in order[:num_relevant] if c in positive)
    return ap / num_relevant, found_r / num_relevant


def brute_first_hit(scores: np.ndarray, positive: set) -> float:
    order = ranked(scores, positive)
    hits = [i + 1 for i, c in enumerate(order) if c in positive]
    return hits[0] if hits else math.inf


def binary_reference(sim: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    out = {}
    for direction, mat in (("i2t", sim), ("t2i", sim.T)):
        aps, rps = [], []
        for q, scores in enumerate(mat):
            positive = set(np.flatnonzero(ids == q).tolist()) if direction == "i2t" else {int(ids[q])}
            ap, rp = brute_ap_rp(scores, positive, len(positive))
            aps.append(ap)
            rps.append(rp)
        out[f"{direction}_map_at_r"] = 100 * np.mean(aps)
        out[f"{direction}_r_precision"] = 100 * np.mean(rps)
    return out


def gallery(rng, num_images, num_texts, dim, quantised):
    ids = np.concatenate([np.arange(num_images), rng.integers(0, num_images, num_texts - num_images)])
    rng.shuffle(ids)
    if quantised:  # small integers: many exact ties
        return (rng.integers(-1, 2, (num_images, dim)).astype(np.float32),
                rng.integers(-1, 2, (num_texts, dim)).astype(np.float32), ids)
    images, texts = rng.standard_normal((num_images, dim)), rng.standard_normal((num_texts, dim))
    return images, texts, ids


def random_extended(rng, sim, ids, fraction=0.6, max_extra=4, outside=False, prefix="eccv_"):
    """Listed queries with their binary positives plus random extra ones (some lists get no extra)."""
    num_images, num_texts = sim.shape
    i2t, t2i, i2t_out, t2i_out = {}, {}, {}, {}
    for q in range(num_images):
        if rng.random() < fraction:
            i2t[q] = np.flatnonzero(ids == q).tolist() + rng.integers(0, num_texts, rng.integers(0, max_extra)).tolist()
            if outside and rng.random() < 0.5:
                i2t_out[q] = int(rng.integers(1, 4))
    for q in range(num_texts):
        if rng.random() < fraction:
            t2i[q] = [int(ids[q])] + rng.integers(0, num_images, rng.integers(0, max_extra)).tolist()
            if outside and rng.random() < 0.5:
                t2i_out[q] = int(rng.integers(1, 4))
    return M.ExtendedPositives(i2t=i2t, t2i=t2i, i2t_outside=i2t_out, t2i_outside=t2i_out, prefix=prefix)


def extended_reference(sim, extended, ks=(1, 5, 10)) -> dict[str, float]:
    out = {}
    for direction, mat, lists, outside in (("i2t", sim, extended.i2t, extended.i2t_outside),
                                           ("t2i", sim.T, extended.t2i, extended.t2i_outside)):
        if not lists:
            continue
        aps, rps, firsts = [], [], []
        for q, items in lists.items():
            positive = set(items)
            ap, rp = brute_ap_rp(mat[q], positive, len(positive) + outside.get(q, 0))
            aps.append(ap)
            rps.append(rp)
            firsts.append(brute_first_hit(mat[q], positive))
        p = extended.prefix + direction
        out[f"{p}_map_at_r"], out[f"{p}_r_precision"] = 100 * np.mean(aps), 100 * np.mean(rps)
        for k in ks:
            out[f"{p}_r{k}"] = 100 * np.mean(np.asarray(firsts) <= k)
        out[f"{p}_num_queries"] = len(lists)
    return out


def assert_close(got, expected, abs_tol=1e-9):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=abs_tol), key


# ------------------------------------------------------------------------------------------------ brute force


def test_hand_made_tie_rule():
    # one query, positives {0, 1}: c0 ties the negatives c2, c3 at the top (positives first), c1 is last
    sim = torch.tensor([[2.0, 0.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False, False]])
    ap, rp = M.map_at_r(sim, mask)
    assert ap.tolist() == [0.5] and rp.tolist() == [0.5]  # positions 1 and 4: (1/2)(1/1), 1 of 2 in the top 2
    # R = 4 (two positives outside the gallery): P@1 = 1, item 4 positive with P@4 = 2/4
    ap, rp = M.map_at_r(sim, mask, num_relevant=[4])
    assert ap.item() == pytest.approx((1 + 0.5) / 4) and rp.item() == pytest.approx(0.5)
    # R = 6 > the gallery's 4 items: the missing positions are misses
    ap, rp = M.map_at_r(sim, mask, num_relevant=[6])
    assert ap.item() == pytest.approx((1 + 0.5) / 6) and rp.item() == pytest.approx(2 / 6)
    assert brute_ap_rp(sim[0].numpy(), {0, 1}, 6) == pytest.approx((1.5 / 6, 2 / 6))
    with pytest.raises(ValueError, match="Query row 0 has no positive"):
        M.map_at_r(sim, torch.zeros(1, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "num_images,num_texts,dim,chunk_size,quantised",
    [(1, 1, 3, 1, False), (5, 5, 4, 2, False), (13, 41, 8, 4, False), (37, 150, 16, 16, False),
     (29, 101, 3, 7, True), (40, 200, 2, 9, True), (6, 60, 2, 1024, True)],
)
def test_binary_map_at_r_matches_brute_force(num_images, num_texts, dim, chunk_size, quantised):
    rng = np.random.default_rng(num_images * 7 + num_texts)
    images, texts, ids = gallery(rng, num_images, num_texts, dim, quantised)
    sim = (torch.as_tensor(images) @ torch.as_tensor(texts).T).numpy()
    out = M.retrieval_metrics(images, texts, ids, chunk_size=chunk_size)
    assert_close(out, binary_reference(sim, ids))
    assert out["t2i_map_at_r"] == out["t2i_r_precision"] == pytest.approx(out["t2i_r1"])
    mask = ids[None, :] == np.arange(num_images)[:, None]
    ap, rp = M.map_at_r(sim, mask)
    assert 100 * ap.mean().item() == pytest.approx(out["i2t_map_at_r"], abs=1e-9)
    assert 100 * rp.mean().item() == pytest.approx(out["i2t_r_precision"], abs=1e-9)
    without = M.retrieval_metrics(images, texts, ids, chunk_size=chunk_size, precision_at_r=False)
    assert "i2t_map_at_r" not in without and without == {k: v for k, v in out.items() if k in without}


@pytest.mark.parametrize("quantised,outside,chunk_size", [(False, False, 5), (True, False, 3), (True, True, 64),
                                                          (False, True, 1)])
def test_extended_positives_match_brute_force(quantised, outside, chunk_size):
    rng = np.random.default_rng(11 + 2 * quantised + outside)
    images, texts, ids = gallery(rng, 17, 60, 3, quantised)
    sim = (torch.as_tensor(images) @ torch.as_tensor(texts).T).numpy()
    extended = random_extended(rng, sim, ids, outside=outside)
    plain = M.ExtendedPositives(i2t={0: [1, 2]}, prefix="other_")
    out = M.retrieval_metrics(images, texts, ids, chunk_size=chunk_size, extended_positives=[extended, plain])
    assert_close(out, extended_reference(sim, extended))
    assert_close(out, extended_reference(sim, plain))
    assert_close(out, binary_reference(sim, ids))  # the plain metrics do not change
    assert "other_t2i_map_at_r" not in out


def test_with_binary_positives_and_errors():
    ids = np.array([0, 0, 1, 2])
    e = M.with_binary_positives(M.ExtendedPositives(i2t={0: [2], 1: []}, t2i={3: [0]}), ids)
    assert e.i2t == {0: [0, 1, 2], 1: [2]} and e.t2i == {3: [2, 0]}
    images, texts = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[ids]
    cases = [
        (M.ExtendedPositives(i2t={5: [0]}), r"eccv_i2t: query row 5 is not a query"),
        (M.ExtendedPositives(t2i={0: [9]}), r"eccv_t2i: positive 9 of query 0 is not a gallery row"),
        (M.ExtendedPositives(i2t={1: []}), r"eccv_i2t: query row 1 has no positive"),
        (M.ExtendedPositives(i2t={1: [2]}, i2t_outside={2: 1}), r"query row 2 has positives outside"),
    ]
    for extended, message in cases:
        with pytest.raises(ValueError, match=message):
            M.retrieval_metrics(images, texts, ids, extended_positives=extended)


# ------------------------------------------------------------------------------------------------ eccv_caption


def eccv_scores(tmp_path, sim, extended, image_ids, caption_ids, pad_to=0):
    """eccv_caption.Metrics on rankings from `sim` (ties: positives first), ids renamed to COCO-like ints.

    Its GT is the extended positive sets, with positives outside the gallery as ids that no list holds. It indexes
    `ranked[r - 1]` for r <= R, so a list shorter than R is padded with never-positive ids (`pad_to`).
    """
    eccv_caption = pytest.importorskip("eccv_caption", reason="pip install eccv-caption (the `eccv` extra)")
    gts, retrieved = {}, {}
    for direction, mat, lists, outside, qid, gid in (
        ("i2t", sim, extended.i2t, extended.i2t_outside, image_ids, caption_ids),
        ("t2i", sim.T, extended.t2i, extended.t2i_outside, caption_ids, image_ids),
    ):
        gts[direction] = {
            int(qid[q]): [int(gid[c]) for c in set(items)] + [-(1000 * q + j + 1) for j in range(outside.get(q, 0))]
            for q, items in lists.items()
        }
        retrieved[direction] = {}
        for q in range(mat.shape[0]):
            order = [int(gid[c]) for c in ranked(mat[q], set(lists.get(q, ())))]
            retrieved[direction][int(qid[q])] = order + [10**9 + j for j in range(max(0, pad_to - len(order)))]
    (tmp_path / "i2t.json").write_text(json.dumps(gts["i2t"]))
    (tmp_path / "t2i.json").write_text(json.dumps(gts["t2i"]))
    metric = eccv_caption.Metrics()
    metric.set_eccv_gts(str(tmp_path / "i2t.json"), str(tmp_path / "t2i.json"))
    return metric.compute_all_metrics(
        retrieved["i2t"], retrieved["t2i"], target_metrics=("eccv_map_at_r", "eccv_rprecision", "eccv_r1"),
        verbose=False,
    )


def assert_agrees_with_eccv(ours, theirs, prefix="eccv_"):
    for direction in ("i2t", "t2i"):
        for our_key, their_key in (("map_at_r", "eccv_map_at_r"), ("r_precision", "eccv_rprecision"),
                                   ("r1", "eccv_r1")):
            got = ours[f"{prefix}{direction}_{our_key}"] / 100
            assert abs(got - float(theirs[their_key][direction])) <= 1e-6, (direction, our_key)


@pytest.mark.parametrize("case", ["distinct", "ties", "no_extended_positive"])
def test_agrees_with_eccv_caption(tmp_path, case):
    rng = np.random.default_rng({"distinct": 1, "ties": 2, "no_extended_positive": 3}[case])
    images, texts, ids = gallery(rng, 30, 150, 3 if case == "ties" else 16, quantised=case == "ties")
    sim = (torch.as_tensor(images) @ torch.as_tensor(texts).T).numpy()
    if case == "ties":
        assert len(np.unique(sim)) < sim.size / 10  # really tied
    extended = random_extended(rng, sim, ids, max_extra=1 if case == "no_extended_positive" else 6)
    if case == "no_extended_positive":  # listed queries whose list is only their binary positives
        assert sum(set(v) == set(np.flatnonzero(ids == q)) for q, v in extended.i2t.items()) >= 5
    image_ids = rng.permutation(100_000)[:30] + 1  # COCO-like image and caption ids
    caption_ids = rng.permutation(1_000_000)[:150] + 1
    theirs = eccv_scores(tmp_path, sim, extended, image_ids, caption_ids)
    ours = M.retrieval_metrics(images, texts, ids, chunk_size=7, extended_positives=extended)
    assert_agrees_with_eccv(ours, theirs)


def test_agrees_with_eccv_caption_when_r_exceeds_the_list(tmp_path):
    rng = np.random.default_rng(4)
    images, texts, ids = gallery(rng, 4, 6, 8, quantised=False)
    sim = (torch.as_tensor(images) @ torch.as_tensor(texts).T).numpy()
    # image 0: 3 positives in the gallery + 5 outside (R = 8 > 6 captions); caption 1: R = 2 + 3 > 4 images
    extended = M.ExtendedPositives(i2t={0: [0, 3, 5], 2: [2]}, t2i={1: [0, 2], 4: [1]},
                                   i2t_outside={0: 5}, t2i_outside={1: 3})
    image_ids, caption_ids = np.arange(4) + 7, np.arange(6) + 70
    with pytest.raises(IndexError):  # eccv_caption reads ranked[r - 1] for every r <= R
        eccv_scores(tmp_path, sim, extended, image_ids, caption_ids)
    theirs = eccv_scores(tmp_path, sim, extended, image_ids, caption_ids, pad_to=8)
    ours = M.retrieval_metrics(images, texts, ids, chunk_size=3, extended_positives=extended)
    assert_agrees_with_eccv(ours, theirs)
    assert_close(ours, extended_reference(sim, extended))


def test_eccv_caption_positives_from_the_package_ground_truth():
    eccv_caption = pytest.importorskip("eccv_caption", reason="pip install eccv-caption (the `eccv` extra)")
    from trainer_bcls.evaluation.extended_positives import eccv_caption_positives

    gts = eccv_caption.Metrics().eccv_gts
    queries = sorted(gts["i2t"])[:3]
    captions = [c for q in queries for c in gts["i2t"][q][:2]] + [1, 2, 3]  # 1..3: COCO ids of no ECCV positive
    image_keys = [str(q) for q in queries] + ["not_a_coco_id"]
    extended = eccv_caption_positives(image_keys, [str(c) for c in captions])
    assert sorted(extended.i2t) == [0, 1, 2]
    for row, q in enumerate(queries):
        assert [captions[c] for c in extended.i2t[row]] == gts["i2t"][q][:2]
        assert extended.i2t_outside[row] == len(set(gts["i2t"][q])) - 2  # the rest count in R
    assert extended.prefix == "eccv_"
    with pytest.raises(ValueError, match="none of ECCV Caption's queries is in this split.*dataset_coco.json"):
        eccv_caption_positives(["a.png"], ["a.png#0"])
