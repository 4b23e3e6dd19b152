"""The image → captions view of a pair-view split (what relevance labels and retrieval evaluation need).

A pair view has one row per caption with dense ids: ``image_id`` in ``0..N_images-1`` and ``caption_id`` in
``0..N_captions-1``. :class:`ImageCaptionIndex` inverts it: ``caption_image_ids[c]`` is the image of caption ``c``,
and ``image_caption_ids[i]`` the captions of image ``i`` (stored CSR: ``image_caption_indices[offsets[i]:offsets[i+1]]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from .errors import InvalidDataError

PAIR_COLUMNS = ("image", "caption", "image_id", "caption_id")


def pair_columns_numpy(pairs: Dataset, columns: list[str]) -> dict[str, np.ndarray | list]:
    """Read some columns of a dataset (respecting any indices mapping) without decoding images."""
    table = pairs.select_columns(columns).with_format("arrow")[:]
    out: dict[str, np.ndarray | list] = {}
    for name in columns:
        col = table.column(name)
        out[name] = col.to_pylist() if name in ("caption", "filename") else col.to_numpy()
    return out


def check_pair_view(pairs: Dataset) -> None:
    """Raise ``ValueError`` listing the available columns if a pair-view column is missing."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise ValueError(
            f"not a BCLS pair view: missing column(s) {missing}; available columns: {pairs.column_names} "
            "(load data with trainer_bcls.data.loaders.load_pairs)"
        )


@dataclass(frozen=True)
class ImageCaptionIndex:
    """Image ↔ caption index of one split.

    Attributes:
        caption_image_ids: int64 [N_captions], image of each caption id.
        image_caption_offsets: int64 [N_images + 1], CSR offsets into ``image_caption_indices``.
        image_caption_indices: int64 [N_captions], caption ids grouped by image (ascending within an image).
        image_row: int64 [N_images], one pair-view row per image (to fetch its pixels once, e.g. for evaluation).
        captions: caption text per caption id.
        filenames: file name per image id ("" when the pair view has no ``filename`` column).
    """

    caption_image_ids: np.ndarray
    image_caption_offsets: np.ndarray
    image_caption_indices: np.ndarray
    image_row: np.ndarray
    captions: list[str] = field(repr=False)
    filenames: list[str] = field(repr=False)

    @property
    def num_images(self) -> int:
        return len(self.image_caption_offsets) - 1

    @property
    def num_captions(self) -> int:
        return len(self.caption_image_ids)

    @property
    def image_caption_ids(self) -> list[np.ndarray]:
        """Caption ids of each image (list indexed by image id)."""
        return np.split(self.image_caption_indices, self.image_caption_offsets[1:-1])

    def captions_of(self, image_id: int) -> np.ndarray:
        return self.image_caption_indices[self.image_caption_offsets[image_id] : self.image_caption_offsets[image_id + 1]]

    def select_images(self, pairs: Dataset) -> Dataset:
        """The image view: one row per image, in image-id order (``pairs.select(image_row)``)."""
        return pairs.select(self.image_row)

    @classmethod
    def from_pairs(cls, pairs: Dataset) -> ImageCaptionIndex:
        """Build the index of a pair view; ``InvalidDataError`` on duplicate or non-dense ids (naming rows)."""
        check_pair_view(pairs)
        has_filename = "filename" in pairs.column_names
        cols = pair_columns_numpy(pairs, ["image_id", "caption_id", "caption"] + (["filename"] if has_filename else []))
        image_ids = np.asarray(cols["image_id"], dtype=np.int64)
        caption_ids = np.asarray(cols["caption_id"], dtype=np.int64)
        n = len(caption_ids)
        if n == 0:
            raise InvalidDataError("the pair view is empty")
        _check_dense(caption_ids, "caption_id")
        _check_dense(image_ids, "image_id", allow_repeats=True)
        num_images = int(image_ids.max()) + 1

        caption_image_ids = np.empty(n, dtype=np.int64)
        caption_image_ids[caption_ids] = image_ids
        captions: list[str] = [""] * n
        for row, (cid, text) in enumerate(zip(caption_ids.tolist(), cols["caption"])):
            captions[cid] = text
        order = np.argsort(caption_image_ids, kind="stable")  # caption ids grouped by image, ascending within
        counts = np.bincount(caption_image_ids, minlength=num_images)
        offsets = np.zeros(num_images + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # first row of each image
        rows = np.arange(n, dtype=np.int64)
        image_row = np.full(num_images, n, dtype=np.int64)
        np.minimum.at(image_row, image_ids, rows)

        filenames = [""] * num_images
        if has_filename:
            names = cols["filename"]
            for i in range(num_images):
                filenames[i] = names[image_row[i]]
            by_name: dict[str, int] = {}
            for row, (iid, name) in enumerate(zip(image_ids.tolist(), names)):
                if name != filenames[iid]:
                    raise InvalidDataError(
                        f"image_id {iid} has two filenames: {filenames[iid]!r} (row {image_row[iid]}) and "
                        f"{name!r} (row {row})"
                    )
                if name and by_name.setdefault(name, iid) != iid:
                    raise InvalidDataError(
                        f"duplicate image: filename {name!r} has image_id {by_name[name]} (row "
                        f"{image_row[by_name[name]]}) and image_id {iid} (row {row})"
                    )
        return cls(
            caption_image_ids=caption_image_ids,
            image_caption_offsets=offsets,
            image_caption_indices=order.astype(np.int64),
            image_row=image_row,
            captions=captions,
            filenames=filenames,
        )


def _check_dense(ids: np.ndarray, name: str, allow_repeats: bool = False) -> None:
    """ids must cover 0..max; caption ids must also be unique."""
    if ids.min() < 0:
        row = int(np.argmin(ids))
        raise InvalidDataError(f"negative {name} {ids[row]} at row {row}")
    if not allow_repeats:
        first = {}
        if len(np.unique(ids)) != len(ids):
            for row, value in enumerate(ids.tolist()):
                if value in first:
                    raise InvalidDataError(f"duplicate {name} {value} at rows {first[value]} and {row}")
                first[value] = row
    present = np.bincount(ids)
    if (present == 0).any():
        missing = np.flatnonzero(present == 0)
        raise InvalidDataError(
            f"{name} must be dense (0..{len(present) - 1} all present); {len(missing)} missing, e.g. {missing[:5].tolist()}. "
            "After filtering a pair view, renumber it with trainer_bcls.data.loaders.densify_ids(pairs)."
        )


def pair_keys(pairs: Dataset, index: ImageCaptionIndex | None = None) -> tuple[list[str], list[str]]:
    """The names files use for a split's images and captions: ``(image_keys[image_id], caption_keys[caption_id])``.

    An image is named by the source's own id (``source_image_id``: Karpathy ``cocoid``, a metadata ``image_id``),
    else by its ``filename``, else by its ``image_id``; a caption by ``source_caption_id`` (Karpathy ``sentids``, a
    metadata ``caption_id``), else ``<image key>#<k>``, k its 0-based place among its image's captions (the
    Flickr8k token-file form). Two images or captions with one key are an ``InvalidDataError`` naming it.
    """
    index = index if index is not None else ImageCaptionIndex.from_pairs(pairs)
    extra = [c for c in ("source_image_id", "source_caption_id") if c in pairs.column_names]
    cols = pair_columns_numpy(pairs, ["image_id", "caption_id"] + extra)
    caption_ids = np.asarray(cols["caption_id"], dtype=np.int64)
    if "source_image_id" in cols:
        values = cols["source_image_id"]
        values = values.tolist() if hasattr(values, "tolist") else values
        image_keys = [str(values[row]) for row in index.image_row.tolist()]
    else:
        image_keys = [name or str(i) for i, name in enumerate(index.filenames)]
    if "source_caption_id" in cols:
        values = cols["source_caption_id"]
        values = values.tolist() if hasattr(values, "tolist") else values
        caption_keys = [""] * index.num_captions
        for cid, value in zip(caption_ids.tolist(), values):
            caption_keys[cid] = str(value)
    else:
        caption_keys = [""] * index.num_captions
        for image, captions in enumerate(index.image_caption_ids):
            for k, cid in enumerate(captions.tolist()):
                caption_keys[cid] = f"{image_keys[image]}#{k}"
    for what, keys in (("image", image_keys), ("caption", caption_keys)):
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if first.setdefault(key, i) != i:
                raise InvalidDataError(f"two {what}s share the key {key!r} ({what}_id {first[key]} and {i})")
    return image_keys, caption_keys
