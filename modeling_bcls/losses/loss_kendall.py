"""Kendall ranking loss with sliding windows and hard sampling (SW-HS), the continuous-label term of BCLS.

Reference: Li et al., "Image-text Retrieval with Binary and Continuous Label Supervision" (BCLS).

Notation: ``S = sim`` ``[Nq, Nc]`` (rows are queries), ``R = relevance`` (continuous labels, ``R = 1`` on the
positives), ``g = label_gap >= 0``, ``w = window_size``. Per query row ``q``:

1. ``pi`` = the candidates sorted by ``R[q, :]`` descending, ties in increasing column order (stable).
2. The window of the anchor at sorted position ``a`` is ``W_a`` = the first ``w`` positions ``b > a`` with
   ``R[q, pi_a] - R[q, pi_b] > g`` (they form the contiguous run ``[start_a, min(start_a + w, Nc))`` of the
   sorted row; ``w = None`` means up to the end).
3. A pair is discordant by ``d = S[q, pi_b] - S[q, pi_a]`` (the less relevant candidate scored higher), penalised by
   ``phi(d) = max(d, 0)`` (``"hinge"``, as in the first author's released code) or ``T * softplus(d / T)``
   (``"logistic"``).
4. Hard mining keeps, per anchor, only the pair of its window with the largest ``d`` (anchors with an empty window
   are skipped); without hard mining every pair of every window is kept.
5. ``loss = sum(phi(d) over kept terms) / #kept terms``, over all queries of the batch together.

With ``window_size=None, hard_mining=False`` this is the all-pairs form
``sum_{q,j,k} 1[R_qj - R_qk > g] max(S_qk - S_qj, 0) / sum_{q,j,k} 1[R_qj - R_qk > g]``.

Cost. Label side (depends on the labels only): one stable sort per row (:func:`relevance_sort_order`, which a
collator can precompute and pass as ``sort_order``) and the window starts, which two pointers find in one pass over
each sorted row. Similarity side with hard mining: the similarities in sorted order, a sliding maximum by doubling
(``ceil(log2 w)`` elementwise maxima; a suffix maximum when unbounded), one lookup per anchor, and two scatters in
backward: O(Nq Nc log w) time and O(Nq Nc) memory, never an ``[Nq, Nc, Nc]`` tensor.

Two implementations compute exactly this. On CPU tensors with Numba available, the compiled kernels of
:mod:`.kendall_kernels` (sort of compact uint32 keys; with hard mining and float32 similarities one fused pass per row for the
order check, window starts, hardest pairs, row sums and gradient pattern, else a label pass and a hardest-pair pass and
a scatter for the gradient),
their rows split over ``torch.get_num_threads()`` threads of torch's own OpenMP team (one inside DataLoader workers).
Otherwise (GPU tensors, no Numba, ``BCLS_DISABLE_NUMBA=1``) torch operations: ``torch.sort`` (or NumPy's SIMD sort of
packed int64 keys for large CPU inputs), ``torch.searchsorted`` checked by the exact test, ``gather``, elementwise
maxima and ``scatter_add``. Without hard mining all O(Nq Nc w) pairs (O(Nq Nc^2) when unbounded) are evaluated in
blocks by a custom autograd function that recomputes them in backward, so memory stays O(Nq Nc) plus one block;
only ``reduction="none"`` materialises the terms.
"""

from __future__ import annotations

import importlib
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from .loss_triplet_sn import _check_finite, _check_positive, _check_reduction, _check_sim, _empty_terms, _reduce


_SURROGATES = ("hinge", "logistic")
_NUMPY_SORT_MIN_ELEMENTS = 1 << 14  # below this torch.sort is as fast
_THREADED_SORT_MIN_ELEMENTS = 1 << 18
_KERNEL_ELEMENTS_PER_THREAD = 1 << 15
_BLOCK_ELEMENTS = 1 << 22  # pair block size of the non-mined path (elements of one [rows, anchors, partners] block)


def _check_relevance(relevance: torch.Tensor, sim: Optional[torch.Tensor] = None, name: str = "relevance") -> torch.Tensor:
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(relevance).__name__}")
    if relevance.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D [num_queries, num_candidates] matrix, got shape {tuple(relevance.shape)}")
    if sim is not None and tuple(relevance.shape) != tuple(sim.shape):
        raise ValueError(f"`{name}` has shape {tuple(relevance.shape)} but the similarity matrix has shape {tuple(sim.shape)}")
    relevance = relevance.detach()  # labels
    if not relevance.is_floating_point():
        relevance = relevance.float()
    _check_finite(relevance, name)
    if relevance.dtype in (torch.float16, torch.bfloat16):
        relevance = relevance.float()
    if sim is not None:
        relevance = relevance.to(sim.device)
    return relevance


def _numpy():
    """NumPy if importable (an optional CPU accelerator of the label-side sort; never required)."""
    try:
        return importlib.import_module("numpy")
    except ImportError:  # pragma: no cover
        return None


def get_kernels():
    """:func:`.kendall_kernels.get_kernels`, imported on first use (importing Numba costs about half a second, which
    inference alone never pays)."""
    from .kendall_kernels import get_kernels as kernels_if_available

    return kernels_if_available()


def _cpu_kernels(*tensors: torch.Tensor):
    """The compiled CPU kernels (:mod:`.kendall_kernels`) when every tensor is a float32/float64/int32/int64 CPU
    tensor and Numba is available, else None (the torch path)."""
    if sys.byteorder != "little" or any(
        t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64, torch.int32, torch.int64)
        for t in tensors
    ):
        return None
    return get_kernels()


def _kernel_threads(array: torch.Tensor) -> int:
    """Threads for a compiled kernel over the rows of ``array``: ``torch.get_num_threads()`` (the threads torch is
    given), 1 inside a DataLoader worker (the collator's sort orders: the workers already run in parallel), and at
    most one per ``_KERNEL_ELEMENTS_PER_THREAD`` elements (a chunk must outweigh the hand-off to a pooled thread)."""
    if get_worker_info() is not None:
        return 1
    return max(1, min(torch.get_num_threads(), array.shape[0], array.numel() // _KERNEL_ELEMENTS_PER_THREAD))


def _sort_rows(np, array) -> None:
    """In-place row sort of a 2-D NumPy array, split over ``torch.get_num_threads()`` threads when it is large (NumPy
    releases the GIL while sorting). The pool is created per call, so forked DataLoader workers are safe."""
    threads = min(torch.get_num_threads(), array.shape[0], 8) if get_worker_info() is None else 1
    if threads < 2 or array.size < _THREADED_SORT_MIN_ELEMENTS:
        array.sort(axis=1)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda chunk: chunk.sort(axis=1), np.array_split(array, threads)))


def _sort_descending(relevance: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Row-wise ``torch.sort(relevance, dim=1, descending=True, stable=True)`` as (sorted values or None when the
    path does not produce them, indices).

    On CPU for float32: the compiled key sort of :mod:`.kendall_kernels` when Numba is available; otherwise, for
    large inputs, NumPy's SIMD sort of unique int64 keys ``(monotone_key(-R) << 32) + column``, which returns the
    same permutation (unique keys make any sort stable). Both are several times faster than ``torch.sort`` on CPU.
    """
    num_candidates = relevance.shape[1]
    if relevance.dtype == torch.float32 and num_candidates < 2**31:
        kernels = _cpu_kernels(relevance)
        if kernels is not None:  # (rows read in place: a transposed matrix is copied once, not read with strides)
            order = torch.empty(relevance.shape, dtype=torch.long)
            bits = relevance.contiguous().view(torch.int32)
            kernels.sort_rows_descending(bits.numpy(), order.numpy(), _kernel_threads(order))
            return None, order
        np = _numpy() if relevance.numel() >= _NUMPY_SORT_MIN_ELEMENTS and relevance.device.type == "cpu" else None
        if np is not None and sys.byteorder == "little":
            bits = (relevance + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (they compare equal)
            if bool(bits.min() < 0):  # negative floats: flip the magnitude bits so that int32 order == float order
                bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            # int64 key = (~monotone << 32) | column, written as two int32 halves (little endian: low half first)
            keys = torch.empty(*relevance.shape, 2, dtype=torch.int32)
            keys[..., 0] = torch.arange(num_candidates, dtype=torch.int32)
            keys[..., 1] = bits.bitwise_not_()
            array = keys.view(torch.int64).squeeze(-1).numpy()
            _sort_rows(np, array)
            order = keys[..., 0].long()
            return relevance.gather(1, order), order
    return torch.sort(relevance, dim=1, descending=True, stable=True)


def relevance_sort_order(relevance: torch.Tensor) -> torch.Tensor:
    """``[Nq, Nc]`` LongTensor: each row's column indices sorted by relevance descending, ties in increasing column
    order (``torch.sort(relevance, dim=1, descending=True, stable=True).indices``). It depends on the labels only,
    so a data collator can precompute it and pass it as ``sort_order``."""
    relevance = _check_relevance(relevance)
    return _sort_descending(relevance)[1]


def _sorted_relevance(relevance: torch.Tensor, sort_order: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(relevance sorted descending per row, the order). A given ``sort_order`` is checked to hold column indices
    and to sort every row descending; the order inside ties (increasing column, as produced by
    :func:`relevance_sort_order`) is trusted, not checked."""
    if sort_order is None:
        sorted_rel, order = _sort_descending(relevance)
        return relevance.gather(1, order) if sorted_rel is None else sorted_rel, order
    order = _check_sort_order(sort_order, relevance)
    num_candidates = relevance.shape[1]
    sorted_rel = relevance.gather(1, order)
    if num_candidates > 1:
        increasing = sorted_rel[:, 1:] > sorted_rel[:, :-1]
        if bool(increasing.any()):
            row, pos = increasing.nonzero()[0].tolist()
            raise ValueError(
                f"`sort_order` is not relevance_sort_order(relevance): row {row} is not sorted by relevance descending "
                f"at positions {pos}, {pos + 1}"
            )
    return sorted_rel, order


def _tie_group_end(sorted_rel: torch.Tensor) -> torch.Tensor:
    """``end[q, a]`` = 1 + the last sorted position of ``a``'s tie group: the window start for ``g = 0``, since
    ``R_a - R_b > 0  <=>  R_b < R_a`` exactly (the difference of two distinct floats is never rounded to 0).

    A position ``b`` ends its group when ``R_b != R_{b+1}`` (or ``b = Nc - 1``); ``end[a]`` is the smallest such
    ``b + 1`` at or after ``a``, a reversed running minimum. O(Nc) per row, no search."""
    num_candidates = sorted_rel.shape[1]
    positions = torch.arange(1, num_candidates + 1, device=sorted_rel.device).expand_as(sorted_rel)
    changes = F.pad(sorted_rel[:, 1:] != sorted_rel[:, :-1], (0, 1), value=True)
    ends = torch.where(changes, positions, num_candidates)
    return torch.cummin(ends.flip(1), dim=1).values.flip(1)


def _window_start(sorted_rel: torch.Tensor, label_gap: float) -> torch.Tensor:
    """``start[q, a]`` = first sorted position ``b`` with ``R_a - R_b > g`` (``Nc`` when there is none), the test
    evaluated in the labels' dtype (as ``torch`` evaluates ``R[:, :, None] - R[:, None, :] > g``).

    CPU with the compiled kernels: two pointers per row (``start`` is non-decreasing in ``a``), O(Nc) and exact.
    Torch path: ``g = 0`` is the end of ``a``'s tie group (exact, no search); ``g > 0`` is a ``searchsorted`` for
    ``R_b < R_a - g``, which can differ from the exact test by one rounding, so the boundary is checked with the exact
    test and the (rare) disagreeing anchors are recounted.
    """
    num_candidates = sorted_rel.shape[1]
    kernels = _cpu_kernels(sorted_rel)
    if kernels is not None:
        values = sorted_rel.contiguous()
        start = torch.empty(values.shape, dtype=torch.long)
        gap = values.new_tensor(label_gap).item()  # the gap rounded to the labels' dtype, as in a tensor comparison
        kernels.window_starts(values.numpy(), values.numpy().dtype.type(gap), start.numpy(), _kernel_threads(start))
        return start
    if label_gap == 0:
        return _tie_group_end(sorted_rel)
    ascending = (-sorted_rel).contiguous()
    start = torch.searchsorted(ascending, (label_gap - sorted_rel).contiguous(), right=True)
    # start >= a + 1 >= 1 because R_a < R_a - g never holds for g >= 0; position Nc reads -inf (always in the gap).
    at = F.pad(sorted_rel, (0, 1), value=float("-inf")).gather(1, start)
    before = sorted_rel.gather(1, start - 1)
    bad = (sorted_rel - at <= label_gap) | (sorted_rel - before > label_gap)
    if bool(bad.any()):
        # Rare (a label within one rounding of R_a - g): bisect those anchors with the exact test, which is monotone
        # in b (R_b decreases, rounding is monotone); O(log Nc) per anchor, also when ties cross the boundary.
        rows, anchors = bad.nonzero(as_tuple=True)
        anchor_rel = sorted_rel[rows, anchors]
        low = anchors + 1  # the test fails at every b <= a
        high = torch.full_like(low, num_candidates)  # first b passing the test lies in [low, high]; Nc: none
        while True:
            active = low < high
            if not bool(active.any()):
                break
            mid = (low + high) // 2
            passes = (anchor_rel - sorted_rel[rows, mid.clamp(max=num_candidates - 1)]) > label_gap
            high = torch.where(active & passes, mid, high)
            low = torch.where(active & ~passes, mid + 1, low)
        start = start.index_put((rows, anchors), low)
    return start


def _outside_message(num_candidates: int) -> str:
    return f"`sort_order` has column indices outside [0, {num_candidates})"


def _check_sort_order(sort_order, relevance: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    if not isinstance(sort_order, torch.Tensor) or sort_order.is_floating_point() or sort_order.dtype == torch.bool:
        raise ValueError("`sort_order` must be an integer tensor, as returned by relevance_sort_order(relevance)")
    if tuple(sort_order.shape) != tuple(relevance.shape):
        raise ValueError(f"`sort_order` has shape {tuple(sort_order.shape)} but relevance has shape {tuple(relevance.shape)}")
    order = sort_order.to(device=relevance.device, dtype=torch.long)
    if check_range and order.numel():
        low, high = torch.aminmax(order)
        if int(low) < 0 or int(high) >= relevance.shape[1]:
            raise ValueError(_outside_message(relevance.shape[1]))
    return order


def _label_windows(
    relevance: torch.Tensor, sort_order: Optional[torch.Tensor], label_gap: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sort order, window starts) of every row: everything of the loss that depends on the labels only.

    CPU with the compiled kernels: per block of rows, the compact keys sorted (or the given order checked: columns
    in range, rows descending), then the two-pointer starts; int32 starts, rows split over :func:`_kernel_threads`.
    Elsewhere :func:`_sorted_relevance` + :func:`_window_start`."""
    kernels = _cpu_kernels(relevance)
    if kernels is None or (sort_order is None and relevance.dtype != torch.float32):
        sorted_rel, order = _sorted_relevance(relevance, sort_order)
        return order, _window_start(sorted_rel, label_gap)
    values = relevance.contiguous()
    if sort_order is None:
        order = torch.empty(values.shape, dtype=torch.long)
        bits = values.view(torch.int32).numpy()
    else:
        order = _check_sort_order(sort_order, values, check_range=False).contiguous()  # the kernel checks the range
        bits = torch.empty(0, 0, dtype=torch.int32).numpy()
    start = torch.empty(values.shape, dtype=torch.int32)
    status = torch.zeros(3, dtype=torch.long)
    gap = values.new_tensor(label_gap).item()  # the gap rounded to the labels' dtype, as in a tensor comparison
    kernels.label_windows(
        bits, values.numpy(), values.numpy().dtype.type(gap), sort_order is not None, order.numpy(), start.numpy(),
        status.numpy(), _kernel_threads(start),
    )
    code, row, where = status.tolist()
    if code == 3:
        raise ValueError(f"{_outside_message(values.shape[1])}: {int(order[row, where])} at row {row}, position {where}")
    if code == 2:
        _check_sort_order(order, values)  # an out-of-range column anywhere is reported first, as on the other paths
        raise ValueError(
            f"`sort_order` is not relevance_sort_order(relevance): row {row} is not sorted by relevance descending "
            f"at positions {where}, {where + 1}"
        )
    return order, start


def _surrogate(d: torch.Tensor, surrogate: str, temperature: float) -> torch.Tensor:
    if surrogate == "hinge":
        return d.clamp_min(0)
    return F.softplus(d, beta=1.0 / temperature)  # == T * softplus(d / T)


def _surrogate_grad(d: torch.Tensor, surrogate: str, temperature: float) -> torch.Tensor:
    if surrogate == "hinge":
        return (d > 0).to(d.dtype)
    return torch.sigmoid(d / temperature)


_POSITION_BITS = 28  # a float32 widened to float64 has 29 zero low mantissa bits; 28 keep it the nearest float32


def _window_max(sorted_sim: torch.Tensor, start: torch.Tensor, width: int, need_argmax: bool):
    """``max(S_sorted[start_a : start_a + width])`` per anchor (``-inf`` for an empty window) and, if asked, the sorted
    position of that maximum.

    Bounded windows use a sliding maximum by doubling (``log2(w) + 1`` elementwise maxima, O(Nc log w) per row);
    unbounded ones a suffix maximum (``cummax``). For float32 the argmax rides along for free: each similarity is
    widened to float64 and its position is written into the low mantissa bits, which float32 values leave zero, so
    comparing the widened values compares the similarities first (the position only breaks exact ties), and
    rounding the maximum back to float32 returns the similarity exactly (the position is below half a float32 ulp).
    """
    num_candidates = sorted_sim.shape[1]
    encode = sorted_sim.dtype == torch.float32 and num_candidates < 2**_POSITION_BITS and sys.byteorder == "little"
    bounded = width < num_candidates
    if encode:
        # float64 copy, padded with the -inf window start Nc when bounded; exact, with 29 zero low mantissa bits
        values = sorted_sim.new_empty(sorted_sim.shape[0], num_candidates + (width if bounded else 0), dtype=torch.float64)
        values[:, :num_candidates] = sorted_sim
        values[:, num_candidates:] = float("-inf")  # its low bits are 0: position 0, a valid index
        values.view(torch.int64)[:, :num_candidates].bitwise_or_(
            torch.arange(num_candidates, dtype=torch.int64, device=sorted_sim.device)
        )
    else:
        values = sorted_sim
    arg = None
    if not bounded:
        run_max, run_arg = torch.cummax(values.flip(1), dim=1)  # column j <-> suffix starting at position Nc-1-j
        from_end = num_candidates - start  # 0 for an empty window: the -inf pad
        window = F.pad(run_max, (1, 0), value=float("-inf")).gather(1, from_end)
        if need_argmax and not encode:
            arg = (num_candidates - 1) - run_arg.gather(1, (from_end - 1).clamp_(min=0))
    elif encode:
        sliding = values  # the window starting at position Nc is all -inf
        span = 1
        while 2 * span <= width:
            sliding = torch.maximum(sliding[:, :-span], sliding[:, span:])  # column j: max over [j, j + 2 * span)
            span *= 2
        if span < width:
            sliding = torch.maximum(sliding[:, : span - width], sliding[:, width - span :])
        window = sliding.gather(1, start)  # [Nq, Nc + 1] -> one window per anchor
    else:
        padded = F.pad(values, (0, width), value=float("-inf"))
        sliding, sliding_arg = padded.unfold(1, width, 1).max(dim=-1)
        window = sliding.gather(1, start)
        if need_argmax:
            arg = start + sliding_arg.gather(1, start)
    if encode:
        if need_argmax:  # < Nc: the -inf pad of empty windows reads position 0 (their slope is 0)
            arg = window.view(torch.int64) & ((1 << _POSITION_BITS) - 1)
        return window.float(), arg
    if arg is not None:
        arg = arg.clamp_(max=num_candidates - 1)  # empty windows: any valid index, their slope is 0
    return window, arg


class _HardestPairLoss(torch.autograd.Function):
    """``phi(max_{b in W_a} S_b - S_a)`` for every sorted anchor ``a`` (0 for an empty window), ``[Nq, Nc]``.

    An empty window reads a ``-inf`` pad, so ``phi`` and its derivative are 0 there without masks. Backward routes
    ``phi'(d)`` to the argmax position and ``-phi'(d)`` to the anchor (a subgradient of the maximum) in sorted order
    (one scatter of the partners), then to the columns (one scatter through ``order``), without an autograd graph of
    the intermediate ``[Nq, Nc]`` tensors.
    """

    @staticmethod
    def forward(ctx, sim, order, start, width, surrogate, temperature):
        if not sim.is_contiguous():
            sim = sim.contiguous()  # the t2i direction gets sim.T: one transposing copy beats a strided gather
        need_grad = ctx.needs_input_grad[0]
        kernels = _cpu_kernels(sim, order, start)
        ctx.kernels = kernels
        if kernels is not None:  # one compiled pass per row: gather, deque sliding maximum, phi and phi'
            terms = torch.empty_like(sim)
            hinge = surrogate == "hinge"
            partner = torch.empty(sim.shape if need_grad else (0, 0), dtype=torch.int32)
            slope = torch.empty(sim.shape if need_grad and not hinge else (0, 0), dtype=sim.dtype)
            kernels.hardest_pairs(
                sim.detach().numpy(), order.contiguous().numpy(), start.contiguous().numpy(), int(width), hinge,
                float(temperature), need_grad, terms.numpy(), partner.numpy(), slope.numpy(), _kernel_threads(terms),
            )
            if need_grad:
                ctx.save_for_backward(order, partner, slope)
                ctx.hinge = hinge
            return terms
        sorted_sim = sim.gather(1, order)
        window_max, partner = _window_max(sorted_sim, start, width, need_argmax=need_grad)
        d = window_max - sorted_sim
        if need_grad:  # hinge: the 0/1 slope as a bool mask (a quarter of the memory)
            slope = d > 0 if surrogate == "hinge" else _surrogate_grad(d, surrogate, temperature)
            ctx.save_for_backward(order, partner, slope)
        return _surrogate(d, surrogate, temperature)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        order, partner, slope = ctx.saved_tensors
        if ctx.kernels is not None:
            grad_sim = torch.zeros(partner.shape, dtype=grad_output.dtype)
            ctx.kernels.hardest_pairs_backward(  # grad_output is often an expanded scalar (stride 0): read as it is
                grad_output.numpy(), order.contiguous().numpy(), partner.numpy(), ctx.hinge, slope.numpy(),
                grad_sim.numpy(), _kernel_threads(grad_sim),
            )
            return grad_sim, None, None, None, None, None
        g = torch.where(slope, grad_output, 0) if slope.dtype == torch.bool else slope * grad_output
        grad_sorted = torch.neg(g).scatter_add_(1, partner, g)  # d/dS_sorted: -phi' at the anchor, +phi' at its partner
        return torch.zeros_like(g).scatter_add_(1, order, grad_sorted), None, None, None, None, None


class _FusedHardestPairLoss(torch.autograd.Function):
    """The sum of the hard-mined terms and their count (CPU kernels, float32 similarities): one compiled pass per row
    checks the given order, finds the window starts and the hardest pairs and adds up the row's terms
    (:func:`.kendall_kernels.fused_hardest_pairs`); no ``[Nq, Nc]`` window starts, terms or partners. The terms
    are those of :func:`_label_windows` followed by :class:`_HardestPairLoss`, bit for bit; their sum is taken in
    float64 per row (so it may differ from ``terms.sum()`` in the last float32 bit).

    Forward also writes the row-major gradient pattern ``d sum / d sim`` (``+-phi'(d)`` added up at the partner and
    anchor columns); backward scales it in place (no ``[Nq, Nc]`` allocation, no scatter), which rounds once where the
    scattered gradient rounds once per term. A second backward (``retain_graph``) recomputes the pattern."""

    @staticmethod
    def forward(ctx, sim, relevance, order, sort_order, label_gap, width, surrogate, temperature):
        need_grad = ctx.needs_input_grad[0]
        total, count, pattern = _fused_pass(sim, relevance, order, sort_order, label_gap, width, surrogate,
                                            temperature, need_grad)
        if need_grad:
            ctx.save_for_backward(sim, relevance, order)
            ctx.pattern = pattern
            ctx.arguments = (sort_order, label_gap, width, surrogate, temperature)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_count):
        pattern, ctx.pattern = ctx.pattern, None
        if pattern is None:  # a second backward through a retained graph: the first one scaled the pattern in place
            pattern = _fused_pass(*ctx.saved_tensors, *ctx.arguments, need_grad=True)[2]
        return pattern.mul_(grad_total), None, None, None, None, None, None, None


def _fused_pass(sim, relevance, order, sort_order, label_gap, width, surrogate, temperature, need_grad):
    """(sum of the terms as a 0-d tensor of ``sim``'s dtype, their count, the gradient pattern or None) by
    :func:`.kendall_kernels.fused_hardest_pairs`."""
    kernels = _cpu_kernels(sim, relevance, order)
    num_queries = sim.shape[0]
    # row-major, as the binary losses' gradients of the direction: the two add up without strided passes
    pattern = torch.empty(sim.shape if need_grad else (0, 0), dtype=sim.dtype)
    row_sums = torch.empty(num_queries, dtype=torch.float64)
    counts = torch.empty(num_queries, dtype=torch.long)
    status = torch.zeros(3, dtype=torch.long)
    rel = relevance.numpy()  # (strided views are read as they are: the t2i direction needs no transposing copy)
    gap = relevance.new_tensor(label_gap).item()  # the gap rounded to the labels' dtype, as in a tensor comparison
    kernels.fused_hardest_pairs(
        rel, sim.detach().numpy(), order.numpy(), rel.dtype.type(gap), int(width), surrogate == "hinge",
        float(temperature), need_grad, row_sums.numpy(), pattern.numpy(), counts.numpy(), status.numpy(),
        _kernel_threads(sim),
    )
    if int(status[0]):  # a bad given order: the unfused label pass names the row and position
        _label_windows(relevance, sort_order, label_gap)
        raise AssertionError("the fused Kendall kernel rejected an order that the label pass accepts")
    return row_sums.sum().to(sim.dtype), counts.sum(), pattern if need_grad else None


def _fused_hard_mining(sim, relevance, sort_order, label_gap, width, surrogate, temperature):
    """(sum of the hard-mined terms, their count) by :class:`_FusedHardestPairLoss`, or None where it does not apply
    (not on CPU, no Numba, not float32 similarities)."""
    if sim.dtype != torch.float32 or sim.shape[1] >= 2**31 or _cpu_kernels(sim, relevance) is None:
        return None
    if sort_order is None:
        order = _sort_descending(relevance)[1]
    else:
        order = _check_sort_order(sort_order, relevance, check_range=False)  # the kernel checks the range
    return _FusedHardestPairLoss.apply(sim, relevance, order.contiguous(), sort_order, label_gap, width, surrogate,
                                       temperature)


def _blocks(num_queries: int, num_candidates: int, width: int):
    """Yields (row slice, anchor slice) blocks of at most about ``_BLOCK_ELEMENTS`` pairs."""
    per_row = num_candidates * width
    if per_row <= _BLOCK_ELEMENTS:
        rows = max(1, _BLOCK_ELEMENTS // max(per_row, 1))
        for r0 in range(0, num_queries, rows):
            yield slice(r0, min(r0 + rows, num_queries)), slice(0, num_candidates)
    else:
        anchors = max(1, _BLOCK_ELEMENTS // width)
        for r0 in range(num_queries):
            for a0 in range(0, num_candidates, anchors):
                yield slice(r0, r0 + 1), slice(a0, min(a0 + anchors, num_candidates))


def _pair_block(sorted_sim: torch.Tensor, start: torch.Tensor, width: int, rows: slice, anchors: slice):
    """Discordances ``d = S_b - S_a`` of one block: ``[r, k, Nc]`` (unbounded, partner = every position) or
    ``[r, k, w]`` (partner = ``start_a + o``), with the validity mask and (bounded only) the partner positions."""
    num_candidates = sorted_sim.shape[1]
    block_sim = sorted_sim[rows]
    anchor_sim = block_sim[:, anchors].unsqueeze(-1)
    block_start = start[rows, anchors].unsqueeze(-1)
    if width >= num_candidates:
        positions = torch.arange(num_candidates, device=sorted_sim.device)
        return block_sim.unsqueeze(1) - anchor_sim, positions >= block_start, None
    partners = block_start + torch.arange(width, device=sorted_sim.device)
    valid = partners < num_candidates
    partners = partners.clamp(max=num_candidates - 1)
    shape = partners.shape
    partner_sim = block_sim.gather(1, partners.reshape(shape[0], -1)).view(shape)
    return partner_sim - anchor_sim, valid, partners


class _WindowPairSum(torch.autograd.Function):
    """``sum over all window pairs of phi(S_b - S_a)`` without hard mining, O(Nq * Nc) memory (blocks are
    recomputed in backward instead of being kept by autograd)."""

    @staticmethod
    def forward(ctx, sorted_sim, start, width, surrogate, temperature):
        total = sorted_sim.new_zeros(())
        for rows, anchors in _blocks(sorted_sim.shape[0], sorted_sim.shape[1], width):
            d, valid, _ = _pair_block(sorted_sim, start, width, rows, anchors)
            total += torch.where(valid, _surrogate(d, surrogate, temperature), 0).sum()
        ctx.save_for_backward(sorted_sim, start)
        ctx.width, ctx.surrogate, ctx.temperature = width, surrogate, temperature
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        sorted_sim, start = ctx.saved_tensors
        width, surrogate, temperature = ctx.width, ctx.surrogate, ctx.temperature
        grad = torch.zeros_like(sorted_sim)
        for rows, anchors in _blocks(sorted_sim.shape[0], sorted_sim.shape[1], width):
            d, valid, partners = _pair_block(sorted_sim, start, width, rows, anchors)
            g = torch.where(valid, _surrogate_grad(d, surrogate, temperature), 0) * grad_output
            grad[rows, anchors] -= g.sum(-1)
            if partners is None:
                grad[rows] += g.sum(1)
            else:
                grad[rows] = grad[rows].scatter_add(1, partners.reshape(partners.shape[0], -1), g.reshape(g.shape[0], -1))
        return grad, None, None, None, None


def _kendall_parts(
    sim: torch.Tensor,
    relevance: torch.Tensor,
    window_size: Optional[int],
    label_gap: float,
    surrogate: str,
    temperature: float,
    hard_mining: bool,
    sort_order: Optional[torch.Tensor],
    want_terms: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(sum of kept terms, number of kept terms, the 1-D terms if ``want_terms``) for validated inputs."""
    num_queries, num_candidates = sim.shape
    if sim.numel() == 0:
        terms = _empty_terms(sim)
        return terms.sum(), torch.zeros((), dtype=torch.long, device=sim.device), terms
    width = num_candidates if window_size is None else min(int(window_size), num_candidates)
    if hard_mining and not want_terms:
        fused = _fused_hard_mining(sim, relevance, sort_order, label_gap, width, surrogate, temperature)
        if fused is not None:
            return fused[0], fused[1], None
    order, start = _label_windows(relevance, sort_order, label_gap)
    if hard_mining:
        per_anchor = _HardestPairLoss.apply(sim, order, start, width, surrogate, temperature)
        if want_terms:
            terms = per_anchor[start < num_candidates]
            return terms.sum(), torch.tensor(terms.numel(), device=sim.device), terms
        # start is non-decreasing along each row: its anchors with a non-empty window are a prefix, found by bisection
        ends = torch.full((num_queries, 1), num_candidates, dtype=start.dtype, device=start.device)
        return per_anchor.sum(), torch.searchsorted(start, ends).sum(), None
    sorted_sim = sim.gather(1, order)
    start = start.long()
    count = (num_candidates - start).clamp(max=width).sum()
    if want_terms:
        pieces = []
        for rows, anchors in _blocks(num_queries, num_candidates, width):
            d, valid, _ = _pair_block(sorted_sim, start, width, rows, anchors)
            pieces.append(_surrogate(d[valid], surrogate, temperature))
        terms = torch.cat(pieces)
        return terms.sum(), count, terms
    return _WindowPairSum.apply(sorted_sim, start, width, surrogate, temperature), count, None


def _check_kendall_args(window_size, label_gap, surrogate, temperature) -> Tuple[Optional[int], float, float]:
    if window_size is not None:
        if isinstance(window_size, bool) or int(window_size) != window_size or window_size < 1:
            raise ValueError(f"`window_size` must be None (unbounded) or an integer >= 1, got {window_size!r}")
        window_size = int(window_size)
    label_gap = float(label_gap)
    if not (0 <= label_gap < float("inf")):
        raise ValueError(f"`label_gap` must be a finite number >= 0, got {label_gap}")
    if surrogate not in _SURROGATES:
        raise ValueError(f"`surrogate` must be one of {_SURROGATES}, got {surrogate!r}")
    temperature = _check_positive(temperature, "temperature")
    return window_size, label_gap, temperature


def kendall_ranking_loss(
    sim: torch.Tensor,
    relevance: torch.Tensor,
    window_size: Optional[int] = None,
    label_gap: float = 0.0,
    surrogate: str = "hinge",
    temperature: float = 0.1,
    hard_mining: bool = True,
    sort_order: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Kendall ranking loss with sliding windows and hard sampling (SW-HS), one direction (rows are queries).

    For each query row, candidates are sorted by relevance (descending, stable); the anchor at sorted position ``a``
    is compared with the window ``W_a`` = the first ``window_size`` later positions ``b`` whose relevance is lower by
    more than ``label_gap`` (``R_a - R_b > g``), with discordance ``d = S_b - S_a`` and penalty ``phi(d)``
    (``max(d, 0)`` or ``T * softplus(d / T)``). Hard mining keeps only ``max_b d`` per anchor with a non-empty window;
    otherwise every window pair is kept. The loss is the mean of the kept terms over the batch.

    Args:
        sim: ``[Nq, Nc]`` similarities, rows are queries.
        relevance: ``[Nq, Nc]`` continuous labels ``R`` (1 on the positives).
        window_size: ``w >= 1``, or ``None`` for an unbounded window.
        label_gap: ``g >= 0``; ``0`` means strictly less relevant.
        surrogate: ``"hinge"`` or ``"logistic"``.
        temperature: ``T > 0`` of the logistic surrogate.
        hard_mining: keep only the hardest pair of each window.
        sort_order: optional ``relevance_sort_order(relevance)`` (checked) to skip the sort.
        reduction: ``"mean"`` (a finite 0 when nothing is kept), ``"sum"`` or ``"none"`` (1-D tensor of the kept
            terms, ordered by query, then anchor position, then window position).
    """
    _check_reduction(reduction)
    sim = _check_sim(sim)
    relevance = _check_relevance(relevance, sim)
    window_size, label_gap, temperature = _check_kendall_args(window_size, label_gap, surrogate, temperature)
    total, count, terms = _kendall_parts(
        sim, relevance, window_size, label_gap, surrogate, temperature, bool(hard_mining), sort_order,
        want_terms=reduction == "none",
    )
    return _reduce(total, count, terms, reduction)
