"""Row chunks on the OpenMP team of torch's ops: every chunk runs once, concurrently on distinct threads, errors come
back to the caller, and the Kendall kernels give the same bits on the team, on the fallback pool and on one thread."""

import threading
import time

import pytest
import torch

from modeling_bcls.losses import kendall_kernels, openmp_team
from modeling_bcls.losses import bcls_loss, relevance_sort_order


team = openmp_team.openmp_team()
needs_team = pytest.mark.skipif(team is None, reason="no OpenMP runtime mapped into this process")


def test_torch_openmp_runtime_is_found_where_torch_uses_openmp():
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is built without OpenMP")
    assert team is not None and "omp" in team.path


@needs_team
def test_every_chunk_runs_once_on_its_own_thread():
    chunks = [(0, 3), (3, 6), (6, 7)]
    seen, barrier = [], threading.Barrier(len(chunks), timeout=30)

    def call(first, end):
        barrier.wait()  # returns only if all chunks run at the same time
        seen.append((first, threading.get_native_id()))
        return end - first

    assert team.map(call, chunks) == [3, 3, 1]
    assert sorted(first for first, _ in seen) == [0, 3, 6]
    assert len({thread for _, thread in seen}) == len(chunks)


@needs_team
def test_a_failing_chunk_raises_in_the_caller_and_the_team_stays_usable():
    def call(first, end):
        if first == 4:
            raise ValueError("row 4 is bad")
        time.sleep(0.01)
        return first

    with pytest.raises(ValueError, match="row 4 is bad"):
        team.map(call, [(0, 4), (4, 8)])
    assert team.map(lambda first, end: first, [(0, 4), (4, 8)]) == [0, 4]


def test_disabled_by_environment_and_in_forked_children(monkeypatch):
    monkeypatch.setenv("BCLS_DISABLE_OPENMP_TEAM", "1")
    assert openmp_team.openmp_team() is None
    monkeypatch.delenv("BCLS_DISABLE_OPENMP_TEAM")
    monkeypatch.setattr(openmp_team, "_IMPORT_PID", -1)  # as in a process forked after the import
    assert openmp_team.openmp_team() is None


def _loss_and_grads(sim, mask, relevance):
    sim = sim.clone().requires_grad_()
    orders = relevance_sort_order(relevance), relevance_sort_order(relevance.T)
    loss = bcls_loss(sim, mask, relevance, sort_order_i2t=orders[0], sort_order_t2i=orders[1])["loss"]
    loss.backward()
    return [*orders, loss.detach(), sim.grad]


def test_team_pool_and_one_thread_give_the_same_bits(monkeypatch):
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(300, 300, generator=g)
    mask = torch.randint(0, 60, (300,), generator=g)
    mask = mask[:, None] == mask[None, :]
    relevance = torch.rand(300, 300, generator=g)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    single = _loss_and_grads(sim, mask, relevance)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr("modeling_bcls.losses.loss_kendall._KERNEL_ELEMENTS_PER_THREAD", 1)
    chunk_counts = []
    original = kendall_kernels.row_chunks
    monkeypatch.setattr(kendall_kernels, "row_chunks", lambda *a: chunk_counts.append(len(original(*a))) or original(*a))
    on_team = _loss_and_grads(sim, mask, relevance)
    monkeypatch.setattr(kendall_kernels, "openmp_team", lambda: None)
    on_pool = _loss_and_grads(sim, mask, relevance)
    assert chunk_counts and min(chunk_counts) == 3
    for a, b, c in zip(single, on_team, on_pool):
        assert torch.equal(a, b) and torch.equal(a, c)
