"""Compiled CPU kernels of the Kendall SW-HS loss (Numba), linear-time per sorted row.

They compute exactly what the torch path of :mod:`.loss_kendall` computes, in one pass each instead of several
``[Nq, Nc]`` tensor passes:

* :func:`sort_rows_descending` — ``torch.sort(R, dim=1, descending=True, stable=True).indices`` of a float32
  relevance matrix by an LSD radix sort of the 32-bit monotone keys, stable by construction;
* :func:`window_starts` — ``start[q, a]`` = first sorted position ``b > a`` with ``R_a - R_b > g`` (``Nc`` if none),
  by two pointers (``start`` is non-decreasing in ``a``), with the spec's exact test in the labels' dtype;
* :func:`label_windows` — both of the above in one pass over the labels (or a given order, checked, + the starts);
* :func:`hardest_pairs` / :func:`hardest_pairs_backward` — per sorted anchor the hardest pair of its window
  ``[start_a, min(start_a + w, Nc))`` by a sliding maximum (doubling) of the similarities in sorted order, the
  term ``phi(max_b S_b - S_a)`` and its gradient routed to the anchor and partner columns.

Time O(Nq * Nc) for the sort and the window starts, O(Nq * Nc * log w) for the sliding maximum (O(Nq * Nc) when
unbounded); memory O(Nq * Nc). Ties of the maximum pick the first
(lowest sorted position) partner, a valid subgradient.

Numba is an install dependency of ``bcls``, but this module is optional at run time (:mod:`.loss_kendall` imports it
on first use of the loss): :func:`get_kernels` returns ``None`` when Numba cannot be imported (e.g. a model loaded
with ``trust_remote_code`` in an environment without it) or when ``BCLS_DISABLE_NUMBA=1``, and the loss then runs
its pure-torch path. The kernels are compiled on first use (about a second each per dtype) and cached on disk by
Numba (module-level functions, so that the cache also serves kernels that call other kernels).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional


try:  # (a try block: transformers' remote-code import check does not require what is imported here)
    import numba
    import numpy as np
except ImportError:
    numba = None


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)

    @_jit
    def radix_sort_row(bits, packed, packed_out, histogram, order):
        """order[:] = the columns of one row of float32 bit patterns in descending label order, equal labels in column
        order: an LSD radix sort (4 byte digits; a digit shared by the whole row is skipped) of ``key << 32 | column``
        with 32-bit monotone keys, stable by construction."""
        num_candidates = bits.shape[0]
        histogram[:] = 0
        for c in range(num_candidates):
            b = bits[c]
            if b == -2147483648:  # -0.0 compares equal to +0.0
                b = 0
            if b < 0:  # negative floats: flip the magnitude bits so that int32 order == float order
                b = b ^ 0x7FFFFFFF
            key = np.uint32(~b) ^ np.uint32(0x80000000)  # ascending unsigned key == descending label
            packed[c] = (np.uint64(key) << np.uint64(32)) | np.uint64(c)
            histogram[0, key & 255] += 1
            histogram[1, (key >> 8) & 255] += 1
            histogram[2, (key >> 16) & 255] += 1
            histogram[3, key >> 24] += 1
        src, dst = packed, packed_out
        for digit in range(4):
            counts = histogram[digit]
            shared = False
            total = 0
            for d in range(256):  # counts -> first output slot of each digit value
                count = counts[d]
                shared = shared or count == num_candidates
                counts[d] = total
                total += count
            if shared:
                continue
            shift = np.uint64(32 + 8 * digit)
            for i in range(num_candidates):  # stable scatter
                value = src[i]
                d = (value >> shift) & np.uint64(255)
                slot = counts[d]
                counts[d] = slot + 1
                dst[slot] = value
            src, dst = dst, src
        for i in range(num_candidates):
            order[i] = src[i] & np.uint64(0xFFFFFFFF)

    @_jit
    def window_start_step(row, out, a, p, gap):
        """One step of the two-pointer merge of a descending row: either partner pointer ``p`` passes a position
        still within the gap of anchor ``a`` (``R_a - R_p <= g``), or ``a`` is done (``out[a] = p``) and moves on.
        Branch-free apart from the finished-row test, so that independent rows can be interleaved."""
        num_candidates = row.shape[0]
        if a >= num_candidates:
            return a, p
        last = num_candidates - 1
        probe = p if p < last else last
        within = (p < num_candidates) & (row[a] - row[probe] <= gap)  # not (R_a - R_p > g): labels are finite
        out[a] = p  # overwritten until a moves on; the last write is the first p past the gap
        p += within
        a += 1 - within
        p = p if p > a else a + 1
        return a, p

    @_jit
    def window_starts(sorted_rel, gap, start):
        """start[q, a] = first sorted position b > a with ``R_a - R_b > g`` (Nc if none), for descending rows
        ``sorted_rel`` [Nq, Nc], ``gap`` a scalar of their dtype and ``start`` an int [Nq, Nc] output.

        ``start`` is non-decreasing in ``a`` (the exact test is monotone in both positions), so two pointers merge the
        row in at most 2 Nc steps; four rows are merged in lockstep to overlap their dependency chains."""
        last = sorted_rel.shape[0]
        q = 0
        while q + 4 <= last:
            r0, r1, r2, r3 = sorted_rel[q], sorted_rel[q + 1], sorted_rel[q + 2], sorted_rel[q + 3]
            o0, o1, o2, o3 = start[q], start[q + 1], start[q + 2], start[q + 3]
            a0 = a1 = a2 = a3 = 0
            p0 = p1 = p2 = p3 = 1
            n = r0.shape[0]
            while a0 < n or a1 < n or a2 < n or a3 < n:
                a0, p0 = window_start_step(r0, o0, a0, p0, gap)
                a1, p1 = window_start_step(r1, o1, a1, p1, gap)
                a2, p2 = window_start_step(r2, o2, a2, p2, gap)
                a3, p3 = window_start_step(r3, o3, a3, p3, gap)
            q += 4
        while q < last:
            row, out = sorted_rel[q], start[q]
            a, p = 0, 1
            while a < row.shape[0]:
                a, p = window_start_step(row, out, a, p, gap)
            q += 1

    @_jit
    def sort_rows_descending(bits, order):
        """order[q] = ``torch.sort(values[q], descending=True, stable=True).indices`` for the float32 bit patterns
        ``bits`` [Nq, Nc] (int32 view of finite labels)."""
        num_queries, num_candidates = bits.shape
        packed = np.empty(num_candidates, np.uint64)
        packed_out = np.empty(num_candidates, np.uint64)
        histogram = np.zeros((4, 256), np.int64)
        for q in range(num_queries):
            radix_sort_row(bits[q], packed, packed_out, histogram, order[q])

    @_jit
    def label_windows(bits, values, gap, given_order, order, start, status):
        """Sort order and window starts of every row in one pass over the labels (rows are sorted into a small
        block buffer that stays in cache, then their starts are merged four at a time).

        ``given_order``: ``order`` is an input, checked to sort each row descending (``status = [2, row, position]``
        on the first failure, else ``[0, 0, 0]``; its columns are checked to lie in ``[0, Nc)`` by the caller);
        otherwise ``order`` is written by the radix sort of ``bits`` (int32 view of the float32 ``values``)."""
        num_queries, num_candidates = values.shape
        packed = np.empty(num_candidates, np.uint64)
        packed_out = np.empty(num_candidates, np.uint64)
        histogram = np.zeros((4, 256), np.int64)
        block = 4
        sorted_block = np.empty((block, num_candidates), values.dtype)
        status[:] = 0
        for first in range(0, num_queries, block):
            rows = min(block, num_queries - first)
            for r in range(rows):
                q = first + r
                sorted_values = sorted_block[r]
                if given_order:
                    for b in range(num_candidates):
                        sorted_values[b] = values[q, order[q, b]]
                        if b > 0 and sorted_values[b] > sorted_values[b - 1]:
                            status[0], status[1], status[2] = 2, q, b - 1
                            return
                else:
                    radix_sort_row(bits[q], packed, packed_out, histogram, order[q])
                    for b in range(num_candidates):
                        sorted_values[b] = values[q, order[q, b]]
            window_starts(sorted_block[:rows], gap, start[first : first + rows])

    @_jit
    def hardest_pairs(sim, order, start, width, hinge, temperature, need_grad, terms, partner, slope):
        """terms[q, a] = phi(max_{b in W_a} S[q, order[q, b]] - S[q, order[q, a]]) (0 for an empty window);
        when need_grad, partner[q, a] = column of the maximum (-1 where phi' = 0: empty window, or hinge with
        d <= 0) and, for the logistic surrogate only, slope[q, a] = phi'(d).

        Per row: the similarities in sorted order, padded with ``-inf`` up to ``Nc + w``; a sliding (value, first
        position) maximum of width ``w`` by doubling (``floor(log2 w)`` passes of pairwise maxima plus one
        overlapping pass), or a suffix maximum when the window is unbounded; then one lookup per anchor."""
        num_queries, num_candidates = sim.shape
        bounded = width < num_candidates
        length = num_candidates + (width if bounded else 0)
        best = np.empty(length, sim.dtype)
        best_next = np.empty(length, sim.dtype)
        at = np.empty(length, np.int64)
        at_next = np.empty(length, np.int64)
        anchor_values = np.empty(num_candidates, sim.dtype)
        minus_inf = -np.inf
        for q in range(num_queries):
            for b in range(num_candidates):
                value = sim[q, order[q, b]]
                anchor_values[b] = value
                best[b] = value
                at[b] = b
            for b in range(num_candidates, length):
                best[b] = minus_inf
                at[b] = 0
            if bounded:
                # after a pass with shift h, best[j] = max of [j, j + span + h): doubling while the span fits, then one
                # overlapping pass (h = w - span) that closes the window; ties keep the left (first) position
                size = length
                span = 1
                while span < width:
                    shift = span if 2 * span <= width else width - span
                    for j in range(size - shift):
                        right = best[j + shift] > best[j]
                        best_next[j] = best[j + shift] if right else best[j]
                        at_next[j] = at[j + shift] if right else at[j]
                    best, best_next = best_next, best
                    at, at_next = at_next, at
                    size -= shift
                    span += shift
            else:
                for j in range(num_candidates - 2, -1, -1):  # suffix maximum
                    if best[j + 1] > best[j]:
                        best[j] = best[j + 1]
                        at[j] = at[j + 1]
            for a in range(num_candidates):
                s = start[q, a]
                if s >= num_candidates:  # empty window
                    terms[q, a] = 0
                    if need_grad:
                        partner[q, a] = -1
                    continue
                d = best[s] - anchor_values[a]
                if hinge:
                    terms[q, a] = max(d, 0)
                else:
                    x = d / temperature
                    terms[q, a] = temperature * (max(x, 0) + np.log1p(np.exp(-abs(x))))
                if need_grad:
                    if hinge:  # slope 1 on the partner, or no gradient at all (partner -1): no slope array
                        partner[q, a] = order[q, at[s]] if d > 0 else -1
                    else:
                        partner[q, a] = order[q, at[s]]
                        slope[q, a] = 1 / (1 + np.exp(-d / temperature))

    @_jit
    def hardest_pairs_backward(grad_terms, order, partner, hinge, slope, grad_sim):
        """grad_sim[q, partner] += phi' * g and grad_sim[q, anchor] -= phi' * g for every anchor with a partner
        (``partner >= 0``; ``phi' = 1`` for the hinge, ``slope`` otherwise); grad_sim comes zeroed."""
        num_queries, num_candidates = grad_terms.shape
        for q in range(num_queries):
            for a in range(num_candidates):
                column = partner[q, a]
                if column < 0:
                    continue
                g = grad_terms[q, a] if hinge else slope[q, a] * grad_terms[q, a]
                grad_sim[q, order[q, a]] -= g
                grad_sim[q, column] += g


_KERNELS = None
if numba is not None:
    _KERNELS = SimpleNamespace(
        sort_rows_descending=sort_rows_descending,
        label_windows=label_windows,
        window_starts=window_starts,
        hardest_pairs=hardest_pairs,
        hardest_pairs_backward=hardest_pairs_backward,
    )


def get_kernels() -> Optional[SimpleNamespace]:
    """The compiled kernels, or ``None`` when Numba is unavailable or ``BCLS_DISABLE_NUMBA`` is set to a true value."""
    if os.environ.get("BCLS_DISABLE_NUMBA", "").lower() in ("1", "true", "yes"):
        return None
    return _KERNELS
