"""The fused hard-mining kernel (order check + window starts + hardest pairs + row sums + gradient pattern in one pass
per row) against the unfused path (label pass, then the hardest-pair kernel and its scatter backward): the same terms
and gradient patterns exactly, the loss and gradient to float32 rounding (row sums in float64; the pattern scaled
once), the same errors for bad orders."""

import numpy as np
import pytest
import torch

from modeling_bcls.losses import kendall_kernels, loss_kendall
from modeling_bcls.losses import bcls_loss, kendall_ranking_loss, relevance_sort_order


pytestmark = pytest.mark.skipif(kendall_kernels.get_kernels() is None, reason="numba unavailable")


def _inputs(num_queries, num_candidates, seed):
    """Labels with ties, -0.0, negatives and a constant row; similarities with exact ties, -0.0 and +0.0."""
    g = torch.Generator().manual_seed(seed)
    relevance = torch.randint(-4, 9, (num_queries, num_candidates), generator=g).float() / 8
    relevance[relevance == 0] = -0.0
    relevance[::3] = torch.rand(len(relevance[::3]), num_candidates, generator=g)
    relevance[-1] = 0.25
    sim = torch.randint(-2, 3, (num_queries, num_candidates), generator=g).float() / 3
    sim[sim == 0] = -0.0
    sim[::2, ::3] = 0.0
    sim[1::4] = torch.randn(len(sim[1::4]), num_candidates, generator=g)
    return sim, relevance


def _unfused(monkeypatch):
    monkeypatch.setattr(loss_kendall, "_fused_hard_mining", lambda *args: None)


def _loss_and_grad(sim, relevance, **kwargs):
    """Loss and gradient of one direction; ``transposed``: the t2i direction, ``sim.T`` as a strided view."""
    s = sim.clone().requires_grad_()
    view = s.T if kwargs.pop("transposed", False) else s
    loss = kendall_ranking_loss(view, relevance, **kwargs)
    loss.backward()
    return loss.detach(), s.grad


def _assert_same(got, expected, where):
    """Loss values and gradients to float32 rounding: float64 row sums against ``terms.sum()``, the gradient pattern
    scaled once against one rounding per scattered term (the exact terms and patterns: the kernel test below)."""
    for value, expected_value in zip(got, expected):
        assert value.dtype == expected_value.dtype
        torch.testing.assert_close(value, expected_value, rtol=2e-6, atol=1e-7, msg=str(where))


@pytest.mark.parametrize("shape", [(5, 1), (9, 13), (37, 53), (20, 70)])
def test_fused_equals_unfused(monkeypatch, shape):
    sim, relevance = _inputs(*shape, seed=shape[1])
    taken = []
    original = loss_kendall._FusedHardestPairLoss.apply
    monkeypatch.setattr(loss_kendall._FusedHardestPairLoss, "apply", lambda *a: taken.append(1) or original(*a))
    num_candidates = shape[1]
    for transposed in (False, True):
        rel = relevance.T if transposed else relevance  # the t2i direction: strided views of both matrices
        for labels in (rel, rel.double()):
            for given in (False, True):
                for surrogate in ("hinge", "logistic"):
                    for window in sorted({None, 1, 2, 3, 7, 32, num_candidates, num_candidates + 5} - {None}) + [None]:
                        for gap in (0.0, 0.1, 0.15):
                            kwargs = dict(window_size=window, label_gap=gap, surrogate=surrogate, transposed=transposed,
                                          sort_order=relevance_sort_order(labels) if given else None)
                            taken.clear()
                            got = _loss_and_grad(sim, labels, **dict(kwargs))
                            assert taken, "the fused kernel must be taken"
                            with monkeypatch.context() as patch:
                                _unfused(patch)
                                expected = _loss_and_grad(sim, labels, **dict(kwargs))
                            _assert_same(got, expected, (transposed, labels.dtype, given, surrogate, window, gap))


def test_fused_bcls_loss_equals_unfused(monkeypatch):
    """Both directions of the BCLS objective (the t2i one on transposed views), with precomputed orders."""
    sim, relevance = _inputs(48, 48, seed=7)
    mask = torch.eye(48, dtype=torch.bool)
    results = []
    for fused in (True, False):
        with monkeypatch.context() as patch:
            if not fused:
                _unfused(patch)
            s = sim.clone().requires_grad_()
            out = bcls_loss(s, mask, relevance, sort_order_i2t=relevance_sort_order(relevance),
                            sort_order_t2i=relevance_sort_order(relevance.T))
            out["loss"].backward()
            results.append((out["loss"].detach(), out["kendall"].detach(), s.grad))
    (loss, kendall, grad), (expected_loss, expected_kendall, expected_grad) = results
    torch.testing.assert_close(loss, expected_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(kendall, expected_kendall, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=2e-6, atol=1e-8)


def test_second_backward_through_a_retained_graph_recomputes_the_pattern():
    sim, relevance = _inputs(40, 40, seed=2)
    s = sim.clone().requires_grad_()
    loss = kendall_ranking_loss(s.T, relevance, window_size=5, label_gap=0.1)
    (first,) = torch.autograd.grad(loss * 3, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2, s)
    (fresh,) = torch.autograd.grad(kendall_ranking_loss(s.T, relevance, window_size=5, label_gap=0.1) * 2, s)
    assert first.abs().sum() > 0 and torch.equal(second, fresh)
    torch.testing.assert_close(first / 3, second / 2)


def test_fused_kernel_sums_pattern_and_counts_match_the_label_pass():
    """Direct kernel call: each row's sum of terms (in anchor order, float64), gradient pattern and count of
    non-empty windows equal what the unfused kernels' terms and partners give, on a benchmark-like batch, over several
    row chunks, for the i2t and the t2i (transposed views) direction."""
    kernels = kendall_kernels.get_kernels()
    g = torch.Generator().manual_seed(3)
    relevance = torch.rand(131, 131, generator=g)
    relevance[torch.rand(131, 131, generator=g) < 0.05] = 1.0
    sim = torch.randn(131, 131, generator=g)
    rows = np.arange(131)[:, None].repeat(131, 1)
    for rel, s in ((relevance, sim), (relevance.T, sim.T)):
        order, start = loss_kendall._label_windows(rel, None, 0.15)
        for width in (1, 5, 32, 131):
            terms, partner = np.empty((131, 131), np.float32), np.empty((131, 131), np.int32)
            kernels.hardest_pairs(s.contiguous().numpy(), order.numpy(), start.numpy(), width, True, 0.1, True, terms,
                                  partner, np.empty((0, 0), np.float32), 1)
            expected_pattern = np.zeros((131, 131), np.float32)
            kept = partner >= 0
            np.add.at(expected_pattern, (rows[kept], partner[kept]), 1)
            np.add.at(expected_pattern, (rows[kept], order.numpy()[kept]), -1)
            for threads in (1, 3):
                pattern = np.empty((131, 131), np.float32)
                row_sums, counts, status = np.empty(131), np.empty(131, np.int64), np.zeros(3, np.int64)
                kernels.fused_hardest_pairs(rel.numpy(), s.numpy(), order.numpy(), np.float32(0.15), width, True,
                                            0.1, True, row_sums, pattern, counts, status, threads)
                assert status[0] == 0
                assert np.array_equal(row_sums, np.cumsum(terms.astype(np.float64), axis=1)[:, -1])
                assert np.array_equal(pattern, expected_pattern)
                assert np.array_equal(counts, (start < 131).sum(1).numpy())


@pytest.mark.parametrize("fused", [True, False])
def test_fused_bad_orders_raise_like_the_label_pass(monkeypatch, fused):
    if not fused:
        _unfused(monkeypatch)
    sim, relevance = _inputs(40, 30, seed=5)
    relevance[33] = torch.arange(30.0)
    order = relevance_sort_order(relevance)
    order[33, [10, 11]] = order[33, [11, 10]]
    with pytest.raises(ValueError, match="row 33 is not sorted by relevance descending at positions 10, 11"):
        kendall_ranking_loss(sim, relevance, window_size=3, sort_order=order)
    order = relevance_sort_order(relevance)
    order[35, 7] = 30
    with pytest.raises(ValueError, match=r"outside \[0, 30\): 30 at row 35, position 7"):
        kendall_ranking_loss(sim, relevance, window_size=3, sort_order=order)
    order[35, 7] = -1
    with pytest.raises(ValueError, match=r"outside \[0, 30\): -1 at row 35, position 7"):
        kendall_ranking_loss(sim, relevance, window_size=3, sort_order=order)
