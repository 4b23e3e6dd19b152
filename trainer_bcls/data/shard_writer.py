"""Write webdataset shards (``.tar``) from image-caption samples: for tests, benchmarks and users converting data.

``write_shards(samples, folder)`` writes ``shard-000000.tar``, ``shard-000001.tar``, ... with ``samples_per_shard``
samples each; sample ``{"key", "image" (encoded bytes or a path), "captions", "image_ext"}`` becomes the members
``<key>.<image_ext>`` and ``<key>.json`` (``{"captions": [...]}``), or ``<key>.txt`` (one caption) with
``caption_format="txt"``. ``karpathy_shard_samples(dataset_json, image_root, split)`` reads a Karpathy split as such
samples (key = the image file's stem), in the file's order.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["karpathy_shard_samples", "write_shards"]


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # same bytes for the same samples
    archive.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[dict[str, Any]],
    folder: str | os.PathLike,
    samples_per_shard: int = 1000,
    caption_format: str = "json",
    prefix: str = "shard-",
) -> list[str]:
    """Write the samples into ``folder/<prefix>NNNNNN.tar`` shards; return their paths, in order."""
    if caption_format not in ("json", "txt"):
        raise ValueError(f"caption_format must be 'json' or 'txt', got {caption_format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    archive: tarfile.TarFile | None = None
    count = 0
    try:
        for sample in samples:
            if archive is None or count == samples_per_shard:
                if archive is not None:
                    archive.close()
                paths.append(str(folder / f"{prefix}{len(paths):06d}.tar"))
                archive, count = tarfile.open(paths[-1], "w"), 0
            image = sample["image"]
            if not isinstance(image, (bytes, bytearray)):
                image = Path(image).read_bytes()
            key = str(sample["key"])
            _add(archive, f"{key}.{sample.get('image_ext', 'jpg')}", bytes(image))
            captions = list(sample["captions"])
            if caption_format == "txt":
                _add(archive, f"{key}.txt", captions[0].encode("utf-8"))
            else:
                _add(archive, f"{key}.json", json.dumps({"captions": captions}).encode("utf-8"))
            count += 1
    finally:
        if archive is not None:
            archive.close()
    return paths


def karpathy_shard_samples(
    dataset_json: str | os.PathLike, image_root: str | os.PathLike, split: str | tuple[str, ...] = "train"
) -> Iterator[dict[str, Any]]:
    """The images of a Karpathy ``dataset_*.json`` split as shard samples (image path, raw captions)."""
    splits = (split,) if isinstance(split, str) else tuple(split)
    with open(dataset_json, encoding="utf-8") as f:
        images = json.load(f)["images"]
    for entry in images:
        if entry.get("split") not in splits:
            continue
        path = Path(image_root, entry.get("filepath", ""), entry["filename"])
        yield {
            "key": path.stem,
            "image": path,
            "image_ext": path.suffix.lstrip(".").lower() or "jpg",
            "captions": [s["raw"] for s in entry["sentences"]],
        }
