"""Losses of BCLS against brute-force Python-loop references written from the spec, plus gradchecks and limits."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from modeling_bcls.losses import loss_kendall
from modeling_bcls.losses import (
    bcls_loss,
    infonce_loss,
    kendall_ranking_loss,
    relevance_sort_order,
    triplet_sn_loss,
    vse_triplet_loss,
)


# ----------------------------------------------------------------------------------------------------------------
# Brute-force references (plain loops over Python floats / 0-d tensors, following the spec word by word)
# ----------------------------------------------------------------------------------------------------------------


def ref_triplet_sn(S, P, margin, tau):
    terms = []
    for q in range(S.shape[0]):
        negatives = [n for n in range(S.shape[1]) if not P[q, n]]
        if not negatives:
            continue
        for p in range(S.shape[1]):
            if P[q, p]:
                hinges = [margin + float(S[q, n]) - float(S[q, p]) for n in negatives]
                terms.append(tau * math.log1p(sum(math.exp(h / tau) for h in hinges)))
    return terms


def ref_vse(S, P, margin):
    terms = []
    for q in range(S.shape[0]):
        negatives = [n for n in range(S.shape[1]) if not P[q, n]]
        if not negatives:
            continue
        for p in range(S.shape[1]):
            if P[q, p]:
                terms.append(max(0.0, max(margin + float(S[q, n]) - float(S[q, p]) for n in negatives)))
    return terms


def ref_infonce(S, P, T):
    terms = []
    for q in range(S.shape[0]):
        negatives = [n for n in range(S.shape[1]) if not P[q, n]]
        if not negatives:
            continue
        for p in range(S.shape[1]):
            if P[q, p]:
                pos = math.exp(float(S[q, p]) / T)
                terms.append(-math.log(pos / (pos + sum(math.exp(float(S[q, n]) / T) for n in negatives))))
    return terms


def ref_kendall(S, R, window_size, gap, surrogate, T, hard_mining):
    """Spec steps 1-5. Label differences are evaluated as tensors in R's dtype, like the all-pairs formula."""

    def phi(d):
        return max(d, 0.0) if surrogate == "hinge" else T * math.log1p(math.exp(d / T))

    terms = []
    for q in range(S.shape[0]):
        pi = sorted(range(S.shape[1]), key=lambda j: (-float(R[q, j]), j))  # descending, stable on ties
        for a in range(len(pi)):
            window = [b for b in range(a + 1, len(pi)) if bool(R[q, pi[a]] - R[q, pi[b]] > gap)]
            if window_size is not None:
                window = window[:window_size]
            ds = [float(S[q, pi[b]]) - float(S[q, pi[a]]) for b in window]
            if not ds:
                continue
            if hard_mining:
                terms.append(phi(max(ds)))
            else:
                terms.extend(phi(d) for d in ds)
    return terms


def mean(terms):
    return sum(terms) / len(terms) if terms else 0.0


def all_pairs_formula(S, R, gap):
    concordant = (R[:, :, None] - R[:, None, :]) > gap  # [q, j, k]: R_qj - R_qk > g
    hinge = (S[:, None, :] - S[:, :, None]).clamp_min(0)  # max(S_qk - S_qj, 0)
    return (concordant * hinge).sum() / concordant.sum()


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [(5, 5), (6, 9), (8, 4)]


def make_batch(nq, nc, seed, dtype=torch.float32, tied_relevance=False):
    """Random sim, a multi-positive mask (images repeat, Nq != Nc allowed) and relevance (1 on positives)."""
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(nq, nc, generator=g, dtype=torch.float64).mul(2).sub(1).to(dtype)
    image_of_query = torch.randint(0, max(2, nq // 2), (nq,), generator=g)
    image_of_candidate = torch.randint(0, max(2, nq // 2), (nc,), generator=g)
    mask = image_of_query[:, None] == image_of_candidate[None, :]
    if tied_relevance:
        relevance = torch.randint(0, 5, (nq, nc), generator=g).to(dtype) / 4  # many ties
    else:
        relevance = torch.rand(nq, nc, generator=g, dtype=torch.float64).to(dtype)
    relevance[mask] = 1.0
    return sim, mask, relevance


# ----------------------------------------------------------------------------------------------------------------
# Binary losses
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_binary_losses_match_reference(shape, seed):
    sim, mask, _ = make_batch(*shape, seed)
    assert mask.any(), "test batch must have positives"
    for margin, tau in [(0.2, 0.05), (0.5, 0.7)]:
        ref = ref_triplet_sn(sim, mask, margin, tau)
        got = triplet_sn_loss(sim, mask, margin=margin, temperature=tau, reduction="none")
        torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(triplet_sn_loss(sim, mask, margin, tau).item(), mean(ref), rtol=1e-5, atol=1e-6)
        ref = ref_vse(sim, mask, margin)
        torch.testing.assert_close(vse_triplet_loss(sim, mask, margin).item(), mean(ref), rtol=1e-5, atol=1e-6)
        ref = ref_infonce(sim, mask, tau)
        torch.testing.assert_close(infonce_loss(sim, mask, tau).item(), mean(ref), rtol=1e-5, atol=1e-5)


def test_rows_without_negatives_are_not_counted():
    sim, _, _ = make_batch(4, 5, seed=3)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0] = True  # row 0: positives only
    mask[1, 1] = mask[2, 2] = mask[3, 0] = mask[3, 3] = True
    for loss, ref in [
        (triplet_sn_loss(sim, mask, 0.2, 0.05, reduction="none"), ref_triplet_sn(sim, mask, 0.2, 0.05)),
        (vse_triplet_loss(sim, mask, 0.2, reduction="none"), ref_vse(sim, mask, 0.2)),
        (infonce_loss(sim, mask, 0.05, reduction="none"), ref_infonce(sim, mask, 0.05)),
    ]:
        assert len(ref) == 4 and loss.numel() == 4
        torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_triplet_sn_tends_to_vse_max_violation():
    sim, mask, _ = make_batch(16, 24, seed=4)
    tau = 1e-4
    sim = sim.clone().requires_grad_()
    sn = triplet_sn_loss(sim, mask, margin=0.2, temperature=tau, reduction="none")
    vse = vse_triplet_loss(sim, mask, margin=0.2, reduction="none")
    assert torch.isfinite(sn).all()
    # 0 <= l_SN - [max h]_+ <= tau * log(1 + #negatives)
    assert (sn - vse).min() >= -1e-6
    assert (sn - vse).max() <= tau * math.log(1 + 24) + 1e-6
    sn.sum().backward()
    assert torch.isfinite(sim.grad).all()
    # and it is not the same thing at a usual temperature
    assert (triplet_sn_loss(sim, mask, 0.2, 0.05) - vse_triplet_loss(sim, mask, 0.2)).abs() > 1e-3


def test_triplet_sn_no_overflow_with_large_violations():
    sim = torch.tensor([[-1.0, 1.0, 1.0], [1.0, -1.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, False, False], [False, True, False]])
    loss = triplet_sn_loss(sim, mask, margin=0.2, temperature=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sim.grad).all()
    torch.testing.assert_close(loss.item(), 2.2 + 1e-4 * math.log(2), rtol=1e-5, atol=1e-5)


def test_infonce_single_positive_is_clip_cross_entropy():
    sim, _, _ = make_batch(7, 7, seed=5)
    T = 0.07
    eye = torch.eye(7, dtype=torch.bool)
    expected = F.cross_entropy(sim / T, torch.arange(7))
    torch.testing.assert_close(infonce_loss(sim, eye, T), expected)
    expected_t2i = F.cross_entropy(sim.T / T, torch.arange(7))
    out = bcls_loss(sim, eye, objective="infonce", infonce_temperature=T)
    torch.testing.assert_close(out["loss"], (expected + expected_t2i) / 2)


# ----------------------------------------------------------------------------------------------------------------
# Kendall SW-HS
# ----------------------------------------------------------------------------------------------------------------

KENDALL_CASES = [
    (window, gap, surrogate, hard)
    for window in (None, 1, 3)
    for gap in (0.0, 0.25, 0.3)
    for surrogate in ("hinge", "logistic")
    for hard in (True, False)
]


@pytest.mark.parametrize("shape,tied", [((5, 5), True), ((6, 9), False), ((8, 4), True)])
def test_kendall_matches_reference(shape, tied):
    sim, _, relevance = make_batch(*shape, seed=sum(shape), tied_relevance=tied)
    for window, gap, surrogate, hard in KENDALL_CASES:
        kwargs = dict(window_size=window, label_gap=gap, surrogate=surrogate, temperature=0.2, hard_mining=hard)
        ref = ref_kendall(sim, relevance, window, gap, surrogate, 0.2, hard)
        got = kendall_ranking_loss(sim, relevance, reduction="none", **kwargs)
        torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6, msg=str(kwargs))
        got = kendall_ranking_loss(sim, relevance, **kwargs)
        torch.testing.assert_close(got.item(), mean(ref), rtol=1e-5, atol=1e-6, msg=str(kwargs))


@pytest.mark.parametrize("tied", [False, True])
def test_kendall_wider_windows_match_reference(tied):
    """Windows 2, 5, 8 (power-of-two and overlapping sliding maxima) on rows longer than the windows."""
    sim, _, relevance = make_batch(6, 24, seed=53, tied_relevance=tied)
    for window in (2, 5, 8):
        for hard in (True, False):
            ref = ref_kendall(sim, relevance, window, 0.05, "hinge", 0.1, hard)
            got = kendall_ranking_loss(sim, relevance, window_size=window, label_gap=0.05, hard_mining=hard, reduction="none")
            torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [0.0, 0.05, 0.25])
def test_kendall_all_pairs_limit(dtype, gap):
    sim, _, relevance = make_batch(20, 30, seed=7, dtype=dtype, tied_relevance=True)
    relevance[:, ::3] = torch.rand(20, 10, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = kendall_ranking_loss(sim, relevance, window_size=None, label_gap=gap, hard_mining=False)
    expected = all_pairs_formula(sim, relevance, gap)
    assert abs(got.item() - expected.item()) <= 1e-6


def test_kendall_label_gap_rounding_follows_the_spec_test():
    """On a decimal grid, ``R_b < R_a - g`` and ``R_a - R_b > g`` disagree in float32 for some pairs; the loss must
    use the latter (the spec's) everywhere."""
    grid = torch.arange(0, 21, dtype=torch.float32) / 20  # 0, 0.05, ..., 1
    gap = 0.15
    a, b = grid[:, None], grid[None, :]
    disagree = ((a - b) > gap) != (b < a - gap)
    assert disagree.any(), "the grid must contain a rounding disagreement for this test to mean something"
    g = torch.Generator().manual_seed(0)
    relevance = grid[torch.randint(0, 21, (6, 40), generator=g)]
    sim = torch.rand(6, 40, generator=g)
    for window, hard in [(None, False), (2, True), (2, False), (None, True)]:
        ref = ref_kendall(sim, relevance, window, gap, "hinge", 0.1, hard)
        got = kendall_ranking_loss(sim, relevance, window_size=window, label_gap=gap, hard_mining=hard, reduction="none")
        torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    expected = all_pairs_formula(sim, relevance, gap)
    got = kendall_ranking_loss(sim, relevance, window_size=None, label_gap=gap, hard_mining=False)
    assert abs(got.item() - expected.item()) <= 1e-6


def test_kendall_window_start_matches_exact_test():
    grid = torch.arange(0, 101, dtype=torch.float32) / 100
    relevance = grid[torch.randperm(101, generator=torch.Generator().manual_seed(0))].repeat(3, 1)
    for gap in (0.0, 0.01, 0.07, 0.1, 0.3):
        sorted_rel, _ = loss_kendall._sorted_relevance(relevance, None)
        start = loss_kendall._window_start(sorted_rel, gap)
        in_gap = (sorted_rel[:, :, None] - sorted_rel[:, None, :]) > gap  # [q, a, b]: R_a - R_b > g
        expected = torch.where(in_gap.any(-1), in_gap.int().argmax(-1), 101)
        assert torch.equal(start, expected), gap


def test_kendall_sort_order_passed_equals_computed():
    sim, _, relevance = make_batch(6, 9, seed=11, tied_relevance=True)
    order = relevance_sort_order(relevance)
    assert torch.equal(order, torch.sort(relevance, dim=1, descending=True, stable=True).indices)
    for hard in (True, False):
        a = kendall_ranking_loss(sim, relevance, window_size=3, label_gap=0.1, hard_mining=hard)
        b = kendall_ranking_loss(sim, relevance, window_size=3, label_gap=0.1, hard_mining=hard, sort_order=order)
        assert torch.equal(a, b)
    bad = order.clone()
    bad[2, [0, -1]] = bad[2, [-1, 0]]
    with pytest.raises(ValueError, match="row 2"):
        kendall_ranking_loss(sim, relevance, sort_order=bad)
    with pytest.raises(ValueError, match="outside"):
        kendall_ranking_loss(sim, relevance, sort_order=order + 1)


# The CPU paths of the Kendall loss: compiled kernels (Numba, the default), NumPy sort without them, pure torch.
PATHS = ("kernels", "numpy", "torch")


def use_path(monkeypatch, path: str) -> None:
    if path != "kernels":
        monkeypatch.setattr(loss_kendall, "get_kernels", lambda: None)
    if path == "numpy":
        monkeypatch.setattr(loss_kendall, "_NUMPY_SORT_MIN_ELEMENTS", 0)
    if path == "torch":
        monkeypatch.setattr(loss_kendall, "_numpy", lambda: None)


def test_kernels_are_available_in_the_test_environment():
    """numba is an install dependency: the default CPU path must be the compiled one (else it would go untested)."""
    assert loss_kendall.get_kernels() is not None


@pytest.mark.parametrize("path", PATHS)
def test_relevance_sort_order_every_path_equals_torch_sort(monkeypatch, path):
    g = torch.Generator().manual_seed(0)
    relevance = torch.randint(-3, 4, (40, 60), generator=g).float() / 3  # ties and negatives
    relevance[0, :5], relevance[0, 5:10] = -0.0, 0.0  # -0.0 == 0.0 is a tie
    relevance[1] = torch.randn(60, generator=g) * 1e30
    relevance[2, ::2] = torch.finfo(torch.float32).tiny / 4  # subnormals
    relevance[3, ::3] = -torch.finfo(torch.float32).tiny / 4
    relevance[4] = torch.rand(60, generator=g) * 1e-3 + 0.5  # a high byte shared by the row: a skipped radix digit
    sim = torch.rand(40, 60, generator=g)
    expected_loss = kendall_ranking_loss(sim, relevance, window_size=3, label_gap=0.1)
    use_path(monkeypatch, path)
    for threaded in (False, True):
        monkeypatch.setattr(loss_kendall, "_THREADED_SORT_MIN_ELEMENTS", 0 if threaded else 1 << 40)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
        for r in (relevance, relevance.T, relevance.abs(), torch.rand(3, 1000, generator=g)):
            assert torch.equal(relevance_sort_order(r), torch.sort(r, dim=1, descending=True, stable=True).indices)
    assert torch.equal(kendall_ranking_loss(sim, relevance, window_size=3, label_gap=0.1), expected_loss)


def test_kendall_blocks_match_single_block(monkeypatch):
    sim, _, relevance = make_batch(5, 12, seed=13, tied_relevance=True)
    sim.requires_grad_()
    results = []
    for block in (1 << 22, 7, 30):  # one block, anchor blocks within a row, several rows per block
        monkeypatch.setattr(loss_kendall, "_BLOCK_ELEMENTS", block)
        for window in (None, 4):
            sim.grad = None
            loss = kendall_ranking_loss(sim, relevance, window_size=window, label_gap=0.1, hard_mining=False, surrogate="logistic")
            loss.backward()
            terms = kendall_ranking_loss(sim, relevance, window_size=window, label_gap=0.1, hard_mining=False, reduction="none")
            results.append((block, window, loss.detach(), sim.grad.clone(), terms.detach()))
    for block, window, loss, grad, terms in results:
        _, _, loss0, grad0, terms0 = next(r for r in results if r[1] == window)
        torch.testing.assert_close(loss, loss0)
        torch.testing.assert_close(grad, grad0)
        torch.testing.assert_close(terms, terms0)


def test_kendall_empty_windows_give_finite_zero_with_grad():
    sim = torch.randn(4, 6, requires_grad=True)
    for relevance, gap in [(torch.full((4, 6), 0.5), 0.0), (torch.rand(4, 6) * 0.1, 0.5)]:
        for hard in (True, False):
            loss = kendall_ranking_loss(sim, relevance, window_size=3, label_gap=gap, hard_mining=hard)
            assert loss.item() == 0.0 and loss.grad_fn is not None
            loss.backward()
            assert torch.isfinite(sim.grad).all() and (sim.grad == 0).all()
            sim.grad = None
            assert kendall_ranking_loss(sim, relevance, label_gap=gap, hard_mining=hard, reduction="none").numel() == 0


def test_no_negative_batch_gives_finite_zero():
    sim = torch.randn(3, 3, requires_grad=True)
    mask = torch.ones(3, 3, dtype=torch.bool)  # every caption is of the same image
    relevance = torch.ones(3, 3)
    for objective in ("bcls", "triplet_sn", "vse", "infonce"):
        out = bcls_loss(sim, mask, relevance, objective=objective)
        assert all(torch.isfinite(v) and v.item() == 0.0 for v in out.values())
        out["loss"].backward()
        assert torch.isfinite(sim.grad).all() and (sim.grad == 0).all()
        sim.grad = None


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------


def test_gradcheck_binary_losses():
    sim, mask, _ = make_batch(4, 6, seed=17, dtype=torch.float64)
    sim.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: triplet_sn_loss(s, mask, 0.2, 0.1), (sim,))
    assert torch.autograd.gradcheck(lambda s: vse_triplet_loss(s, mask, 0.2), (sim,))
    assert torch.autograd.gradcheck(lambda s: infonce_loss(s, mask, 0.1), (sim,))
    assert torch.autograd.gradcheck(lambda s: bcls_loss(s, mask, objective="triplet_sn")["loss"], (sim,))


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("surrogate", ["hinge", "logistic"])
def test_gradcheck_kendall(window, hard, surrogate):
    sim, _, relevance = make_batch(4, 7, seed=19, dtype=torch.float64)
    sim.requires_grad_()

    def fn(s):
        return kendall_ranking_loss(
            s, relevance, window_size=window, label_gap=0.05, surrogate=surrogate, temperature=0.3, hard_mining=hard
        )

    assert torch.autograd.gradcheck(fn, (sim,))


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_kendall_float32_argmax_encoding_matches_float64(window):
    """float32 hard mining carries the argmax in the low bits of a float64 copy; it must give the float64 result."""
    sim, _, relevance = make_batch(9, 13, seed=47, dtype=torch.float64)
    sim = sim.float().double()  # representable in float32
    grads = []
    for dtype in (torch.float64, torch.float32):
        s = sim.detach().to(dtype).requires_grad_()
        for surrogate in ("hinge", "logistic"):
            loss = kendall_ranking_loss(s, relevance.to(dtype), window_size=window, label_gap=0.05, surrogate=surrogate)
            loss.backward()
        grads.append((loss.double(), s.grad.double()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_kendall_hard_mining_float32_is_exact():
    """float32 hard-mined terms are exactly max(S_b - S_a, 0) of the hardest pair, and near-ties (1 ulp apart) in a
    window send the gradient to the truly larger similarity."""
    sim, _, relevance = make_batch(7, 30, seed=59)
    sim = sim * 0.9 + 0.05  # values with full mantissas
    for window in (None, 3, 8):
        got = kendall_ranking_loss(sim, relevance, window_size=window, label_gap=0.05, reduction="none")
        expected = []
        for q in range(sim.shape[0]):
            pi = sorted(range(sim.shape[1]), key=lambda j: (-float(relevance[q, j]), j))
            for a in range(len(pi)):
                win = [b for b in range(a + 1, len(pi)) if bool(relevance[q, pi[a]] - relevance[q, pi[b]] > 0.05)]
                win = win[:window] if window is not None else win
                if win:
                    best = max(sim[q, pi[b]] for b in win)  # float32 0-d tensors
                    expected.append((best - sim[q, pi[a]]).clamp_min(0))
        assert torch.equal(got, torch.stack(expected)), window
    x = torch.tensor(0.3)
    above = torch.nextafter(x, torch.tensor(1.0))
    row = torch.stack([torch.tensor(0.0), x, above, x]).unsqueeze(0).requires_grad_()
    rel = torch.tensor([[1.0, 0.5, 0.4, 0.3]])
    kendall_ranking_loss(row, rel, window_size=3, reduction="sum").backward()
    # anchors 0 and 1 both pick the 1-ulp-larger column 2; anchor 2's only partner (column 3) is below it
    assert row.grad.tolist() == [[-1.0, -1.0, 2.0, 0.0]]


def test_gradcheck_bcls_total():
    sim, mask, relevance = make_batch(5, 6, seed=23, dtype=torch.float64)
    sim.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: bcls_loss(s, mask, relevance, kendall_window_size=3)["loss"], (sim,))


# ----------------------------------------------------------------------------------------------------------------
# Reductions, BCLS total, validation
# ----------------------------------------------------------------------------------------------------------------


def test_reductions_are_consistent():
    sim, mask, relevance = make_batch(6, 9, seed=29)
    losses = [
        lambda r: triplet_sn_loss(sim, mask, reduction=r),
        lambda r: vse_triplet_loss(sim, mask, reduction=r),
        lambda r: infonce_loss(sim, mask, reduction=r),
        lambda r: kendall_ranking_loss(sim, relevance, window_size=3, label_gap=0.05, reduction=r),
        lambda r: kendall_ranking_loss(sim, relevance, label_gap=0.05, hard_mining=False, reduction=r),
    ]
    for fn in losses:
        terms = fn("none")
        assert terms.dim() == 1 and terms.numel() > 0
        torch.testing.assert_close(fn("sum"), terms.sum())
        torch.testing.assert_close(fn("mean"), terms.sum() / terms.numel())
    with pytest.raises(ValueError, match="reduction"):
        triplet_sn_loss(sim, mask, reduction="max")


def test_bcls_loss_combines_directions_and_objectives():
    sim, mask, relevance = make_batch(6, 9, seed=31)
    hp = dict(margin=0.3, soft_negative_temperature=0.1, kendall_weight=0.5, kendall_window_size=3,
              kendall_label_gap=0.05, kendall_surrogate="logistic", kendall_temperature=0.2, kendall_hard_mining=True)
    out = bcls_loss(sim, mask, relevance, **hp)
    triplet = (triplet_sn_loss(sim, mask, 0.3, 0.1) + triplet_sn_loss(sim.T, mask.T, 0.3, 0.1)) / 2
    kendall_kw = dict(window_size=3, label_gap=0.05, surrogate="logistic", temperature=0.2)
    kendall = (kendall_ranking_loss(sim, relevance, **kendall_kw) + kendall_ranking_loss(sim.T, relevance.T, **kendall_kw)) / 2
    torch.testing.assert_close(out["triplet"], triplet)
    torch.testing.assert_close(out["kendall"], kendall)
    torch.testing.assert_close(out["loss"], triplet + 0.5 * kendall)
    # explicit t2i matrices and precomputed sort orders give the same result
    explicit = bcls_loss(sim, mask, relevance, sim_t2i=sim.T.contiguous(), positive_mask_t2i=mask.T.contiguous(),
                         relevance_t2i=relevance.T.contiguous(), sort_order_i2t=relevance_sort_order(relevance),
                         sort_order_t2i=relevance_sort_order(relevance.T), **hp)
    for key in out:
        torch.testing.assert_close(explicit[key], out[key])
    # Triplet-SN alone
    for alone in (bcls_loss(sim, mask, None, **hp), bcls_loss(sim, mask, relevance, **{**hp, "kendall_weight": 0}),
                  bcls_loss(sim, mask, relevance, objective="triplet_sn", **hp)):
        torch.testing.assert_close(alone["loss"], triplet)
        assert alone["kendall"].item() == 0.0
    # baselines behind the same signature
    vse = bcls_loss(sim, mask, relevance, objective="vse", **hp)
    torch.testing.assert_close(vse["loss"], (vse_triplet_loss(sim, mask, 0.3) + vse_triplet_loss(sim.T, mask.T, 0.3)) / 2)
    nce = bcls_loss(sim, mask, relevance, objective="infonce", infonce_temperature=0.07)
    torch.testing.assert_close(nce["loss"], (infonce_loss(sim, mask, 0.07) + infonce_loss(sim.T, mask.T, 0.07)) / 2)
    with pytest.raises(ValueError, match="objective"):
        bcls_loss(sim, mask, relevance, objective="clip")


@pytest.mark.parametrize("binary_loss", ["triplet_sn", "vse", "infonce"])
@pytest.mark.parametrize("kendall_weight", [0.0, 0.7])
def test_every_binary_loss_composes_with_kendall(binary_loss, kendall_weight):
    """binary_loss x Kendall weight equals the brute-force references, both directions averaged."""
    sim, mask, relevance = make_batch(5, 8, seed=43, dtype=torch.float64)
    hp = dict(margin=0.25, soft_negative_temperature=0.1, infonce_temperature=0.07, kendall_window_size=3,
              kendall_label_gap=0.05, kendall_surrogate="hinge", kendall_hard_mining=True)
    out = bcls_loss(sim, mask, relevance, binary_loss=binary_loss, kendall_weight=kendall_weight, **hp)
    ref_binary = {
        "triplet_sn": lambda S, P: ref_triplet_sn(S, P, 0.25, 0.1),
        "vse": lambda S, P: ref_vse(S, P, 0.25),
        "infonce": lambda S, P: ref_infonce(S, P, 0.07),
    }[binary_loss]
    binary = (mean(ref_binary(sim, mask)) + mean(ref_binary(sim.T, mask.T))) / 2
    kendall = (mean(ref_kendall(sim, relevance, 3, 0.05, "hinge", 0.1, True))
               + mean(ref_kendall(sim.T, relevance.T, 3, 0.05, "hinge", 0.1, True))) / 2
    assert out["triplet"].item() == pytest.approx(binary, abs=1e-10)
    assert out["kendall"].item() == pytest.approx(kendall if kendall_weight else 0.0, abs=1e-10)
    assert out["loss"].item() == pytest.approx(binary + kendall_weight * kendall, abs=1e-10)
    sim.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: bcls_loss(s, mask, relevance, binary_loss=binary_loss, kendall_weight=kendall_weight, **hp)["loss"],
        (sim,),
    )


def test_legacy_objective_names_map_onto_binary_loss_and_kendall_weight():
    sim, mask, relevance = make_batch(5, 7, seed=47)
    for objective, binary_loss, weight in [("bcls", "triplet_sn", 0.3), ("triplet_sn", "triplet_sn", 0.0),
                                           ("vse", "vse", 0.0), ("infonce", "infonce", 0.0)]:
        legacy = bcls_loss(sim, mask, relevance, objective=objective, kendall_weight=0.3)
        new = bcls_loss(sim, mask, relevance, binary_loss=binary_loss, kendall_weight=weight)
        for key in new:
            torch.testing.assert_close(legacy[key], new[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="binary_loss"):
        bcls_loss(sim, mask, relevance, binary_loss="bcls")


def test_infonce_learned_temperature_tensor():
    """A 0-d tensor temperature gives the fixed-temperature value and receives a gradient (CLIP's logit scale)."""
    sim, mask, relevance = make_batch(4, 6, seed=53)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = bcls_loss(sim, mask, relevance, binary_loss="infonce", kendall_weight=0.5,
                    infonce_temperature=1 / log_scale.exp())
    fixed = bcls_loss(sim, mask, relevance, binary_loss="infonce", kendall_weight=0.5,
                      infonce_temperature=1 / math.exp(math.log(1 / 0.07)))
    torch.testing.assert_close(out["loss"], fixed["loss"])
    out["loss"].backward()
    assert log_scale.grad is not None and log_scale.grad.item() != 0.0
    with pytest.raises(ValueError, match="infonce_temperature"):
        bcls_loss(sim, mask, binary_loss="infonce", infonce_temperature=torch.tensor(-1.0))


def test_bcls_loss_count_reducer():
    sim, mask, relevance = make_batch(6, 9, seed=37)
    seen = []

    def doubled(count):
        seen.append(count.item())
        return count * 2

    out = bcls_loss(sim, mask, relevance, count_reducer=doubled)
    ref = bcls_loss(sim, mask, relevance)
    assert len(seen) == 4  # two directions x (binary, kendall)
    assert seen[0] == triplet_sn_loss(sim, mask, reduction="none").numel()
    for key in out:
        torch.testing.assert_close(out[key], ref[key] / 2)


def test_bcls_loss_keyword_names_match_the_config_contract():
    params = inspect.signature(bcls_loss).parameters
    expected = {
        "binary_loss": "triplet_sn", "objective": None, "margin": 0.2, "soft_negative_temperature": 0.1, "kendall_weight": 0.2,
        "kendall_window_size": 32, "kendall_label_gap": 0.15, "kendall_surrogate": "hinge", "kendall_temperature": 0.1,
        "kendall_hard_mining": True, "infonce_temperature": 0.05, "false_negative_threshold": None,
        "false_negative_ramp": 0.0, "sort_order_i2t": None, "sort_order_t2i": None,
        "sim_t2i": None, "positive_mask_t2i": None, "relevance_t2i": None, "count_reducer": None,
    }
    assert list(params)[:3] == ["sim", "positive_mask", "relevance"]
    assert {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} == expected


def test_bad_inputs_raise_named_errors():
    sim, mask, relevance = make_batch(4, 5, seed=41)
    nan_sim = sim.clone()
    nan_sim[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"`sim`.*row 1, column 2"):
        triplet_sn_loss(nan_sim, mask)
    nan_rel = relevance.clone()
    nan_rel[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`relevance`.*row 3, column 0"):
        kendall_ranking_loss(sim, nan_rel)
    with pytest.raises(ValueError, match="relevance"):
        bcls_loss(sim, mask, nan_rel)
    with pytest.raises(ValueError, match="positive_mask"):
        vse_triplet_loss(sim, mask[:, :4])
    with pytest.raises(ValueError, match="window_size"):
        kendall_ranking_loss(sim, relevance, window_size=0)
    with pytest.raises(ValueError, match="label_gap"):
        kendall_ranking_loss(sim, relevance, label_gap=-0.1)
    with pytest.raises(ValueError, match="surrogate"):
        kendall_ranking_loss(sim, relevance, surrogate="exp")
    with pytest.raises(ValueError, match="temperature"):
        triplet_sn_loss(sim, mask, temperature=0)


def test_half_precision_and_empty_inputs():
    sim, mask, relevance = make_batch(6, 9, seed=43)
    out = bcls_loss(sim.half(), mask, relevance.half())
    ref = bcls_loss(sim.half().float(), mask, relevance.half().float())
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref["loss"])
    empty = torch.zeros(0, 4, requires_grad=True)
    for value in (triplet_sn_loss(empty, torch.zeros(0, 4, dtype=torch.bool)),
                  kendall_ranking_loss(empty, torch.zeros(0, 4))):
        assert value.item() == 0.0


def _window_start_reference(sorted_rel, gap):
    in_gap = (sorted_rel[:, :, None] - sorted_rel[:, None, :]) > gap  # [q, a, b]: R_a - R_b > g (a suffix in b)
    return torch.where(in_gap.any(-1), in_gap.int().argmax(-1), sorted_rel.shape[1])


def _window_start_inputs():
    g = torch.Generator().manual_seed(61)
    grid = torch.randint(0, 21, (12, 50), generator=g).float() / 20  # decimal grid: rounding at the gap boundary
    grid[0] = 0.35  # a row of equal labels: every window is empty
    grid[1, :25] = 0.05  # two tie groups exactly one grid step apart
    grid[1, 25:] = 0.0
    signed = torch.randn(12, 50, generator=g)
    signed[:, ::4] = 0.0
    signed[:, 1::8] = -0.0
    return [grid, grid.T.contiguous(), -grid, signed, torch.rand(9, 37, generator=g).double()]


@pytest.mark.parametrize("gap", [0.0, 0.05, 0.15, 0.3, 2.0])
@pytest.mark.parametrize("path", PATHS)
def test_kendall_window_start_every_path_matches_exact_test(monkeypatch, path, gap):
    """The two-pointer kernel, the torch tie-group (g = 0) and searchsorted (g > 0) paths, and the fused label pass
    (sort + starts, or a given order checked + starts) all give the spec's window start, including equal-label rows,
    ties across the boundary, -0.0 and float64."""
    use_path(monkeypatch, path)
    for relevance in _window_start_inputs():
        sorted_rel, order = loss_kendall._sorted_relevance(relevance, None)
        expected = _window_start_reference(sorted_rel, gap)
        start = loss_kendall._window_start(sorted_rel, gap)
        assert start.dtype == torch.long
        assert torch.equal(start, expected), relevance.dtype
        for given in (None, order):
            fused_order, fused_start = loss_kendall._label_windows(relevance, given, gap)
            assert torch.equal(fused_order, order) and torch.equal(fused_start.long(), expected)
    assert torch.equal(loss_kendall._window_start(torch.full((3, 40), 0.5), gap), torch.full((3, 40), 40))


@pytest.mark.parametrize("surrogate", ["hinge", "logistic"])
def test_kendall_every_path_gives_the_same_losses_and_grads(monkeypatch, surrogate):
    """Kernels, NumPy and torch paths: the same losses and gradients (the kernels sum gradients in another order and
    evaluate softplus their own way, so those are compared to float32 rounding), bounded and unbounded windows,
    every gap, both directions."""
    sim, _, relevance = make_batch(40, 56, seed=67, tied_relevance=True)
    relevance[:, ::5] = torch.rand(40, 12, generator=torch.Generator().manual_seed(2))
    results = {}
    for path in PATHS:
        with monkeypatch.context() as patch:
            use_path(patch, path)
            for gap in (0.0, 0.05, 0.25):
                for window in (None, 1, 3, 5, 8, 32):
                    s = sim.clone().requires_grad_()
                    out = bcls_loss(s, torch.eye(40, 56, dtype=torch.bool), relevance, kendall_window_size=window,
                                    kendall_label_gap=gap, kendall_surrogate=surrogate)
                    out["kendall"].backward()
                    results[path, gap, window] = (out["kendall"].detach(), s.grad)
    assert results["torch", 0.05, 8][0] > 0
    for (path, gap, window), (loss, grad) in results.items():
        ref_loss, ref_grad = results["torch", gap, window]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7, msg=f"{path} {gap} {window}")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7, msg=f"{path} {gap} {window}")
        if surrogate == "hinge" and path == "numpy":
            assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_kendall_large_batch_takes_the_kernels_and_matches_reference(monkeypatch):
    """At a benchmark-like size the compiled kernels are taken by default and equal the brute-force window starts."""
    g = torch.Generator().manual_seed(71)
    relevance = torch.rand(160, 160, generator=g)
    relevance[torch.rand(160, 160, generator=g) < 0.02] = 1.0
    calls = []
    original = loss_kendall.get_kernels
    monkeypatch.setattr(loss_kendall, "get_kernels", lambda: calls.append(1) or original())
    for rel in (relevance, relevance.T):
        sorted_rel, order = loss_kendall._sorted_relevance(rel, None)
        for gap in (0.0, 0.05):
            calls.clear()
            got_order, start = loss_kendall._label_windows(rel, None, gap)
            assert calls, "the kernels must be taken at this size"
            assert start.dtype == torch.int32 and torch.equal(got_order, order)
            assert torch.equal(start.long(), _window_start_reference(sorted_rel, gap))


def test_kendall_without_numba_falls_back_to_torch(tmp_path):
    """numba blocked at import (as in a remote-code environment without it): the same loss, from the torch path."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "numba":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, sys.argv[1])
        import torch
        from modeling_bcls.losses import loss_kendall
        from modeling_bcls.losses import kendall_ranking_loss
        g = torch.Generator().manual_seed(0)
        sim, rel = torch.rand(30, 40, generator=g), torch.rand(30, 40, generator=g)
        assert loss_kendall.get_kernels() is None
        print(repr(kendall_ranking_loss(sim, rel, window_size=4, label_gap=0.05).item()))
        """
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, check=True).stdout
    g = torch.Generator().manual_seed(0)
    sim, rel = torch.rand(30, 40, generator=g), torch.rand(30, 40, generator=g)
    assert float(out.strip()) == kendall_ranking_loss(sim, rel, window_size=4, label_gap=0.05).item()
