"""The fused hard-mining kernel (order check + window starts + hardest pairs in one pass per row) against the unfused
path it replaces (label pass, then the hardest-pair kernel): the same losses and gradients bit for bit, the same
errors for bad orders."""

import numpy as np
import pytest
import torch

from modeling_bcls import kendall_kernels, loss_kendall
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


@pytest.mark.parametrize("shape", [(5, 1), (9, 13), (37, 53), (20, 70)])
def test_fused_equals_unfused_bit_for_bit(monkeypatch, shape):
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
                            for a, b in zip(got, expected):
                                assert a.dtype == b.dtype and torch.equal(a, b), (transposed, labels.dtype, given,
                                                                                  surrogate, window, gap)


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
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_kernel_counts_and_terms_match_the_label_pass():
    """Direct kernel call: the terms, partners and counts of non-empty windows equal the unfused kernels' on a
    benchmark-like batch, over several row chunks."""
    kernels = kendall_kernels.get_kernels()
    g = torch.Generator().manual_seed(3)
    relevance = torch.rand(131, 96, generator=g)
    relevance[torch.rand(131, 96, generator=g) < 0.05] = 1.0
    sim = torch.randn(131, 96, generator=g)
    order, start = loss_kendall._label_windows(relevance, None, 0.15)
    for width in (1, 5, 32, 96):
        expected = [np.empty((131, 96), np.float32), np.empty((131, 96), np.int32)]
        kernels.hardest_pairs(sim.numpy(), order.numpy(), start.numpy(), width, True, 0.1, True, *expected,
                              np.empty((0, 0), np.float32), 1)
        for threads in (1, 3):
            terms, partner = np.empty((131, 96), np.float32), np.empty((131, 96), np.int32)
            counts, status = np.empty(131, np.int64), np.zeros(3, np.int64)
            kernels.fused_hardest_pairs(relevance.numpy(), sim.numpy(), order.numpy(), np.float32(0.15), width, True,
                                        0.1, True, terms, partner, np.empty((0, 0), np.float32), counts, status, threads)
            assert status[0] == 0
            assert terms.tobytes() == expected[0].tobytes() and np.array_equal(partner, expected[1])
            assert np.array_equal(counts, (start < 96).sum(1).numpy())


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
