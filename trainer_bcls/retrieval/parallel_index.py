"""Several processes embed one gallery into one index (`accelerate launch examples/retrieve.py index ...`).

With a process group of W processes (`torch.distributed`, started by Accelerate's `PartialState`), a build runs in
three steps, each process holding only its own rows:

1. process 0 opens the index (checks the model, merges the parts a killed build left, see below); the others wait;
2. process r takes its share of the source ([`ImageSource.share`]: positions r, r+W, r+2W, ..., so new images are
   spread evenly; shards r, r+W, ... of a shard gallery), stamps them, and embeds those the index lacks or whose content changed, exactly as a one-process build
   decides. It writes its rows as part files into `<index>/.parts/`: `r<rank>-<seq>.safetensors` (float32
   `embeddings`) with a JSON sidecar (positions, keys, stamps, model fingerprint, the file's sha256) about every
   `checkpoint_seconds`, and at the end `r<rank>-done.json` (changed keys, stamps of its indexed images, skips,
   timing). Every file is written under a temporary name and renamed, the sidecar last;
3. after all processes are done (an all-reduce also carries failures: a process whose images fail raises its own
   error, the others name it), process 0 removes deleted and changed rows, adds all part rows in source-position
   order (so rows, FAISS ids and the manifest equal a one-process build) and saves the index with the usual atomic
   save; then it deletes `.parts/`.

A killed build leaves its part files: the next build (with any number of processes, or one) first adds the rows of
every complete part of the same model to the index, then embeds only what is still missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..data.errors import InvalidDataError
from .image_sources import ImageSource
from .index import (
    METADATA_FILE,
    PARTS_FOLDER,
    IndexingReport,
    ProcessRate,
    RetrievalIndex,
    RetrievalModel,
    embed_image_source,
    file_sha256,
    open_index,
    same_image,
)

logger = logging.getLogger(__name__)


def threads_per_process() -> int:
    """This machine's cores (the ones this process may run on) divided by the processes on it (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, cores // max(1, local))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


class PartWriter:
    """Writes one process's rows as numbered part files (safetensors + JSON sidecar, the sidecar the commit)."""

    def __init__(self, folder: Path, rank: int, retrieval_model: RetrievalModel) -> None:
        self.folder, self.rank, self.seq = folder, rank, 0
        self.model = {"model_fingerprint": retrieval_model.fingerprint, "bf16": retrieval_model.bf16}

    def write(self, positions: list[int], keys: list[str], stamps: list[str | None], embeddings: torch.Tensor) -> None:
        if not positions:
            return
        stem = self.folder / f"r{self.rank:05d}-{self.seq:06d}"
        tensors = stem.with_suffix(".safetensors")
        tmp = tensors.with_name(tensors.name + ".tmp")
        save_file({"embeddings": embeddings.contiguous()}, str(tmp))
        os.replace(tmp, tensors)
        _write_json(stem.with_suffix(".json"), {**self.model, "file": tensors.name, "sha256": file_sha256(tensors),
                                                "positions": positions, "keys": keys, "stamps": stamps})
        self.seq += 1

    def finish(self, summary: dict[str, Any]) -> None:
        _write_json(self.folder / f"r{self.rank:05d}-done.json", summary)


def read_parts(folder: Path, retrieval_model: RetrievalModel) -> tuple[list[int], list[str], list[str | None], torch.Tensor]:
    """Rows of every complete part file in `folder` of `retrieval_model` (others are logged and ignored), in part
    order then position order: (positions, keys, stamps, embeddings); a key in several parts keeps its last row."""
    rows: dict[str, tuple[int, str | None, torch.Tensor]] = {}
    for sidecar in sorted(folder.glob("r*-[0-9]*.json")):
        try:
            part = json.loads(sidecar.read_text())
            tensors = folder / Path(part["file"]).name
            if file_sha256(tensors) != part["sha256"]:
                raise ValueError(f"{tensors.name} does not match its sidecar")
            embeddings = load_file(str(tensors))["embeddings"]
            if embeddings.shape[0] != len(part["keys"]) or len(part["keys"]) != len(part["positions"]):
                raise ValueError(f"{tensors.name}: {embeddings.shape[0]} rows for {len(part['keys'])} keys")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("ignored part %s: %s", sidecar.name, err)
            continue
        if (part.get("model_fingerprint"), part.get("bf16")) != (retrieval_model.fingerprint, retrieval_model.bf16):
            logger.warning("ignored part %s: embedded by another model or precision", sidecar.name)
            continue
        for position, key, stamp, row in zip(part["positions"], part["keys"], part["stamps"], embeddings):
            rows[key] = (int(position), stamp, row)
    items = sorted(rows.items(), key=lambda item: item[1][0])
    dim = retrieval_model.model.config.projection_dim
    embeddings = torch.stack([row for _, (_, _, row) in items]) if items else torch.zeros(0, dim)
    return [p for _, (p, _, _) in items], [k for k, _ in items], [s for _, (_, s, _) in items], embeddings


def add_rows(index: RetrievalIndex, keys: list[str], stamps: list[str | None], embeddings: torch.Tensor) -> None:
    """Add rows to `index`, replacing the rows of keys it already holds."""
    held = set(index.paths)
    index.remove([key for key in keys if key in held])
    index.add(embeddings, keys, stamps)


def merge_leftover_parts(index: RetrievalIndex, folder: Path, retrieval_model: RetrievalModel) -> int:
    """Add the rows of the parts a killed build left in `folder` to `index`, then delete `folder`; the rows added."""
    _, keys, stamps, embeddings = read_parts(folder, retrieval_model)
    held = dict(zip(index.paths, index.stamps))
    new = [i for i, (key, stamp) in enumerate(zip(keys, stamps)) if key not in held or held[key] != stamp]
    keys, stamps, embeddings = [keys[i] for i in new], [stamps[i] for i in new], embeddings[new]
    if keys:
        logger.info("%s: adding %d row(s) embedded by an earlier, interrupted build", folder.parent, len(keys))
        add_rows(index, keys, stamps, embeddings)
    shutil.rmtree(folder, ignore_errors=True)
    return len(keys)


def _indexed_rows(output: Path) -> dict[str, str | None]:
    """`{path: stamp}` of the index saved at `output` (read from its manifest only; empty: no index yet)."""
    manifest = output / METADATA_FILE
    if not manifest.is_file():
        return {}
    metadata = json.loads(manifest.read_text())
    paths = metadata["paths"]
    return dict(zip(paths, metadata.get("stamps") or [None] * len(paths)))


def _all_succeeded(error: BaseException | None, where: str) -> None:
    """Every process calls this: raises `error` where it happened, and names the failed processes elsewhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    failed = torch.zeros(world, dtype=torch.int32, device=device)
    failed[rank] = int(error is not None)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.any():
        ranks = ", ".join(str(r) for r in failed.nonzero().flatten().tolist())
        raise InvalidDataError(f"{where} failed in process {ranks} (its error is printed above); nothing was merged")


def _run(step: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return step(), None
    except Exception as err:  # passed to every process by `_all_succeeded`
        return None, err


def build_index_parallel(
    retrieval_model: RetrievalModel,
    source: ImageSource,
    output: str | os.PathLike,
    batch_size: int = 64,
    skip_invalid: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
    use_faiss: bool | None = None,
    checkpoint_seconds: float = 60.0,
    index_type: str | None = None,
    index_params: dict[str, int] | None = None,
    max_memory: int | None = None,
) -> tuple[RetrievalIndex | None, IndexingReport]:
    """[`build_index`] over the processes of the current process group (see the module docstring). Process 0
    returns the saved index and the whole build's report; the others return `None` and a report of their share."""
    rank, world = dist.get_rank(), dist.get_world_size()
    output = Path(output)
    parts = output / PARTS_FOLDER
    started = time.monotonic()

    def open_on_zero() -> RetrievalIndex | None:
        if rank != 0:
            return None
        index = open_index(retrieval_model, source, output, use_faiss, index_type, index_params, max_memory)
        if parts.is_dir() and merge_leftover_parts(index, parts, retrieval_model):
            index.save(output, build_faiss=False)  # the other processes plan against this manifest
        parts.mkdir(parents=True, exist_ok=True)
        return index

    index, error = _run(open_on_zero)
    _all_succeeded(error, "opening the index")
    share = source.share(rank, world)

    def embed_share() -> IndexingReport:
        indexed = {p: s for p, s in zip(index.paths, index.stamps)} if index is not None else _indexed_rows(output)
        stamps = {position: source.stamp(position) for position in share}
        keys = source.keys
        changed = [p for p in share if keys[p] in indexed and not same_image(indexed[keys[p]], stamps[p])]
        pending = sorted([p for p in share if keys[p] not in indexed] + changed)
        writer, pending_rows = PartWriter(parts, rank, retrieval_model), []
        timing = {"last": time.monotonic(), "cost": 0.0}

        def flush() -> None:
            if pending_rows:
                done = [p for batch, _ in pending_rows for p in batch]
                writer.write(done, [keys[p] for p in done], [stamps[p] for p in done],
                             torch.cat([e for _, e in pending_rows]))
                pending_rows.clear()

        def on_batch(batch_positions: list[int], embeddings: torch.Tensor) -> None:
            pending_rows.append((batch_positions, embeddings))
            if time.monotonic() - timing["last"] >= max(checkpoint_seconds, 4 * timing["cost"]):
                begun = time.monotonic()
                flush()
                timing["cost"], timing["last"] = time.monotonic() - begun, time.monotonic()

        done, _, skipped = embed_image_source(
            retrieval_model.model, retrieval_model.processor, source, pending, batch_size, skip_invalid, num_workers,
            show_progress and rank == 0, on_batch=on_batch,
        )  # fmt: skip
        flush()
        seconds = time.monotonic() - started
        changed_keys = {keys[p] for p in changed}
        writer.finish({
            "changed": sorted(changed_keys), "skipped": skipped, "already_indexed": len(share) - len(pending),
            "touched": {keys[p]: stamps[p] for p in share if keys[p] in indexed}, "images": len(done),
            "added": sum(1 for p in done if keys[p] not in changed_keys), "seconds": seconds,
        })  # fmt: skip
        logger.info("process %d of %d: embedded %d image(s) in %.1f s (%.1f images/s)", rank, world, len(done),
                    seconds, len(done) / seconds if seconds > 0 else 0.0)
        return IndexingReport(added=sum(1 for p in done if keys[p] not in changed_keys), updated=len(changed),
                              already_indexed=len(share) - len(pending), skipped=skipped,
                              rates=[ProcessRate(len(done), seconds)])

    local_report, error = _run(embed_share)
    _all_succeeded(error, "embedding")
    if rank != 0:
        return None, local_report
    return index, _merge(index, source, output, parts, world, retrieval_model)


def _merge(index: RetrievalIndex, source: ImageSource, output: Path, parts: Path, world: int,
           retrieval_model: RetrievalModel) -> IndexingReport:
    """Process 0: the parts of all `world` processes into `index`, in one-process order; saved; parts deleted."""
    summaries = [json.loads((parts / f"r{rank:05d}-done.json").read_text()) for rank in range(world)]
    present = set(source.keys)
    deleted = [path for path in index.paths if path not in present and source.covers(path)]
    changed = [key for summary in summaries for key in summary["changed"]]
    index.remove(deleted + changed)
    index.set_stamps({key: stamp for summary in summaries for key, stamp in summary["touched"].items()})
    _, keys, stamps, embeddings = read_parts(parts, retrieval_model)
    if len(keys) != sum(s["images"] for s in summaries):
        raise InvalidDataError(f"{parts}: the part files hold {len(keys)} rows, the processes embedded "
                               f"{sum(s['images'] for s in summaries)} (a part file was lost or damaged); run again")
    index.add(embeddings, keys, stamps)
    index.save(output)
    shutil.rmtree(parts, ignore_errors=True)
    return IndexingReport(
        added=sum(s["added"] for s in summaries), updated=len(changed), removed=len(deleted),
        already_indexed=sum(s["already_indexed"] for s in summaries), total=len(index),
        skipped=[tuple(item) for s in summaries for item in s["skipped"]],
        rates=[ProcessRate(s["images"], s["seconds"]) for s in summaries],
    )  # fmt: skip
