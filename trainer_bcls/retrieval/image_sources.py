"""Images to index, listed without decoding: a folder walked recursively, or a datasets image column (webdataset
shards: `shard_source`).

An [`ImageSource`] has a stable string key per image (the absolute file path, or `dataset:split:row`) and loads
one image at a time, so an indexer never holds more than a batch of decoded images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as stat_module
from pathlib import Path
from typing import Any, Sequence

import PIL.Image

from ..data.image_loading import MAX_IMAGE_PIXELS, load_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


class ImageSource:
    """A list of image keys and a way to load the image behind each one (subclasses say where from)."""

    keys: list[str]
    name: str
    max_pixels: int | None = MAX_IMAGE_PIXELS  # decoded pixels per image (see `load_image`)

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, position: int) -> PIL.Image.Image:
        """The RGB image at `position`; raises [`ImageLoadError`] naming its key when it cannot be read."""
        raise NotImplementedError

    def stamp(self, position: int) -> str | None:
        """A cheap change marker of the image at `position` (`None`: unknown); a changed image is re-embedded."""
        return None

    def covers(self, key: str) -> bool:
        """Whether `key` names an image of this source (a covered key missing from `keys` was deleted)."""
        raise NotImplementedError

    def share(self, rank: int, world: int) -> Sequence[int]:
        """The positions process `rank` of `world` embeds: rank, rank + world, ... (new images spread evenly)."""
        return range(rank, len(self), world)


def file_stamp(path: str | os.PathLike) -> str | None:
    """`size:mtime_ns:sha256:<hex>` of a regular file (`None` if it is missing or not a regular file): the digest
    of the bytes detects a file replaced by another of the same size and mtime."""
    try:
        stat = os.stat(path)
        if not stat_module.S_ISREG(stat.st_mode):
            return None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}:sha256:{digest.hexdigest()}"


class FolderSource(ImageSource):
    """Every regular file with an image suffix under `root`, subfolders included (hidden folders and files
    skipped; named pipes, sockets and devices skipped and counted, never opened), keyed by absolute path, sorted."""

    def __init__(self, root: str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        self.root = Path(root).resolve()
        self.name = str(root)
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        keys, ignored, special = [], 0, []
        for folder, subfolders, files in os.walk(self.root):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                    ignored += 1
                elif not os.path.isfile(os.path.join(folder, name)):  # a FIFO would block the reader forever
                    special.append(os.path.join(folder, name))
                else:
                    keys.append(os.path.join(folder, name))
        self.keys = sorted(keys)
        if ignored:
            logger.info("%s: ignored %d file(s) without an image suffix (%s)", root, ignored,
                        ", ".join(sorted(IMAGE_SUFFIXES)))
        if special:
            logger.warning("%s: skipped %d entr%s that are not regular files (pipes, sockets, devices, broken links): "
                           "%s", root, len(special), "y" if len(special) == 1 else "ies", ", ".join(special[:5]))
        self.special = special

    def load(self, position: int) -> PIL.Image.Image:
        return load_image(self.keys[position], max_pixels=self.max_pixels)

    def stamp(self, position: int) -> str | None:
        """`size:mtime_ns:sha256:<hex>` of the file (`None` if it vanished since the walk)."""
        return file_stamp(self.keys[position])

    def covers(self, key: str) -> bool:
        return key.startswith(str(self.root) + os.sep)


class DatasetSource(ImageSource):
    """The image column of a `datasets.Dataset` (a `save_to_disk` folder or a Hub id), decoded one row at a time.

    Keys are `"<name>:<split>:<row>"` (`"<name>:<row>"` for a saved `Dataset` without splits).
    """

    def __init__(self, dataset: Any, name: str, split: str | None, image_column: str | None = None) -> None:
        from datasets import Image

        from ..data.loaders import resolve_image_column

        image_column = resolve_image_column(dataset, image_column, name, "--image_column")
        if isinstance(dataset.features[image_column], Image):
            dataset = dataset.cast_column(image_column, Image(decode=False))
        self.dataset = dataset.select_columns([image_column])
        self.image_column, self.name = image_column, name
        self.prefix = f"{name}:{split}:" if split is not None else f"{name}:"
        self.keys = [f"{self.prefix}{row}" for row in range(len(dataset))]

    def load(self, position: int) -> PIL.Image.Image:
        return load_image(self.dataset[position][self.image_column], where=self.keys[position],
                          max_pixels=self.max_pixels)

    def stamp(self, position: int) -> str | None:
        """sha1 of the stored image bytes, or [`file_stamp`] of the file a row points to."""
        value = self.dataset[position][self.image_column]
        if isinstance(value, dict) and value.get("bytes") is not None:
            return "sha1:" + hashlib.sha1(value["bytes"]).hexdigest()
        path = value.get("path") if isinstance(value, dict) else value
        return file_stamp(path) if isinstance(path, str) else None

    def covers(self, key: str) -> bool:
        return key.startswith(self.prefix) and key[len(self.prefix) :].isdigit()


def is_saved_dataset(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES)


def open_image_source(images: str | os.PathLike, split: str | None = None, image_column: str | None = None,
                      max_pixels: int | None = MAX_IMAGE_PIXELS):
    """A folder of images (walked recursively), webdataset shards (`shards/shard-{000000..000009}.tar`, see
    [`trainer_bcls.retrieval.shard_source`]), a `save_to_disk` folder, or else a Hub dataset id.

    `split` picks a split of a `DatasetDict` or Hub dataset (default: the only split, else `train`); a plain saved
    `Dataset` has no splits, so a `split` there is an error.
    """
    from ..data.shards import is_shard_pattern
    from .shard_source import ShardSource

    if is_shard_pattern(images):
        if split is not None or image_column is not None:
            raise ValueError(f"{images} names webdataset shards: --split / --image_column apply to datasets only")
        return ShardSource(images, max_pixels)
    path = Path(images)
    if path.is_dir() and not is_saved_dataset(path):
        if split is not None or image_column is not None:
            raise ValueError(f"{images} is a folder of image files: --split / --image_column apply to datasets only")
        return FolderSource(path, max_pixels)
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if path.is_dir():
        dataset, name = load_from_disk(str(path)), str(path.resolve())
    elif path.exists():
        raise ValueError(f"{images} is a file; give a folder of images or a dataset")
    elif os.path.isabs(images) or str(images).startswith((".", "~")):
        raise FileNotFoundError(f"image folder not found: {images}")
    else:
        try:
            dataset, name = load_dataset(str(images), split=split or "train"), str(images)
        except Exception as err:  # offline, unknown id, no such split, ...
            raise FileNotFoundError(
                f"{images} is not a folder, and loading it as a Hub dataset failed: {type(err).__name__}: {err}"
            ) from err
        split = split or "train"
    if isinstance(dataset, DatasetDict):
        if split is None:
            if len(dataset) != 1 and "train" not in dataset:
                raise ValueError(f"{images} has splits {sorted(dataset)}: pass --split")
            split = next(iter(dataset)) if len(dataset) == 1 else "train"
        if split not in dataset:
            raise ValueError(f"split {split!r} not in {images}; available splits: {sorted(dataset)}")
        dataset = dataset[split]
    elif split is not None and path.is_dir():
        raise ValueError(f"{images} is a saved Dataset without splits: drop --split {split}")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset in {images}, got {type(dataset).__name__}")
    source = DatasetSource(dataset, name, split, image_column)
    source.max_pixels = max_pixels
    return source
