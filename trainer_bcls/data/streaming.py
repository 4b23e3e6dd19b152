"""Streamed training data: webdataset shards or HF streaming datasets → an endless stream of training pairs.

Samples (one image, one or several captions) come as a ``datasets.IterableDataset`` of
``{"key", "image" (encoded bytes), "captions", "url"}``:

- :func:`shard_samples`: webdataset shards (a pattern, :func:`~trainer_bcls.data.shards.expand_shard_pattern`) read
  by :func:`~trainer_bcls.data.shards.iter_shard_samples` inside ``IterableDataset.from_generator`` (one generator
  shard per ``.tar``). Not ``load_dataset("webdataset")``: that builder infers the columns from the first five
  samples of the first shard (a ``.txt`` sample after ``.json`` ones breaks it) and its errors do not name the
  sample; reading the tar ourselves keeps the errors (shard + key) and ``skip_invalid`` of the rest of the package.
- :func:`hf_stream_samples`: ``load_dataset(..., streaming=True)`` (a Hub id, or local parquet files), the image
  column read undecoded, the caption column a string or a list of strings; the key is a digest of the image bytes.

:class:`StreamingPairs` (a torch ``IterableDataset``) turns samples into pair rows for the collator::

    image       encoded bytes (decoded by the collator, which names ``filename`` = ``<shard>#<key>`` on error)
    caption     captions="one": one caption per sample per epoch, k = blake2b(seed, epoch, key) mod n (open_clip's
                choice, reproducible); captions="all": one row per caption (rows expanded before the shuffle buffer)
    captions    every caption the sample carries (the references of the streamed relevance labels)
    image_id    int63 blake2b of ``<shard file name>/<key>``: stable per sample, equal in every process and worker
    caption_id  int63 blake2b of ``<shard file name>/<key>#<k>``

Order and splitting, per epoch e: ``shuffle(seed, buffer_size)`` (shard order by seed + e, then a buffer of
samples), ``set_epoch(e)``, ``split_dataset_by_node(rank, world_size)`` (whole shards per process when the shard
count divides by the world size, else every process reads all and keeps every world_size-th sample), and inside a
DataLoader worker ``datasets`` gives each worker its own shards (a worker beyond the shard count stops at once).
So within an epoch every sample is read by exactly one (process, worker), none twice and none lost. The stream is
endless (epoch e + 1 follows e in each worker, ``epochs=None``): train with ``max_steps``; the processes never run
out at different steps (which would hang the collective ops of the loss).

Rank and world size come from ``RANK`` / ``WORLD_SIZE`` (set by ``accelerate launch`` and ``torchrun`` and inherited
by the DataLoader workers) unless given.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from typing import Any, Iterator

import torch
from datasets import Features, IterableDataset, List, Value, load_dataset
from datasets.distributed import split_dataset_by_node

from .errors import InvalidDataError, SkipReport
from .shards import expand_shard_pattern, is_shard_pattern, is_url, iter_shard_samples

logger = logging.getLogger(__name__)

__all__ = ["SAMPLE_FEATURES", "StreamingPairs", "hf_stream_samples", "is_shard_pattern", "shard_samples", "stable_id"]

SAMPLE_FEATURES = Features(
    {"key": Value("string"), "image": Value("binary"), "captions": List(Value("string")), "url": Value("string")}
)
CAPTION_COLUMN_CANDIDATES = ("caption", "captions", "text", "sentences", "txt")
IMAGE_COLUMN_CANDIDATES = ("image", "jpg", "jpeg", "png", "webp", "img")


def stable_id(text: str) -> int:
    """A non-negative int63 from blake2b(text): the same in every process, worker and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _generate_shard_samples(shards: list[str], skip_invalid: bool) -> Iterator[dict[str, Any]]:
    report = SkipReport()
    for sample in iter_shard_samples(shards, skip_invalid=skip_invalid, report=report):
        yield {"key": sample["key"], "image": sample["image"], "captions": sample["captions"], "url": sample["url"]}
    report.log(logger, f"shards {shards[0]}{' ...' if len(shards) > 1 else ''}")


def shard_samples(pattern: str | list[str], skip_invalid: bool = False) -> IterableDataset:
    """The samples of webdataset shards as a ``datasets.IterableDataset`` (``n_shards`` = number of ``.tar``)."""
    shards = expand_shard_pattern(pattern)
    return IterableDataset.from_generator(
        _generate_shard_samples, features=SAMPLE_FEATURES, gen_kwargs={"shards": shards, "skip_invalid": skip_invalid}
    )


def _local_parquet_files(data: str) -> list[str] | None:
    if is_url(data):
        return None
    if os.path.isdir(data):
        found = sorted(str(p) for p in __import__("pathlib").Path(data).rglob("*.parquet"))
        return found or None
    if data.endswith(".parquet") or "*" in data:
        import glob

        return sorted(glob.glob(data)) or None
    return None


def hf_stream_samples(
    data: str,
    split: str = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    skip_invalid: bool = False,
) -> IterableDataset:
    """``load_dataset(data, split=split, streaming=True)`` (local parquet files / folders as ``parquet``) → samples."""
    files = _local_parquet_files(data)
    if files is not None:
        stream = load_dataset("parquet", data_files=files, split="train", streaming=True)
    else:
        stream = load_dataset(data, split=split, streaming=True)
    features = stream.features or {}
    columns = list(features) if features else []
    image_column = image_column or next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
    caption_column = caption_column or next((c for c in CAPTION_COLUMN_CANDIDATES if c in columns), None)
    if image_column is None or image_column not in columns:
        raise InvalidDataError(f"{data}: no image column (columns: {columns}); pass --image_column")
    if caption_column is None or caption_column not in columns:
        raise InvalidDataError(f"{data}: no caption column (columns: {columns}); pass --caption_column")
    from datasets import Image

    if isinstance(features[image_column], Image):
        stream = stream.cast_column(image_column, Image(decode=False))

    def to_sample(row: dict[str, Any]) -> dict[str, Any]:
        value, captions = row[image_column], row[caption_column]
        if isinstance(value, dict):
            value = value.get("bytes") or (open(value["path"], "rb").read() if value.get("path") else None)
        captions = [captions] if isinstance(captions, str) else list(captions or [])
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        key = hashlib.sha1(value).hexdigest()[:20] if isinstance(value, (bytes, bytearray)) else ""
        return {"key": key, "image": value if isinstance(value, (bytes, bytearray)) else None, "captions": captions,
                "url": data}

    stream = stream.map(to_sample, remove_columns=columns, features=SAMPLE_FEATURES)
    if skip_invalid:
        return stream.filter(lambda s: s["image"] is not None and len(s["captions"]) > 0)
    return stream


def _expand_captions(batch: dict[str, list]) -> dict[str, list]:
    """One row per caption (``captions="all"``), the caption's index kept in ``caption_index``."""
    out: dict[str, list] = {key: [] for key in (*batch, "caption", "caption_index")}
    for i, captions in enumerate(batch["captions"]):
        for k, caption in enumerate(captions):
            for key in batch:
                out[key].append(batch[key][i])
            out["caption"].append(caption)
            out["caption_index"].append(k)
    return out


class StreamingPairs(torch.utils.data.IterableDataset):
    """Endless pair rows from a stream of samples (see the module docstring for the row, order and splitting).

    Args:
        samples: ``{"key", "image", "captions", "url"}`` rows (:func:`shard_samples`, :func:`hf_stream_samples`).
        captions: ``"one"`` caption per sample per epoch, or ``"all"`` (one row each).
        seed: shuffle and caption-choice seed. shuffle_buffer: samples in the shuffle buffer (0: no shuffling).
        epochs: ``None`` (endless) or a number of passes. rank, world_size: default ``$RANK`` / ``$WORLD_SIZE``.
    """

    def __init__(
        self,
        samples: IterableDataset,
        captions: str = "one",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if captions not in ("one", "all"):
            raise ValueError(f"captions must be 'one' or 'all', got {captions!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.samples = samples
        self.captions = captions
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size

    @property
    def n_shards(self) -> int:
        return self.samples.n_shards

    def node(self) -> tuple[int, int]:
        rank = self.rank if self.rank is not None else int(os.environ.get("RANK", 0))
        world = self.world_size if self.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
        return rank, world

    def epoch_samples(self, epoch: int) -> IterableDataset:
        """This process's samples of one epoch (before the per-worker split that ``datasets`` does in a worker)."""
        stream = self.samples
        if self.captions == "all":
            stream = stream.map(_expand_captions, batched=True, batch_size=64)
        if self.shuffle_buffer:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        stream.set_epoch(epoch)
        rank, world = self.node()
        return split_dataset_by_node(stream, rank=rank, world_size=world) if world > 1 else stream

    def _row(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        name = f"{os.path.basename(sample['url'])}/{sample['key']}"
        if "caption" in sample:
            k, caption = sample["caption_index"], sample["caption"]
        else:
            captions = sample["captions"]
            if not captions:
                raise InvalidDataError(f"{sample['url']}#{sample['key']}: no caption")
            digest = hashlib.blake2b(f"{self.seed}:{epoch}:{name}".encode(), digest_size=8).digest()
            k = int.from_bytes(digest, "little") % len(captions)
            caption = captions[k]
        return {
            "image": sample["image"], "caption": caption, "captions": sample["captions"],
            "image_id": stable_id(name), "caption_id": stable_id(f"{name}#{k}"),
            "filename": f"{sample['url']}#{sample['key']}", "key": sample["key"],
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        epochs = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            stream = self.epoch_samples(epoch)
            if worker is not None and worker.id >= stream.n_shards:
                return  # more DataLoader workers than this process's shards: datasets gives this one nothing
            count = 0
            for sample in stream:
                count += 1
                yield self._row(sample, epoch)
            if count == 0:
                rank, world = self.node()
                where = f"process {rank}/{world}" + (f", DataLoader worker {worker.id}" if worker else "")
                raise InvalidDataError(f"{where}: epoch {epoch} of the stream yielded no sample (empty or all skipped)")

    def __repr__(self) -> str:
        return (f"StreamingPairs(n_shards={self.n_shards}, captions={self.captions!r}, seed={self.seed}, "
                f"shuffle_buffer={self.shuffle_buffer}, epochs={self.epochs})")
