"""The compiled Kendall kernels over several threads: bit-identical to one thread, exact against brute force, one
thread inside DataLoader workers, a thread pool per process."""

import multiprocessing

import numpy as np
import pytest
import torch

from modeling_bcls.losses import kendall_kernels, loss_kendall
from modeling_bcls.losses import kendall_ranking_loss, relevance_sort_order


pytestmark = pytest.mark.skipif(kendall_kernels.get_kernels() is None, reason="numba unavailable")


def _inputs(num_queries=37, num_candidates=53, seed=0):
    """Labels with ties, -0.0 and negatives; similarities with many exact ties (the argmax tie-break matters)."""
    g = torch.Generator().manual_seed(seed)
    relevance = torch.randint(-4, 9, (num_queries, num_candidates), generator=g).float() / 8
    relevance[relevance == 0] = -0.0
    relevance[::3] = torch.rand(len(relevance[::3]), num_candidates, generator=g)
    sim = torch.randint(0, 4, (num_queries, num_candidates), generator=g).float() / 3
    return sim, relevance


def _threads(monkeypatch, threads: int) -> list:
    """Sets the thread count the loss sees, lets every size be split, and records the chunk count of each call."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(loss_kendall, "_KERNEL_ELEMENTS_PER_THREAD", 1)
    calls = []
    original = kendall_kernels.over_rows

    def spy(call, num_rows, threads, multiple=1):
        calls.append(len(kendall_kernels.row_chunks(num_rows, threads, multiple)))
        return original(call, num_rows, threads, multiple)

    monkeypatch.setattr(kendall_kernels, "over_rows", spy)
    return calls


def _everything(sim, relevance):
    """Every kernel's output through the public functions: sort orders, window starts (sorted here, and from a given
    order, float32 and float64 labels), losses and gradients of both surrogates and several windows."""
    out = []
    for rel in (relevance, relevance.T.contiguous(), relevance.double()):
        order = relevance_sort_order(rel)
        for gap in (0.0, 0.1):
            out += [order, *loss_kendall._label_windows(rel, None, gap), *loss_kendall._label_windows(rel, order, gap)]
    for surrogate in ("hinge", "logistic"):
        for window in (None, 1, 3, 7):
            for s, rel in ((sim, relevance), (sim.T, relevance.T)):
                s = s.clone().requires_grad_()
                loss = kendall_ranking_loss(s, rel, window_size=window, label_gap=0.1, surrogate=surrogate)
                loss.backward()
                terms = kendall_ranking_loss(s.detach(), rel, window_size=window, label_gap=0.1, surrogate=surrogate,
                                             reduction="none")
                out += [loss.detach(), s.grad, terms]
    return out


def test_multi_threaded_equals_single_threaded_bit_for_bit(monkeypatch):
    sim, relevance = _inputs()
    with monkeypatch.context() as patch:
        calls = _threads(patch, 1)
        single = _everything(sim, relevance)
        assert calls and max(calls) == 1
    for threads in (2, 3, 8):
        with monkeypatch.context() as patch:
            calls = _threads(patch, threads)
            multi = _everything(sim, relevance)
            assert min(calls) > 1, "every kernel call must be split over threads"
        assert len(multi) == len(single)
        for index, (a, b) in enumerate(zip(single, multi)):
            assert a.dtype == b.dtype and torch.equal(a, b), (threads, index)


@pytest.mark.parametrize("threads", [1, 3])
def test_hardest_pairs_match_brute_force(threads):
    """The van Herk sliding maximum: per anchor, the window's maximum and its first (lowest sorted) position."""
    kernels = kendall_kernels.get_kernels()
    sim, relevance = _inputs(num_queries=23, num_candidates=41, seed=3)
    order, start = loss_kendall._label_windows(relevance, None, 0.1)
    sorted_sim = sim.gather(1, order)
    num_queries, num_candidates = sim.shape
    for width in (1, 2, 3, 4, 5, 8, 16, num_candidates - 1, num_candidates):
        for hinge in (True, False):
            terms = np.empty(sim.shape, np.float32)
            partner = np.empty(sim.shape, np.int32)
            slope = np.zeros(sim.shape if not hinge else (0, 0), np.float32)
            kernels.hardest_pairs(sim.numpy(), order.numpy(), start.numpy(), width, hinge, 0.1, True, terms, partner,
                                  slope, threads)
            for q in range(num_queries):
                for a in range(num_candidates):
                    s = int(start[q, a])
                    if s >= num_candidates:
                        assert terms[q, a] == 0 and partner[q, a] == -1
                        continue
                    window = sorted_sim[q, s : min(s + width, num_candidates)]
                    best = window.max()
                    at = s + int((window == best).nonzero()[0])
                    d = (best - sorted_sim[q, a]).item()
                    if hinge:
                        assert terms[q, a] == max(d, 0.0)
                        assert partner[q, a] == (order[q, at] if d > 0 else -1), (width, q, a)
                    else:
                        assert partner[q, a] == order[q, at], (width, q, a)
                        assert terms[q, a] == pytest.approx(0.1 * np.logaddexp(0, d / 0.1), rel=1e-5, abs=1e-7)


def test_bad_sort_order_names_its_row_from_any_chunk(monkeypatch):
    _threads(monkeypatch, 4)
    sim, relevance = _inputs(num_queries=40, num_candidates=30, seed=5)
    relevance[33] = torch.arange(30.0)  # distinct labels: swapping two columns of the order breaks it
    order = relevance_sort_order(relevance)
    order[33, [10, 11]] = order[33, [11, 10]]
    with pytest.raises(ValueError, match="row 33 is not sorted by relevance descending at positions 10, 11"):
        kendall_ranking_loss(sim, relevance, window_size=3, sort_order=order)
    order = relevance_sort_order(relevance)
    order[35, 7] = 30  # the range is checked in the kernel's pass
    with pytest.raises(ValueError, match=r"outside \[0, 30\): 30 at row 35, position 7"):
        kendall_ranking_loss(sim, relevance, window_size=3, sort_order=order)
    order[2, [0, -1]] = order[2, [-1, 0]]  # an unsorted row before it: the range error still comes first
    with pytest.raises(ValueError, match="outside"):
        kendall_ranking_loss(sim, relevance, window_size=3, sort_order=order)


class _KernelThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        torch.set_num_threads(4)  # even if a worker is given threads, the kernels stay on one
        return loss_kendall._kernel_threads(torch.empty(64, 4096))


def test_dataloader_workers_use_one_thread(monkeypatch):
    (threads,) = torch.utils.data.DataLoader(_KernelThreads(), batch_size=None, num_workers=1)
    assert threads == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert loss_kendall._kernel_threads(torch.empty(64, 4096)) == 4  # the main process uses torch's threads
    assert loss_kendall._kernel_threads(torch.empty(64, 16)) == 1  # too small to split


def _child_sort(relevance, expected, queue):
    order = np.empty(relevance.shape, np.int64)
    kendall_kernels.get_kernels().sort_rows_descending(relevance.view(np.int32), order, 3)
    queue.put(bool((order == expected).all()))


def test_forked_child_gets_its_own_pool():
    """A process forked after the pool was made (a DataLoader worker) must not wait on the parent's threads."""
    relevance = np.random.default_rng(0).random((30, 20), dtype=np.float32)
    expected = np.argsort(-relevance, axis=1, kind="stable")
    order = np.empty(relevance.shape, np.int64)
    kendall_kernels.get_kernels().sort_rows_descending(relevance.view(np.int32), order, 3)  # the parent's pool
    assert (order == expected).all()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_sort, args=(relevance, expected, queue))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5)


@pytest.mark.parametrize("hinge", [True, False])
@pytest.mark.parametrize("shape", [(5, 1), (9, 13), (37, 53)])
def test_float32_key_kernel_matches_generic_kernel(hinge, shape):
    """The float32 kernel (packed value/position keys, branch-free maxima) returns exactly what the generic
    (value, position) kernel returns: terms, partners (ties of the maximum, -0.0 vs +0.0: the lowest position) and
    slopes, for every window width, bounded or not."""
    num_queries, num_candidates = shape
    rng = np.random.default_rng(num_candidates)
    sim = (rng.integers(-2, 3, shape) / 3).astype(np.float32)
    sim[sim == 0] = -0.0
    sim[::2, ::3] = 0.0
    sim[1::4] = rng.standard_normal((len(sim[1::4]), num_candidates)).astype(np.float32)
    order = np.argsort(rng.random(shape), axis=1)
    start = np.maximum(np.sort(rng.integers(1, num_candidates + 3, shape), axis=1), np.arange(1, num_candidates + 1))
    start = start.clip(max=num_candidates).astype(np.int32)
    for width in sorted({1, 2, 3, 7, num_candidates}):
        outs = []
        for kernel in (kendall_kernels.hardest_pairs, kendall_kernels.hardest_pairs_f32):
            terms = np.empty(shape, np.float32)
            partner = np.empty(shape, np.int32)
            slope = np.zeros((0, 0) if hinge else shape, np.float32)
            kernel(sim, order, start, width, hinge, 0.1, True, terms, partner, slope)
            outs.append((terms, partner, slope))
        (terms, partner, slope), (terms_f32, partner_f32, slope_f32) = outs
        assert terms.tobytes() == terms_f32.tobytes()
        assert np.array_equal(partner, partner_f32)
        assert slope.tobytes() == slope_f32.tobytes()
        assert (partner < 0).any() and ((partner >= 0).any() or num_candidates == 1)
