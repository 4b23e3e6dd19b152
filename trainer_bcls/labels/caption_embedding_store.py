"""A bounded on-disk cache of caption embeddings keyed by caption text, for labels computed as captions arrive.

Layout: ``<cache_dir>/<embedder digest>/part-<pid>-<n>-<time>.safetensors``, each part holding

    digests     uint8 [n, 16]     the first 16 bytes of sha256(caption text, UTF-8)
    embeddings  float32 [n, D]    L2-normalised rows, in the same order

plus the embedder's ``cache_key`` in the safetensors metadata. No pickle; every process (and every DataLoader
worker) reads the parts present when it first looks a caption up, keeps new embeddings in memory and writes them as
a new part of its own (an atomic rename: no locks, readers never see half a part) every ``flush_every`` new rows and
at exit. Bounds: ``max_cache_gb`` on disk (past it no part is written: the cache stops growing, logged once) and
``max_memory_rows`` in memory (oldest rows dropped first); a caption missing from both is simply embedded again.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import multiprocessing.util
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CaptionEmbeddingStore", "caption_digest"]

DIGEST_BYTES = 16


def caption_digest(caption: str) -> bytes:
    """The cache key of a caption: the first 16 bytes of sha256 of its UTF-8 text (exact text, no normalisation)."""
    return hashlib.sha256(caption.encode("utf-8")).digest()[:DIGEST_BYTES]


def _flush_ref(ref: weakref.ref) -> None:
    store = ref()
    if store is not None:
        store.flush()


class CaptionEmbeddingStore:
    """``get(digests) / put(digests, rows)`` over memory and a folder of safetensors parts (see the module doc).

    Args:
        folder: the cache folder of one embedder (``None``: memory only).
        embedder_key: written into and checked against each part's metadata (parts of other embedders are ignored).
        max_cache_gb: on-disk bound of the folder; ``0`` never writes.
        max_memory_rows: in-memory bound (rows), oldest first out.
        flush_every: new rows kept in memory before they are written as a part.
    """

    def __init__(
        self,
        folder: str | os.PathLike | None,
        embedder_key: str,
        max_cache_gb: float = 2.0,
        max_memory_rows: int = 500_000,
        flush_every: int = 4096,
    ):
        self.folder = Path(folder) if folder is not None else None
        self.embedder_key = embedder_key
        self.max_bytes = int(max_cache_gb * 2**30)
        self.max_memory_rows = max_memory_rows
        self.flush_every = flush_every
        self._reset()

    def _reset(self) -> None:
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._pending: list[tuple[bytes, np.ndarray]] = []
        self._loaded_pid: int | None = None
        self._parts_written = 0
        self._full_logged = False
        self.num_read = 0  # rows read from disk parts by this process

    def __getstate__(self) -> dict:  # a copy for a worker process starts empty and reads the parts itself
        state = self.__dict__.copy()
        state.update(_rows=OrderedDict(), _pending=[], _loaded_pid=None)
        return state

    def __len__(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        pid = os.getpid()
        if self._loaded_pid == pid:
            return
        if self._loaded_pid is not None:  # a forked copy: the parent's unwritten rows are the parent's to write
            self._pending = []
        self._loaded_pid = pid
        ref = weakref.ref(self)
        atexit.register(_flush_ref, ref)  # the main process
        multiprocessing.util.Finalize(self, _flush_ref, args=(ref,), exitpriority=10)  # DataLoader workers
        if self.folder is None or not self.folder.is_dir():
            return
        from safetensors import safe_open

        for path in sorted(self.folder.glob("part-*.safetensors")):
            try:
                with safe_open(str(path), framework="np") as f:
                    if (f.metadata() or {}).get("embedder_key") != self.embedder_key:
                        continue
                    digests, rows = f.get_tensor("digests"), f.get_tensor("embeddings")
            except Exception as err:  # a damaged part is ignored (its captions are embedded again)
                logger.warning("ignoring unreadable caption-embedding part %s: %s", path, err)
                continue
            for digest, row in zip(digests, rows):
                self._remember(digest.tobytes(), row)
            self.num_read += len(rows)

    def _remember(self, digest: bytes, row: np.ndarray) -> None:
        self._rows[digest] = row
        self._rows.move_to_end(digest)
        while len(self._rows) > self.max_memory_rows:
            self._rows.popitem(last=False)

    def get(self, digests: list[bytes]) -> list[np.ndarray | None]:
        """The cached row of each digest, or ``None``."""
        self._ensure_loaded()
        return [self._rows.get(d) for d in digests]

    def put(self, digests: list[bytes], rows: np.ndarray) -> None:
        """Remember new rows (and write a part once ``flush_every`` are waiting)."""
        self._ensure_loaded()
        for digest, row in zip(digests, np.asarray(rows, dtype=np.float32)):
            self._remember(digest, row)
            self._pending.append((digest, row))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def disk_bytes(self) -> int:
        if self.folder is None or not self.folder.is_dir():
            return 0
        return sum(entry.stat().st_size for entry in os.scandir(self.folder) if entry.name.startswith("part-"))

    def flush(self) -> Path | None:
        """Write the waiting rows as one part, unless that would take the folder past ``max_cache_gb``."""
        if not self._pending or self.folder is None or self._loaded_pid != os.getpid():
            return None
        pending, self._pending = self._pending, []
        digests = np.frombuffer(b"".join(d for d, _ in pending), dtype=np.uint8).reshape(len(pending), DIGEST_BYTES)
        rows = np.stack([r for _, r in pending]).astype(np.float32)
        size = digests.nbytes + rows.nbytes + 1024
        if self.disk_bytes() + size > self.max_bytes:
            if not self._full_logged:
                logger.warning("caption-embedding cache %s is at its limit (%.2f GiB): new embeddings are not "
                               "written", self.folder, self.max_bytes / 2**30)
                self._full_logged = True
            return None
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{os.getpid()}-{self._parts_written:05d}-{time.time_ns()}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.folder)
        os.close(fd)
        try:
            save_file({"digests": digests, "embeddings": rows}, tmp,
                      metadata={"embedder_key": self.embedder_key, "rows": str(len(rows))})
            os.replace(tmp, self.folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._parts_written += 1
        return self.folder / name
