"""A gallery of webdataset shards (`path/shard-{000000..000009}.tar`): one image per sample, keyed by sample key.

The shard list comes from [`trainer_bcls.data.shards.expand_shard_pattern`] (brace ranges, `::`, a folder of
`.tar` files). The tar headers of every shard are read once (no image bytes), so each image can be read on its
own, at its offset, by any process: local shards only (a URL cannot be read at an offset). A sample is a group of
members sharing a key (webdataset's rule: the member path up to the first dot of its base name); its first image
member is indexed, `.txt` / `.json` members (captions) are ignored here. The row id is the sample key; a key in
two shards is an error naming both. Several processes split the gallery by shard ([`ShardSource.share`]).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from typing import Sequence

import PIL.Image

from ..data.errors import InvalidDataError
from ..data.image_loading import MAX_IMAGE_PIXELS, load_image
from ..data.shards import IMAGE_EXTENSIONS, expand_shard_pattern, is_url, split_member_name
from .image_sources import ImageSource


class ShardSource(ImageSource):
    """The images of local webdataset shards, keyed by sample key, in shard then archive order."""

    def __init__(self, pattern: str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        self.name, self.max_pixels = os.fspath(pattern), max_pixels
        self.shards = expand_shard_pattern(pattern)
        remote = [url for url in self.shards if is_url(url)]
        if remote:
            raise InvalidDataError(f"shard {remote[0]} is a URL: an index reads shards at offsets, so they must be "
                                   "local files (download them first)")
        self.keys: list[str] = []
        self.members: list[tuple[int, int, int, str]] = []  # (shard, data offset, size, extension) per key
        first_shard: dict[str, int] = {}
        for number, shard in enumerate(self.shards):
            try:
                with tarfile.open(shard, "r:") as archive:  # headers only: the data is seeked over
                    for member in archive:
                        key, ext = split_member_name(member.name)
                        if key is None or not member.isfile() or ext.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
                            continue
                        if key in first_shard:
                            if first_shard[key] == number:
                                continue  # a second image of the same sample: the first one is indexed
                            raise InvalidDataError(f"sample key {key!r} is in shard {self.shards[first_shard[key]]} "
                                                   f"and in shard {shard}: keys must be unique across shards")
                        first_shard[key] = number
                        self.keys.append(key)
                        self.members.append((number, member.offset_data, member.size, ext))
            except (tarfile.TarError, OSError, EOFError) as err:
                raise InvalidDataError(f"shard {shard} is unreadable: {type(err).__name__}: {err}") from err

    def _read(self, position: int) -> bytes:
        number, offset, size, _ = self.members[position]
        with open(self.shards[number], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise InvalidDataError(f"shard {self.shards[number]}, sample {self.keys[position]!r}: truncated")
        return data

    def load(self, position: int) -> PIL.Image.Image:
        number, _, _, ext = self.members[position]
        where = f"shard {self.shards[number]}, sample {self.keys[position]!r}"
        return load_image({"bytes": self._read(position), "path": f"{self.keys[position]}.{ext}"}, where=where,
                          max_pixels=self.max_pixels)

    def stamp(self, position: int) -> str | None:
        """sha1 of the image bytes (as a dataset's stored images)."""
        try:
            return "sha1:" + hashlib.sha1(self._read(position)).hexdigest()
        except (OSError, InvalidDataError):
            return None

    def covers(self, key: str) -> bool:
        """Sample keys: neither absolute file paths nor `<dataset>:<row>` keys. So an index folder holds one shard
        gallery: indexing other shards into it removes the samples they lack as deleted."""
        return not os.path.isabs(key) and ":" not in key

    def share(self, rank: int, world: int) -> Sequence[int]:
        """The positions of shards rank, rank + world, ... (a process reads whole shards)."""
        return [p for p, (number, _, _, _) in enumerate(self.members) if number % world == rank]
