"""Rows of cached tower outputs, keyed by strings, in memory or persisted as safetensors shards + a JSON manifest.

A row is a tensor whose first dimension may differ from row to row (a caption's token states ``[L_i, H]``) or is 1
(a pooled vector ``[1, D]``, a feature map ``[1, C, h, w]``). Rows are stored *packed*: one ``values`` tensor
``[Σ L_i, ...]`` and ``lengths`` ``[N]``; row ``i`` is ``values[offsets[i] : offsets[i] + lengths[i]]``.

On disk, a store folder holds ``manifest.json`` (``context``: what the rows were computed with, ``keys``, and the
shards) and ``shard-NNNNN.safetensors`` files (``values`` + ``lengths``), each written whole before the manifest
is replaced (``os.replace``), so a killed run leaves the previous manifest valid. `FeatureStore.open` memory-maps the
shards' ``values`` (numpy memmap on the safetensors data section, copy-on-write) when asked, so a store larger than
memory is read page by page.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

MANIFEST = "manifest.json"
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


class PackedRows:
    """Packed rows (module docstring): ``values`` [Σ lengths, ...] and ``lengths`` [N] (int64)."""

    def __init__(self, values: torch.Tensor, lengths: torch.Tensor):
        self.values, self.lengths = values, lengths.to(torch.int64)
        self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(self.lengths, 0, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        if isinstance(self.values, np.ndarray):
            return int(self.values.nbytes)
        return self.values.numel() * self.values.element_size()

    @classmethod
    def concat(cls, parts: list["PackedRows"]) -> "PackedRows":
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.values for p in parts]), torch.cat([p.lengths for p in parts]))

    def _gather(self, index: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(self.values, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(self.values[np.asarray(index)]))
        return self.values[torch.as_tensor(index)]

    def stacked(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of length 1 as one tensor [len(rows), ...]."""
        return self._gather(self.offsets[rows])

    def padded(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as a zero-padded batch [len(rows), max length, ...] and its mask [len(rows), max length] (int64)."""
        starts, lengths = self.offsets[rows], self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        position = torch.arange(width)
        mask = position[None, :] < lengths[:, None]
        index = (starts[:, None] + position[None, :]).clamp(max=max(int(self.offsets[-1]) - 1, 0))
        gathered = self._gather(index)
        keep = mask.reshape(*mask.shape, *([1] * (gathered.dim() - 2))).to(gathered.dtype)
        return gathered * keep, mask.long()

    def to_torch(self) -> "PackedRows":
        """The same rows with `values` read into memory."""
        if isinstance(self.values, np.ndarray):
            return PackedRows(torch.from_numpy(np.ascontiguousarray(self.values)), self.lengths)
        return self


class ShardedRows:
    """Several `PackedRows` read as one (rows numbered across the parts in order): memory-mapped shards stay apart."""

    def __init__(self, parts: list[PackedRows]):
        self.parts = [p for p in parts if len(p)]
        sizes = torch.tensor([len(p) for p in self.parts], dtype=torch.int64)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        self.lengths = torch.cat([p.lengths for p in self.parts]) if self.parts else torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def to_torch(self) -> PackedRows:
        """The rows read into memory as one `PackedRows`."""
        return PackedRows.concat([p.to_torch() for p in self.parts])

    def _split(self, rows: torch.Tensor):
        part = torch.searchsorted(self.starts, rows, right=True) - 1
        for k in torch.unique(part).tolist():
            where = (part == k).nonzero().flatten()
            yield where, self.parts[k], rows[where] - self.starts[k]

    def stacked(self, rows: torch.Tensor) -> torch.Tensor:
        out = None
        for where, part, local in self._split(rows):
            values = part.stacked(local)
            out = values.new_empty((len(rows), *values.shape[1:])) if out is None else out
            out[where] = values
        return out

    def padded(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(self.lengths[rows].max())
        out = mask = None
        for where, part, local in self._split(rows):
            values, part_mask = part.padded(local)
            if out is None:
                out = values.new_zeros((len(rows), width, *values.shape[2:]))
                mask = torch.zeros((len(rows), width), dtype=torch.long)
            out[where, : values.shape[1]] = values
            mask[where, : values.shape[1]] = part_mask
        return out, mask


def _memmap_safetensors(path: Path, name: str) -> np.ndarray:
    """Memory-map tensor `name` of a safetensors file (copy-on-write numpy array; nothing is read yet)."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    entry = header[name]
    start, end = entry["data_offsets"]
    dtype = _NUMPY_DTYPES[entry["dtype"]]
    count = (end - start) // np.dtype(dtype).itemsize
    flat = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_size + start, shape=(count,))
    return flat.reshape(entry["shape"])


class FeatureStore:
    """A folder of packed rows for one context (what they were computed with); see the module docstring."""

    def __init__(self, folder: str | Path, context: dict):
        self.folder, self.context = Path(folder), context
        self.keys: list[str] = []
        self.shards: list[dict] = []

    @classmethod
    def open(cls, folder: str | Path, context: dict) -> "FeatureStore":
        """The store in `folder` (empty when missing or written with another context)."""
        store = cls(folder, context)
        manifest = store.folder / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            if data.get("context") == context and all((store.folder / s["file"]).is_file() for s in data.get("shards", [])):
                store.keys, store.shards = list(data["keys"]), list(data["shards"])
        return store

    def load(self, memory_map: bool) -> "PackedRows | ShardedRows | None":
        """Every row of the store, in key order (memory-mapped values when `memory_map`)."""
        parts = []
        for shard in self.shards:
            path = self.folder / shard["file"]
            lengths = torch.from_numpy(np.array(_memmap_safetensors(path, "lengths")))
            values = _memmap_safetensors(path, "values")
            parts.append(PackedRows(values if memory_map else torch.from_numpy(np.array(values)), lengths))
        if not parts:
            return None
        return ShardedRows(parts) if memory_map else PackedRows.concat(parts)

    def append(self, keys: list[str], rows: PackedRows) -> None:
        """Write `rows` (for `keys`) as a new shard, then the manifest (one `os.replace`)."""
        if not keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{len(self.shards):05d}.safetensors"
        values = rows.values if isinstance(rows.values, torch.Tensor) else torch.from_numpy(np.array(rows.values))
        save_file({"values": values.contiguous(), "lengths": rows.lengths.contiguous()}, str(self.folder / name))
        self.keys += keys
        self.shards.append({"file": name, "rows": len(keys)})
        manifest = {"context": self.context, "keys": self.keys, "shards": self.shards}
        temporary = self.folder / f"{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest), encoding="utf-8")
        os.replace(temporary, self.folder / MANIFEST)


__all__ = ["FeatureStore", "PackedRows", "ShardedRows"]
