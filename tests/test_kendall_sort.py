"""The compiled label sort (compact uint32 keys + NumPy's sort in runs + merges + an insertion pass by the full labels)
returns exactly ``torch.sort(R, dim=1, descending=True, stable=True).indices``, also where labels share a truncated
key (the insertion pass) and where they crowd so much that a row is sorted again on wide keys (the fallback)."""

import numpy as np
import pytest
import torch

from modeling_bcls.losses import kendall_kernels
from modeling_bcls.losses import relevance_sort_order


pytestmark = pytest.mark.skipif(kendall_kernels.get_kernels() is None, reason="numba unavailable")


def _reference(relevance: torch.Tensor) -> torch.Tensor:
    return torch.sort(relevance, dim=1, descending=True, stable=True).indices


def _rows(num_candidates: int, seed: int = 0) -> torch.Tensor:
    """Rows that stress the compact keys: uniform, crowded within a few ulps (shared truncated keys), crowded next
    to far outliers (the positives at 1.0 stretch the row's range), exact ties with -0.0 / +0.0, negatives,
    extreme magnitudes and subnormals."""
    g = torch.Generator().manual_seed(seed)
    n = num_candidates
    ulp = 2.0**-24
    rows = [
        torch.rand(n, generator=g),
        0.5 + torch.randint(0, max(2, n // 3), (n,), generator=g).float() * ulp,
        torch.cat([torch.ones(3), 0.3 + torch.randint(0, max(2, n), (n,), generator=g).float() * ulp / 2]),
        torch.randint(-2, 3, (n,), generator=g).float() / 2,
        torch.randn(n, generator=g) * 1e30,
        torch.full((n,), torch.finfo(torch.float32).tiny / 4) * torch.randint(-3, 4, (n,), generator=g),
    ]
    rows[3][rows[3] == 0] = -0.0
    rows[3][::5] = 0.0
    return torch.stack([row[:n] for row in rows])


@pytest.mark.parametrize("num_candidates", [1, 2, 7, 512, 513, 1000, 1500, 2048])
def test_compact_sort_equals_torch_sort(num_candidates):
    relevance = _rows(num_candidates)
    assert torch.equal(relevance_sort_order(relevance), _reference(relevance))
    assert torch.equal(relevance_sort_order(relevance.T.contiguous()), _reference(relevance.T.contiguous()))


@pytest.mark.parametrize("budget", [0, 1, 10**9])
def test_insertion_pass_and_wide_key_fallback_agree(budget):
    """Budget 0 sends every row with a shared truncated key to the wide-key sort; a huge budget never does."""
    relevance = _rows(900, seed=1)
    bits = relevance.view(torch.int32).numpy()
    column_bits = (relevance.shape[1] - 1).bit_length()
    keys = np.empty(relevance.shape, np.uint32)
    kendall_kernels.compact_keys(bits, keys, column_bits)
    keys.sort(axis=1)
    truncated = keys >> np.uint32(column_bits)
    assert (truncated[:, 1:] == truncated[:, :-1]).any(axis=1)[1:3].all(), "the crowded rows must share truncated keys"
    order = np.empty(relevance.shape, np.int64)
    kendall_kernels.finish_compact_sort(bits, keys, column_bits, order, budget)
    assert np.array_equal(order, _reference(relevance).numpy())


def test_sort_blocks_and_threads_equal_one_pass(monkeypatch):
    relevance = torch.cat([_rows(300, seed=s) for s in range(7)])
    expected = _reference(relevance)
    kernels = kendall_kernels.get_kernels()
    for block, threads, run in ((1, 1, 512), (300 * 5, 3, 512), (1 << 16, 4, 512), (1 << 16, 2, 8), (7, 1, 16)):
        monkeypatch.setattr(kendall_kernels, "_SORT_BLOCK_ELEMENTS", block)
        monkeypatch.setattr(kendall_kernels, "_SORT_RUN", run)  # runs of 8 and 16: merges over 6 levels, uneven
        order = np.empty(relevance.shape, np.int64)
        kernels.sort_rows_descending(relevance.view(torch.int32).numpy(), order, threads)
        assert np.array_equal(order, expected.numpy()), (block, threads, run)
