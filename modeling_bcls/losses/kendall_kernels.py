"""Compiled CPU kernels of the Kendall SW-HS loss (Numba), linear-time per sorted row, run over row chunks on
the threads the caller gives.

They compute exactly what the torch path of :mod:`.loss_kendall` computes, in one pass each instead of several
``[Nq, Nc]`` tensor passes:

* :func:`compact_keys` + NumPy's sort + :func:`finish_compact_sort` — ``torch.sort(R, dim=1, descending=True,
  stable=True).indices`` of a float32 relevance matrix: per row the uint32 keys ``truncated monotone(-R) << k |
  column`` (``k`` = the bits of a column; the label part is shifted to the row's range) sorted by NumPy (a SIMD
  sorting network for rows of up to 512 keys on x86-64), then an insertion pass by the full labels that orders the
  few labels sharing a truncated key (a row needing more than ``2 Nc`` moves is sorted on unique uint64 keys);
* :func:`window_starts` — ``start[q, a]`` = first sorted position ``b > a`` with ``R_a - R_b > g`` (``Nc`` if none),
  by two pointers (``start`` is non-decreasing in ``a``), with the spec's exact test in the labels' dtype;
* :func:`label_windows` — the window starts of a sorted order, which it checks;
* :func:`hardest_pairs` / :func:`hardest_pairs_backward` — per sorted anchor the hardest pair of its window
  ``[start_a, min(start_a + w, Nc))`` by a van Herk / Gil-Werman sliding maximum of the similarities in sorted
  order, the term ``phi(max_b S_b - S_a)`` and its gradient routed to the anchor and partner columns.
  For float32 (:func:`hardest_pairs_f32`) the maxima run on packed ``value << 32 | ~position`` keys, branch-free.

* :func:`fused_hardest_pairs` — the hard-mined loss in one pass per row, what the loss runs in training: the given
  order checked, labels and similarities gathered in sorted order (a transposed view read in column blocks), the
  window starts of 8 rows merged in lockstep, the hardest pair by a sliding maximum by doubling (vectorised), and
  the count of non-empty windows; no ``[Nq, Nc]`` window starts.

Time O(Nq * Nc log Nc) for the sort (a few ns per label), O(Nq * Nc) for the rest whatever ``w``; memory
O(Nq * Nc). Ties of the maximum pick the first (lowest sorted position) partner, a valid subgradient.

Threads. Rows are independent: the wrappers returned by :func:`get_kernels` take a trailing ``threads`` count and
split the rows into that many contiguous chunks, run concurrently on the OpenMP team of torch's own ops
(:mod:`.openmp_team`), or, where that does not apply, on a persistent thread pool of this module (the kernels
release the GIL; the calling thread takes the first chunk). Each row is computed by the same code whatever the
chunking, so the results are bit-identical for every thread count. The pool belongs to the process that made it (a
forked DataLoader worker makes its own, if it ever asks for more than one thread).

Numba is an install dependency of ``bcls``, but this module is optional at run time (:mod:`.loss_kendall` imports it
on first use of the loss): :func:`get_kernels` returns ``None`` when Numba cannot be imported (e.g. a model loaded
with ``trust_remote_code`` in an environment without it) or when ``BCLS_DISABLE_NUMBA=1``, and the loss then runs
its pure-torch path. The kernels are compiled on first use (about a second each per dtype) and cached on disk by
Numba (module-level functions, so that the cache also serves kernels that call other kernels).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Callable, List, Optional, Tuple

from .openmp_team import openmp_team


try:  # (a try block: transformers' remote-code import check does not require what is imported here)
    import numba
    import numpy as np
except ImportError:
    numba = None


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)

    @_jit
    def descending_key(pattern):
        """The uint32 whose ascending order is the descending order of the float32 with bit pattern ``pattern``
        (an int32; finite), -0.0 and +0.0 alike; branch-free."""
        pattern = pattern if pattern != -2147483648 else 0  # -0.0 compares equal to +0.0
        pattern = pattern ^ ((pattern >> 31) & 0x7FFFFFFF)  # negative floats: int32 order == float order
        return np.uint32(~pattern) ^ np.uint32(0x80000000)

    @_jit
    def compact_keys(bits, keys, column_bits):
        """keys[q, c] = ``(descending_key(R[q, c]) - min_q) >> shift_q << column_bits | c`` (uint32) for the float32
        bit patterns ``bits`` [Nq, Nc], ``shift_q`` the smallest that fits the row's key range in the ``32 -
        column_bits`` high bits below their all-ones value, so that every key is below the ``0xFFFFFFFF`` that pads
        ``keys`` rows longer than ``Nc``. Ascending order of these keys is the stable descending order of the labels
        up to labels that share a truncated key, which :func:`finish_compact_sort` puts in order. (Unsigned loops:
        see :func:`gather_sorted`.)"""
        num_queries, num_candidates = bits.shape
        limit = np.uint32((1 << (32 - column_bits)) - 2)
        n = np.uint64(num_candidates)
        padded = np.uint64(keys.shape[1])
        for q in range(num_queries):
            row = keys[q]
            row_bits = bits[q]
            low = np.uint32(0xFFFFFFFF)
            high = np.uint32(0)
            for c in range(n):
                key = descending_key(row_bits[c])
                row[c] = key
                low = min(low, key)
                high = max(high, key)
            span = np.uint32(high - low)
            shift = np.uint32(0)
            while (span >> shift) > limit:
                shift += np.uint32(1)
            for c in range(n):
                row[c] = (np.uint32(row[c] - low) >> shift << np.uint32(column_bits)) | np.uint32(c)
            for c in range(n, padded):
                row[c] = np.uint32(0xFFFFFFFF)

    @_jit
    def merge_pair(source, target, low, middle, high):
        """target[low:high] = the merge of the ascending runs source[low:middle] and source[middle:high] (branch-free
        selection)."""
        i, j, k = low, middle, low
        one = np.uint64(1)
        while i < middle and j < high:
            first, second = source[i], source[j]
            take_first = np.uint64(first < second)
            target[k] = first if first < second else second
            i += take_first
            j += one - take_first
            k += one
        while i < middle:
            target[k] = source[i]
            i += one
            k += one
        while j < high:
            target[k] = source[j]
            j += one
            k += one

    @_jit
    def merge_runs(keys, run):
        """Each row of ``keys`` [Nq, L] sorted ascending from its ascending runs of ``run`` keys, by pairwise merges."""
        num_queries, length = keys.shape
        n = np.uint64(length)
        scratch = np.empty(length, keys.dtype)
        for q in range(num_queries):
            source, target = keys[q], scratch
            width = np.uint64(run)
            in_scratch = False
            while width < n:
                for low in range(np.uint64(0), n, np.uint64(2) * width):
                    merge_pair(source, target, low, min(low + width, n), min(low + np.uint64(2) * width, n))
                source, target = target, source
                width *= np.uint64(2)
                in_scratch = not in_scratch
            if in_scratch:
                keys[q, :] = scratch

    @_jit
    def finish_compact_sort(bits, keys, column_bits, order, budget):
        """order[q] = the stable descending order of the labels of row ``q`` from its ascending :func:`compact_keys`
        ``keys[q]``: their columns, then an insertion sort by (full key, column) of each key that shares its
        truncated key with its predecessor (the truncation is monotone, so nothing else can be out of order; the
        check per key is one comparison). A row needing more than ``budget`` moves (labels crowded within a few units
        in the last place) is sorted on unique 64-bit keys instead."""
        num_queries, num_candidates = bits.shape
        column_mask = np.uint32((1 << column_bits) - 1)
        n = np.uint64(num_candidates)
        one = np.uint64(1)
        for q in range(num_queries):
            row_order = order[q]
            row_keys = keys[q]
            row_bits = bits[q]
            shared = False
            for i in range(n):
                row_order[i] = row_keys[i] & column_mask
            for i in range(one, n):  # (vectorised: most rows share no truncated key)
                shared |= (row_keys[i] ^ row_keys[i - one]) <= column_mask
            if not shared:
                continue
            moves = 0
            for i in range(one, n):
                if (row_keys[i] ^ row_keys[i - one]) > column_mask:
                    continue  # a new truncated key: in order
                # the run of row_keys[i]'s truncated key ends at i; its members before i are in order already
                column = row_order[i]
                key = descending_key(row_bits[column])
                j = np.int64(i)
                while j > 0 and (row_keys[j - 1] ^ row_keys[i]) <= column_mask:
                    previous = row_order[j - 1]
                    previous_key = descending_key(row_bits[previous])
                    if previous_key < key or (previous_key == key and previous < column):
                        break
                    row_order[j] = previous
                    j -= 1
                row_order[j] = column
                moves += np.int64(i) - j
                if moves > budget:
                    break
            if moves > budget:  # unique (key, column) pairs: any sort of them is the stable one
                wide = np.empty(num_candidates, np.uint64)
                for c in range(num_candidates):
                    wide[c] = (np.uint64(descending_key(bits[q, c])) << np.uint64(32)) | np.uint64(c)
                wide.sort()
                for i in range(num_candidates):
                    row_order[i] = np.int64(wide[i] & np.uint64(0xFFFFFFFF))

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
    def label_windows(values, gap, order, start, status):
        """Window starts of every row (rows are gathered in sorted order into a small block buffer that stays in
        cache, then their starts are merged four at a time), for an ``order`` checked on the way to hold columns in
        ``[0, Nc)`` (``status = [3, row, position]`` on the first failure) that sort each row descending (``status
        = [2, row, position]``); ``status`` is ``[0, 0, 0]`` when every row passes."""
        num_queries, num_candidates = values.shape
        block = 4
        sorted_block = np.empty((block, num_candidates), values.dtype)
        status[:] = 0
        for first in range(0, num_queries, block):
            rows = min(block, num_queries - first)
            for r in range(rows):
                q = first + r
                sorted_values = sorted_block[r]
                for b in range(num_candidates):
                    column = order[q, b]
                    if column < 0 or column >= num_candidates:
                        status[0], status[1], status[2] = 3, q, b
                        return
                    sorted_values[b] = values[q, column]
                    if b > 0 and sorted_values[b] > sorted_values[b - 1]:
                        status[0], status[1], status[2] = 2, q, b - 1
                        return
            window_starts(sorted_block[:rows], gap, start[first : first + rows])

    @_jit
    def store_pair(q, a, d, column, hinge, temperature, need_grad, terms, partner, slope):
        """Row q, anchor a: its hardest pair's term ``max(d, 0)`` (hinge) or ``T softplus(d / T)`` at
        ``d = S(partner) - S(anchor)``, and for the backward the partner's column (-1: no gradient) and the slope
        (the hinge's slope is 1 on the partner, or there is no gradient at all: no slope array is written)."""
        if hinge:
            terms[q, a] = max(d, 0)
        else:
            x = d / temperature
            terms[q, a] = temperature * (max(x, 0) + np.log1p(np.exp(-abs(x))))
        if need_grad:
            if hinge:
                partner[q, a] = column if d > 0 else -1
            else:
                partner[q, a] = column
                slope[q, a] = 1 / (1 + np.exp(-d / temperature))

    @_jit
    def hardest_pairs(sim, order, start, width, hinge, temperature, need_grad, terms, partner, slope):
        """terms[q, a] = phi(max_{b in W_a} S[q, order[q, b]] - S[q, order[q, a]]) (0 for an empty window);
        when need_grad, partner[q, a] = column of the maximum (-1 where phi' = 0: empty window, or hinge with
        d <= 0) and, for the logistic surrogate only, slope[q, a] = phi'(d).

        Per row: the similarities in sorted order and a sliding maximum of width ``w`` by van Herk / Gil-Werman:
        with the row cut into blocks of ``w`` positions, the window ``[s, s + w)`` is the suffix of ``s``'s block
        (its maximum ``suffix[s]``) followed by a prefix of the next block (``prefix[s + w - 1]``, the positions
        past ``Nc`` reading ``-inf``), so two passes (prefix and suffix maxima within blocks) and one lookup per
        anchor, O(Nc) whatever ``w``. The (value, first position) maximum: ties keep the lower sorted position in
        both passes and in the combination. Unbounded windows are a suffix maximum of the whole row."""
        num_queries, num_candidates = sim.shape
        bounded = width < num_candidates
        length = num_candidates + width - 1 if bounded else num_candidates  # window ends s + w - 1 <= Nc + w - 2
        values = np.empty(length, sim.dtype)
        prefix = np.empty(length, sim.dtype)
        prefix_at = np.empty(length, np.int32)
        suffix = np.empty(num_candidates, sim.dtype)
        suffix_at = np.empty(num_candidates, np.int32)
        minus_inf = -np.inf
        for q in range(num_queries):
            for b in range(num_candidates):
                values[b] = sim[q, order[q, b]]
            for b in range(num_candidates, length):
                values[b] = minus_inf
            block = width if bounded else num_candidates
            for first in range(0, num_candidates, block):  # suffix maxima within blocks (real positions only)
                last = min(first + block, num_candidates) - 1
                best, at = values[last], last
                suffix[last], suffix_at[last] = best, at
                for j in range(last - 1, first - 1, -1):
                    value = values[j]
                    if value >= best:  # >=: the lower position on ties
                        best, at = value, j
                    suffix[j], suffix_at[j] = best, at
            if bounded:
                for first in range(width, length, width):  # prefix maxima within blocks (the first block is unused)
                    best, at = values[first], first
                    prefix[first], prefix_at[first] = best, at
                    for j in range(first + 1, min(first + width, length)):
                        value = values[j]
                        if value > best:  # >: the lower position on ties
                            best, at = value, j
                        prefix[j], prefix_at[j] = best, at
            for a in range(num_candidates):
                s = start[q, a]
                if s >= num_candidates:  # empty window
                    terms[q, a] = 0
                    if need_grad:
                        partner[q, a] = -1
                    continue
                best, at = suffix[s], suffix_at[s]
                if bounded and s % width != 0:  # the window also covers a prefix of the next block
                    end = s + width - 1
                    if prefix[end] > best:
                        best, at = prefix[end], prefix_at[end]
                d = best - values[a]
                store_pair(q, a, d, order[q, at], hinge, temperature, need_grad, terms, partner, slope)

    @_jit
    def hardest_pairs_f32(sim, order, start, width, hinge, temperature, need_grad, terms, partner, slope):
        """:func:`hardest_pairs` for float32 similarities, bit for bit, with branch-free maxima: each similarity in
        sorted order becomes the unique uint64 key ``monotone(S) << 32 | ~position`` (-0.0 and +0.0 alike), whose maximum
        is the largest similarity at its lowest position, so the block prefix and suffix maxima are plain ``max`` chains
        and the window maximum ``max(suffix[s], prefix[s + w - 1])`` (the pads past ``Nc`` have key 0). ``sim`` may be a
        strided view (the t2i direction reads ``sim.T`` in place)."""
        num_queries, num_candidates = sim.shape
        bounded = width < num_candidates
        length = num_candidates + width - 1 if bounded else num_candidates
        values = np.empty(num_candidates, np.float32)
        plus_zero = np.empty(num_candidates, np.float32)
        keys = np.zeros(length, np.uint64)  # the pads past Nc keep key 0, below every real key
        suffix = np.empty(num_candidates, np.uint64)
        prefix = np.empty(length, np.uint64)
        low_mask = np.uint64(0xFFFFFFFF)
        block = width if bounded else num_candidates
        for q in range(num_queries):
            for b in range(num_candidates):
                values[b] = sim[q, order[q, b]]
            position_keys(values, plus_zero, keys)
            for first in range(0, num_candidates, block):
                last = min(first + block, num_candidates) - 1
                best = keys[last]
                suffix[last] = best
                for j in range(last - 1, first - 1, -1):
                    best = max(best, keys[j])
                    suffix[j] = best
            if bounded:
                for first in range(0, length, width):
                    best = keys[first]
                    prefix[first] = best
                    for j in range(first + 1, min(first + width, length)):
                        best = max(best, keys[j])
                        prefix[j] = best
            for a in range(num_candidates):
                s = start[q, a]
                if s >= num_candidates:
                    terms[q, a] = 0
                    if need_grad:
                        partner[q, a] = -1
                    continue
                key = suffix[s]
                if bounded:
                    key = max(key, prefix[s + width - 1])
                at = np.int64(~key & low_mask)
                d = values[at] - values[a]
                store_pair(q, a, d, order[q, at], hinge, temperature, need_grad, terms, partner, slope)

    @_jit
    def lean_start_step(row, out, a, p, num_candidates, gap):
        """One step of the two-pointer merge of a descending row padded with ``row[Nc] = -inf``: the partner pointer
        ``p`` passes a position within the gap of anchor ``a`` (``R_a - R_p <= g``, always true for ``p <= a``), or
        ``a`` is done (``out[a] = p``: the first position past the gap, where the ``-inf`` pad stops ``p``). A finished
        row (``a = Nc``) stays put, so rows of different lengths of work run in lockstep; ``out`` has ``Nc + 1``
        entries."""
        live = np.uint64(a < num_candidates)
        within = np.uint64(row[a] - row[p] <= gap) & live
        out[a] = p
        return a + live - within, p + within

    @_jit
    def lockstep_window_starts(sorted_rel, num_candidates, gap, start, rows):
        """start[r, a] for the first ``rows`` of 8 padded descending rows ``sorted_rel`` [8, Nc + 1] (``-inf`` at
        ``Nc``), merged in lockstep (eight independent dependency chains); ``start`` is int [8, Nc + 1]."""
        n = np.uint64(num_candidates)  # unsigned positions: no negative-index wraparound in the chains
        r0, r1, r2, r3 = sorted_rel[0], sorted_rel[1], sorted_rel[2], sorted_rel[3]
        r4, r5, r6, r7 = sorted_rel[4], sorted_rel[5], sorted_rel[6], sorted_rel[7]
        o0, o1, o2, o3, o4, o5, o6, o7 = start[0], start[1], start[2], start[3], start[4], start[5], start[6], start[7]
        zero = np.uint64(0)
        a0 = zero  # rows past ``rows`` start finished
        a1 = zero if rows > 1 else n
        a2 = zero if rows > 2 else n
        a3 = zero if rows > 3 else n
        a4 = zero if rows > 4 else n
        a5 = zero if rows > 5 else n
        a6 = zero if rows > 6 else n
        a7 = zero if rows > 7 else n
        p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = zero
        while (a0 < n) | (a1 < n) | (a2 < n) | (a3 < n) | (a4 < n) | (a5 < n) | (a6 < n) | (a7 < n):
            a0, p0 = lean_start_step(r0, o0, a0, p0, n, gap)
            a1, p1 = lean_start_step(r1, o1, a1, p1, n, gap)
            a2, p2 = lean_start_step(r2, o2, a2, p2, n, gap)
            a3, p3 = lean_start_step(r3, o3, a3, p3, n, gap)
            a4, p4 = lean_start_step(r4, o4, a4, p4, n, gap)
            a5, p5 = lean_start_step(r5, o5, a5, p5, n, gap)
            a6, p6 = lean_start_step(r6, o6, a6, p6, n, gap)
            a7, p7 = lean_start_step(r7, o7, a7, p7, n, gap)

    @_jit
    def block_rows(matrix, first, rows, block):
        """block[r, c] = matrix[first + r, c] for r < rows, read column by column (contiguous for a transposed view)."""
        for c in range(matrix.shape[1]):
            for r in range(rows):
                block[r, c] = matrix[first + r, c]

    @_jit
    def gather_sorted(source, row, columns, out):
        """out[b] = source[row, columns[b]] (columns already checked to lie in range).

        Here and in the helpers below, loops and indices are unsigned: a signed index costs Numba a wraparound
        test per access, which also keeps LLVM from vectorising the loop (4x slower elementwise maxima)."""
        for b in range(np.uint64(columns.shape[0])):
            out[b] = source[row, np.uint64(columns[b])]

    @_jit
    def any_outside(columns, n):
        """Whether a column index lies outside ``[0, n)``."""
        outside = False
        for b in range(np.uint64(columns.shape[0])):
            column = columns[b]
            outside |= (column < 0) | (column >= n)
        return outside

    @_jit
    def any_increasing(values):
        """Whether ``values[b + 1] > values[b]`` anywhere (a row that is not descending)."""
        increasing = False
        one = np.uint64(1)
        for b in range(np.uint64(max(values.shape[0] - 1, 0))):
            increasing |= values[b + one] > values[b]
        return increasing

    @_jit
    def position_keys(values, plus_zero, keys):
        """keys[b] = ``monotone(values[b]) << 32 | ~b`` (uint64; -0.0 as +0.0): the largest key is the largest value
        at its lowest position. ``plus_zero`` is scratch of the length of ``values``."""
        bits = plus_zero.view(np.int32)
        low_mask = np.uint64(0xFFFFFFFF)
        n = np.uint64(values.shape[0])
        for b in range(n):
            plus_zero[b] = values[b] + np.float32(0.0)  # -0.0 -> +0.0
        for b in range(n):
            pattern_bits = bits[b]
            pattern_bits = pattern_bits ^ ((pattern_bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
            mono = np.uint64(np.uint32(pattern_bits) ^ np.uint32(0x80000000))
            keys[b] = (mono << np.uint64(32)) | (~b & low_mask)

    @_jit
    def move_row(source, target):
        """target[:] = source; source[:] = 0."""
        for j in range(np.uint64(source.shape[0])):
            target[j] = source[j]
            source[j] = 0

    @_jit
    def elementwise_max(first, second, out):
        """out[j] = max(first[j], second[j]) (vectorised)."""
        for j in range(np.uint64(out.shape[0])):
            out[j] = max(first[j], second[j])

    @_jit
    def fused_hardest_pairs(rel, sim, order, gap, width, hinge, temperature, need_grad, row_sums, pattern, counts,
                            status):
        """The whole hard-mined loss of every row in one pass per row: the terms of :func:`label_windows` (given
        order) followed by :func:`hardest_pairs_f32`, without their ``[Nq, Nc]`` window starts, terms or partners.

        Per group of 8 rows: the given ``order`` checked (columns in ``[0, Nc)``, labels descending; on the first
        failing row ``status = [1, row, 0]`` and nothing else is promised), the labels and float32 similarities
        gathered in sorted order, the window starts of the 8 rows merged in lockstep (:func:`lean_start_step`); then
        per row the packed keys ``monotone(S) << 32 | ~position`` and a sliding maximum of width ``w`` by doubling
        (``floor(log2 w)`` vectorised elementwise maxima, the window ``[s, s + w)`` being ``max(M[s], M[s + w - p])``
        with ``p`` the largest power of two <= w; unbounded windows: a suffix maximum), then per anchor with a
        non-empty window (a prefix of the row: ``start`` is non-decreasing) its term ``phi(d)`` (float32, as
        :func:`store_pair`), added in float64 to ``row_sums[q]``. ``counts[q]`` = the number of anchors of row ``q``
        with a non-empty window.

        ``need_grad``: ``pattern[q]`` = d row_sums[q] / d sim[q] (``+phi'(d)`` at the partner's column and
        ``-phi'(d)`` at the anchor's, summed; ``pattern * g`` rounds once where scattering ``+-phi'(d) g`` rounds per
        term); ``pattern`` is row-major. ``rel`` and ``sim`` may be strided views: a
        transposed one (the t2i direction) is read in blocks of 8 columns, no transposing copy of the matrix."""
        num_queries, num_candidates = sim.shape
        n = num_candidates
        group = 8
        sorted_rel = np.empty((group, n + 1), rel.dtype)
        for r in range(group):
            sorted_rel[r, n] = -np.inf
        values = np.empty((group, n), np.float32)
        start = np.empty((group, n + 1), np.int32)
        bounded = width < n
        length = n + width - 1 if bounded else n
        keys = np.empty(length, np.uint64)
        other = np.empty(length, np.uint64)
        plus_zero = np.empty(n, np.float32)
        low_mask = np.uint64(0xFFFFFFFF)
        status[0] = 0
        # a transposed view (the t2i direction) is read column by column into a block of rows: contiguous reads
        rel_by_columns = num_queries > 1 and rel.strides[0] < rel.strides[1]
        sim_by_columns = num_queries > 1 and sim.strides[0] < sim.strides[1]
        rel_block = np.empty((group, n if rel_by_columns else 0), rel.dtype)
        sim_block = np.empty((group, n if sim_by_columns else 0), sim.dtype)
        pattern_block = np.zeros((group, n if need_grad else 0), np.float32)
        for first in range(0, num_queries, group):
            rows = min(group, num_queries - first)
            if rel_by_columns:
                block_rows(rel, first, rows, rel_block)
            if sim_by_columns:
                block_rows(sim, first, rows, sim_block)
            for r in range(rows):
                q = first + r
                if any_outside(order[q], n):
                    status[0], status[1], status[2] = 1, q, 0
                    return
                row_rel = sorted_rel[r]
                row_values = values[r]
                if rel_by_columns:
                    gather_sorted(rel_block, r, order[q], row_rel)
                else:
                    gather_sorted(rel, q, order[q], row_rel)
                if sim_by_columns:
                    gather_sorted(sim_block, r, order[q], row_values)
                else:
                    gather_sorted(sim, q, order[q], row_values)
                if any_increasing(row_rel[:n]):
                    status[0], status[1], status[2] = 1, q, 0
                    return
            lockstep_window_starts(sorted_rel, n, gap, start, rows)
            for r in range(rows):
                q = first + r
                row_values = values[r]
                row_start = start[r]
                row_order = order[q]
                keys[n:] = 0  # the pads past Nc: key 0, below every real key
                position_keys(row_values, plus_zero, keys)
                window_max = keys
                span = 1
                if bounded:
                    valid = length
                    source, target = keys, other
                    while 2 * span <= width:  # target[j] = max over [j, j + 2 span)
                        valid -= span
                        elementwise_max(source[:valid], source[span : span + valid], target[:valid])
                        source, target = target, source
                        span *= 2
                    window_max = source
                else:
                    for j in range(n - 2, -1, -1):
                        keys[j] = max(keys[j], keys[j + 1])
                tail = width - span
                count = 0
                while count < n and row_start[count] < n:
                    count += 1
                counts[q] = count
                tail_max = window_max[tail:]
                grad_row = pattern_block[r]
                total = 0.0
                for a in range(np.uint64(count)):
                    s = np.uint64(row_start[a])
                    key = window_max[s]
                    if bounded:
                        key = max(key, tail_max[s])
                    at = ~key & low_mask
                    d = row_values[at] - row_values[a]
                    if hinge:
                        total += max(d, np.float32(0))
                        slope = np.float32(d > 0)  # (branch-free: d > 0 is a coin flip for the branch predictor)
                    else:
                        x = d / temperature  # the term and slope rounded to float32, as store_pair stores them
                        total += np.float32(temperature * (max(x, 0) + np.log1p(np.exp(-abs(x)))))
                        slope = np.float32(1 / (1 + np.exp(-d / temperature)))
                    if need_grad:
                        grad_row[np.uint64(row_order[at])] += slope
                        grad_row[np.uint64(row_order[a])] -= slope
                row_sums[q] = total
            if need_grad:
                for r in range(rows):
                    move_row(pattern_block[r], pattern[first + r])

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


_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_key = (0, 0)  # (process id, workers) of _pool: a forked child (a DataLoader worker) makes its own


def _executor(workers: int) -> ThreadPoolExecutor:
    """The module's persistent thread pool with at least ``workers`` threads, created in this process."""
    global _pool, _pool_key
    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool_key[0] != pid or _pool_key[1] < workers:
            if _pool is not None and _pool_key[0] == pid:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="bcls-kendall")
            _pool_key = (pid, workers)
        return _pool


def row_chunks(num_rows: int, threads: int, multiple: int = 1) -> List[Tuple[int, int]]:
    """At most ``threads`` contiguous ``(first, end)`` row ranges covering ``[0, num_rows)``, their sizes multiples
    of ``multiple`` (but the last)."""
    if num_rows <= 0:
        return [(0, 0)]
    threads = max(1, min(threads, num_rows))
    size = -(-num_rows // threads)
    size = -(-size // multiple) * multiple
    return [(first, min(first + size, num_rows)) for first in range(0, num_rows, size)]


def over_rows(call: Callable[[int, int], object], num_rows: int, threads: int, multiple: int = 1) -> list:
    """``[call(first, end) for each row chunk]``, the chunks run concurrently on ``threads`` threads: the OpenMP team
    of torch's ops where :func:`.openmp_team.openmp_team` finds it (its idle workers spin for milliseconds after each
    torch op; a thread of our own would share a core with one), else this module's pool (the calling thread takes the
    first chunk). The kernels release the GIL and rows are independent, so the results are those of one call over
    all rows, bit for bit."""
    chunks = row_chunks(num_rows, threads, multiple)
    if len(chunks) == 1:
        return [call(*chunks[0])]
    team = openmp_team()
    if team is not None:
        return team.map(call, chunks)
    futures = [_executor(len(chunks) - 1).submit(call, *chunk) for chunk in chunks[1:]]
    first = call(*chunks[0])
    return [first] + [future.result() for future in futures]


def _sorted_order(bits, order) -> None:
    """order (int64 [Nq, Nc]) = each row's stable descending order of the float32 labels with bit patterns ``bits``,
    in blocks of rows that stay in cache: :func:`compact_keys`, NumPy's sort of them (GIL released; on x86-64 a SIMD
    sorting network for runs of up to 512 uint32 keys, several times faster than on uint64 keys; longer rows are
    sorted in runs of 512, padded with all-ones keys, then merged by :func:`merge_runs`: a third faster than NumPy's
    sort of the whole row at Nc = 2048), then :func:`finish_compact_sort`."""
    num_queries, num_candidates = order.shape
    column_bits = max(1, (num_candidates - 1).bit_length())
    run = _SORT_RUN
    padded = num_candidates if num_candidates <= run else -(-num_candidates // run) * run
    block = max(1, min(num_queries, _SORT_BLOCK_ELEMENTS // max(padded, 1)))
    keys = np.empty((block, padded), np.uint32)
    budget = _INSERTION_BUDGET * num_candidates
    for first in range(0, num_queries, block):
        end = min(first + block, num_queries)
        block_keys = keys[: end - first]
        compact_keys(bits[first:end], block_keys, column_bits)
        if padded > run:
            block_keys.reshape(-1, run).sort(axis=1)
            merge_runs(block_keys, run)
        else:
            block_keys.sort(axis=1)
        finish_compact_sort(bits[first:end], block_keys, column_bits, order[first:end], budget)


_SORT_RUN = 512  # keys NumPy sorts at once: its sorting network's size for uint32 (AVX-512)
_SORT_BLOCK_ELEMENTS = 1 << 16  # keys sorted together: a block that stays in cache
_INSERTION_BUDGET = 2  # moves per label of the compact sort's insertion pass before a row is sorted on wide keys


def _sort_rows_descending(bits, order, threads: int = 1) -> None:
    """order[q] = ``torch.sort(R[q], descending=True, stable=True).indices`` for the float32 bit patterns ``bits``
    [Nq, Nc] (int32 view of finite labels ``R``)."""
    over_rows(lambda i, j: _sorted_order(bits[i:j], order[i:j]), order.shape[0], threads)


def _window_starts(sorted_rel, gap, start, threads: int = 1) -> None:
    over_rows(lambda i, j: window_starts(sorted_rel[i:j], gap, start[i:j]), start.shape[0], threads, 4)


_LABEL_BLOCK_ELEMENTS = 1 << 16  # rows sorted, then windowed, together: a block that stays in cache


def _label_windows(bits, values, gap, given_order, order, start, status, threads: int = 1) -> None:
    """Sort order (unless ``given_order``: then checked) and window starts of every row, over row chunks in
    blocks of about ``_LABEL_BLOCK_ELEMENTS``; ``status`` reports the first failing row of all of them."""
    num_queries, num_candidates = values.shape
    block = max(4, _LABEL_BLOCK_ELEMENTS // max(num_candidates, 1) // 4 * 4)

    def chunk(i, j):
        chunk_status = np.zeros(3, status.dtype)
        for first in range(i, j, block):
            end = min(first + block, j)
            if not given_order:
                _sorted_order(bits[first:end], order[first:end])
            label_windows(values[first:end], gap, order[first:end], start[first:end], chunk_status)
            if chunk_status[0]:
                chunk_status[1] += first
                break
        return chunk_status

    failed = [chunk_status for chunk_status in over_rows(chunk, num_queries, threads, 4) if chunk_status[0]]
    status[:] = failed[0] if failed else 0


def _hardest_pairs(sim, order, start, width, hinge, temperature, need_grad, terms, partner, slope, threads: int = 1):
    kernel = hardest_pairs_f32 if sim.dtype == np.float32 else hardest_pairs

    def chunk(i, j):
        kernel(
            sim[i:j], order[i:j], start[i:j], width, hinge, temperature, need_grad, terms[i:j],
            partner[i:j] if need_grad else partner, slope[i:j] if slope.shape[0] else slope,
        )

    over_rows(chunk, sim.shape[0], threads)


def _fused_hardest_pairs(
    rel, sim, order, gap, width, hinge, temperature, need_grad, row_sums, pattern, counts, status, threads: int = 1
) -> None:
    """:func:`fused_hardest_pairs` over row chunks (multiples of its 8-row groups); ``status`` reports the first
    failing row of all of them."""

    def chunk(i, j):
        chunk_status = np.zeros(3, status.dtype)
        fused_hardest_pairs(
            rel[i:j], sim[i:j], order[i:j], gap, width, hinge, temperature, need_grad, row_sums[i:j],
            pattern[i:j] if need_grad else pattern, counts[i:j], chunk_status,
        )
        if chunk_status[0]:
            chunk_status[1] += i
        return chunk_status

    failed = [chunk_status for chunk_status in over_rows(chunk, sim.shape[0], threads, 8) if chunk_status[0]]
    status[:] = failed[0] if failed else 0


def _hardest_pairs_backward(grad_terms, order, partner, hinge, slope, grad_sim, threads: int = 1) -> None:
    def chunk(i, j):
        hardest_pairs_backward(
            grad_terms[i:j], order[i:j], partner[i:j], hinge, slope[i:j] if slope.shape[0] else slope, grad_sim[i:j]
        )

    over_rows(chunk, grad_sim.shape[0], threads)


_KERNELS = None
if numba is not None:
    _KERNELS = SimpleNamespace(
        sort_rows_descending=_sort_rows_descending,
        label_windows=_label_windows,
        window_starts=_window_starts,
        hardest_pairs=_hardest_pairs,
        hardest_pairs_backward=_hardest_pairs_backward,
        fused_hardest_pairs=_fused_hardest_pairs,
    )


def get_kernels() -> Optional[SimpleNamespace]:
    """The compiled kernels (each taking a trailing ``threads`` count), or ``None`` when Numba is unavailable or
    ``BCLS_DISABLE_NUMBA`` is set to a true value."""
    if os.environ.get("BCLS_DISABLE_NUMBA", "").lower() in ("1", "true", "yes"):
        return None
    return _KERNELS
