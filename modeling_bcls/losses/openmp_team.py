"""Row chunks of the compiled Kendall kernels run on the OpenMP threads that torch's CPU ops already use.

torch runs its CPU ops on an OpenMP team of ``torch.get_num_threads()`` threads. After each parallel op the idle
workers of that team keep spinning for a few milliseconds (the runtime's active wait: about 7 ms of CPU time after a
512 × 512 matmul, measured with GNU libgomp). A chunk handed to a thread of our own in that time shares its core with
a spinning worker and runs at half speed: at B = 512 two threads took as long as one. Handing the chunks to that very
team (``GOMP_parallel``, the entry point GCC emits for ``#pragma omp parallel``, which GNU libgomp, LLVM libomp and
Intel libiomp5 all export) puts them on the threads that are waiting for work: no oversubscription, no contention.

The chunk functions are Python callables run through one ctypes callback: each team thread takes the GIL for the
call's glue, and the compiled kernels (``nogil``) release it while they run. ``GOMP_parallel`` is called through
``ctypes.CDLL``, which releases the GIL, and the calling thread runs chunk 0 itself.

:func:`openmp_team` is None, and callers use a thread pool of their own, where this does not apply: no OpenMP runtime
mapped into the process (torch built with its native thread pool, or not on Linux), ``BCLS_DISABLE_OPENMP_TEAM=1``,
or a process forked after this module was imported (GNU libgomp's team is not fork-safe: a forked child must not
wait on its parent's threads, which is also why torch gives DataLoader workers one thread).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple


_RUNTIME_NAME = re.compile(r"^lib(gomp|omp|iomp5)\b[^/]*\.so(\.\d+)*$")
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_IMPORT_PID = os.getpid()


def _mapped_runtimes() -> List[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux ``/proc/self/maps``), torch's own first."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5 and "omp" in line}
    except OSError:
        return []
    found = [path for path in paths if _RUNTIME_NAME.match(os.path.basename(path))]
    return sorted(found, key=lambda path: ("torch" not in path, path))


class OpenMPTeam:
    """Runs ``call(first, end)`` for each of a few row chunks on the OpenMP team of the runtime at ``path``."""

    def __init__(self, path: str):
        library = ctypes.CDLL(path)  # the loaded library: dlopen returns the handle torch's ops use
        self.path = path
        self._parallel = library.GOMP_parallel
        self._parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None
        self._thread_num = library.omp_get_thread_num
        self._thread_num.restype = ctypes.c_int
        self._callback = _CALLBACK(self._run_chunk)  # kept alive with the team
        self._jobs: Dict[int, Tuple[Callable, Sequence[Tuple[int, int]], list]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _run_chunk(self, job_id: Optional[int]) -> None:
        call, chunks, results = self._jobs[job_id]
        index = self._thread_num()
        if index < len(chunks):  # (a runtime may give fewer threads, never more: the caller checks)
            try:
                results[index] = (True, call(*chunks[index]))
            except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
                results[index] = (False, error)

    def map(self, call: Callable[[int, int], object], chunks: Sequence[Tuple[int, int]]) -> list:
        """``[call(first, end) for (first, end) in chunks]``, one chunk per team thread, concurrently; the first
        exception of a chunk is raised here."""
        results: list = [None] * len(chunks)
        with self._lock:
            job_id = next(self._ids)
            self._jobs[job_id] = (call, chunks, results)
        try:
            self._parallel(self._callback, job_id, len(chunks), 0)
        finally:
            with self._lock:
                del self._jobs[job_id]
        for index, result in enumerate(results):
            if result is None:  # the runtime ran fewer threads than asked: this chunk here
                results[index] = (True, call(*chunks[index]))
            elif not result[0]:
                raise result[1]
        return [value for _, value in results]


_team: Optional[OpenMPTeam] = None
_team_searched = False
_team_lock = threading.Lock()


def openmp_team() -> Optional[OpenMPTeam]:
    """The :class:`OpenMPTeam` of torch's OpenMP runtime, or None where it does not apply (see the module doc)."""
    global _team, _team_searched
    if os.getpid() != _IMPORT_PID or os.environ.get("BCLS_DISABLE_OPENMP_TEAM", "").lower() in ("1", "true", "yes"):
        return None
    with _team_lock:
        if not _team_searched:
            _team_searched = True
            for path in _mapped_runtimes():
                try:
                    _team = OpenMPTeam(path)
                    break
                except (OSError, AttributeError):  # not loadable, or without the GOMP entry points
                    continue
        return _team
