"""Duplicate data: byte-identical images under several names, and one caption text shared by several images.

Both make a pair view lie to the losses: two copies of one image become negatives of each other, and identical
captions of different images are pushed apart by the binary loss. The loaders report both at load (counted, with
examples) and can merge duplicate images into one image id (`merge_duplicate_images=True`).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from typing import Any, Sequence


def image_digest(value: Any) -> str | None:
    """sha256 of an image value's bytes (a path, ``{"path", "bytes"}`` or raw bytes); ``None`` when unknown."""
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, (bytes, bytearray)) else None
    if data is not None:
        return hashlib.sha256(data).hexdigest()
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def duplicate_groups(values: Sequence[Any]) -> list[list[int]]:
    """Positions of byte-identical images, one list per group of two or more, in order of first appearance."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, value in enumerate(values):
        digest = image_digest(value)
        if digest is not None:
            groups[digest].append(position)
    return [group for group in groups.values() if len(group) > 1]


def shared_captions(captions_per_image: Sequence[Sequence[str]]) -> dict[str, int]:
    """Caption texts (compared case- and space-insensitively) that describe more than one image → image count."""
    images_of: dict[str, set[int]] = defaultdict(set)
    for image, captions in enumerate(captions_per_image):
        for caption in captions:
            images_of[" ".join(caption.lower().split())].add(image)
    return {text: len(images) for text, images in images_of.items() if len(images) > 1}


__all__ = ["duplicate_groups", "image_digest", "shared_captions"]
