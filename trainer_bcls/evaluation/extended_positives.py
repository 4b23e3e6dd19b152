"""Extended positives of a split, named by the pair view's keys: from a JSON file (`evaluate.py --extra_positives`)
or from the installed `eccv-caption` package's ECCV Caption ground truth (`evaluate.py --eccv_caption`).

File format: ``{"i2t": {image_key: [caption keys]}, "t2i": {caption_key: [image keys]}}`` (either part may be
left out), keys as :func:`trainer_bcls.data.caption_index.pair_keys` names them (COCO ids for a Karpathy COCO
split). The listed positives are added to the binary ones, and only the listed queries are scored.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from .metrics import ExtendedPositives, with_binary_positives

logger = logging.getLogger(__name__)


def _a(what: str) -> str:
    return f"an {what}" if what == "image" else f"a {what}"


def _rows_by_key(keys: Sequence[str]) -> dict[str, int]:
    return {key: row for row, key in enumerate(keys)}


def load_extra_positives(
    path: str | os.PathLike,
    image_keys: Sequence[str],
    caption_keys: Sequence[str],
    caption_image_ids: np.ndarray,
    prefix: str = "ext_",
) -> ExtendedPositives:
    """The file's positives as :class:`ExtendedPositives` over the split's rows, binary positives added.

    ``ValueError`` naming the file (and the key) for text that is not JSON, a wrong layout or a key that is not an
    image / caption of the split.
    """
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    except OSError as err:
        raise ValueError(f"{where}: cannot read the extra positives file ({err.strerror})") from None
    if not isinstance(data, dict) or not data or set(data) - {"i2t", "t2i"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{where}: expected {{"i2t": {{image_key: [caption keys]}}, "t2i": {{...}}}}, got {found}')
    images, captions = _rows_by_key(image_keys), _rows_by_key(caption_keys)
    parts: dict[str, dict[int, list[int]]] = {"i2t": {}, "t2i": {}}
    for direction, (queries, gallery, query_what, item_what) in (
        ("i2t", (images, captions, "image", "caption")), ("t2i", (captions, images, "caption", "image")),
    ):
        mapping = data.get(direction, {})
        if not isinstance(mapping, dict):
            raise ValueError(f"{where}: {direction!r} must map {query_what} keys to lists of {item_what} keys")
        for key, items in mapping.items():
            if key not in queries:
                raise ValueError(f"{where}: {direction} query {key!r} is not {_a(query_what)} key of this split")
            if not isinstance(items, list):
                raise ValueError(f"{where}: {direction}[{key!r}] must be a list of {item_what} keys")
            rows = []
            for item in items:
                if str(item) not in gallery:
                    raise ValueError(f"{where}: {direction}[{key!r}] lists {item!r}, not {_a(item_what)} key of this split")
                rows.append(gallery[str(item)])
            parts[direction][queries[key]] = rows
    extended = ExtendedPositives(i2t=parts["i2t"], t2i=parts["t2i"], prefix=prefix)
    return with_binary_positives(extended, caption_image_ids)


def eccv_caption_positives(
    image_keys: Sequence[str], caption_keys: Sequence[str], prefix: str = "eccv_"
) -> ExtendedPositives:
    """ECCV Caption's positives (``eccv_caption.Metrics().eccv_gts``, keyed by COCO image and caption ids) over the
    split's rows, exactly as the package scores them: its lists *are* the positives (they keep nearly all COCO
    ones), positives outside the split count in R, and only its 1,261 image / 1,332 caption queries are scored.

    ``ImportError`` without the package, ``ValueError`` when none of its queries is in the split.
    """
    try:
        import eccv_caption
    except ImportError as err:
        raise ImportError("--eccv_caption needs the eccv-caption package: pip install eccv-caption") from err
    gts = eccv_caption.Metrics().eccv_gts
    images, captions = _rows_by_key(image_keys), _rows_by_key(caption_keys)
    parts: dict[str, dict[int, list[int]]] = {"i2t": {}, "t2i": {}}
    outside: dict[str, dict[int, int]] = {"i2t": {}, "t2i": {}}
    missing = {}
    for direction, queries, gallery in (("i2t", images, captions), ("t2i", captions, images)):
        absent = 0
        for query, items in gts[direction].items():
            row = queries.get(str(query))
            if row is None:
                absent += 1
                continue
            rows = [gallery[str(item)] for item in items if str(item) in gallery]
            parts[direction][row] = rows
            if len(rows) < len(set(items)):
                outside[direction][row] = len(set(items)) - len(rows)
        missing[direction] = absent
    if not parts["i2t"] and not parts["t2i"]:
        raise ValueError(
            "none of ECCV Caption's queries is in this split: it needs the COCO Karpathy test split loaded from "
            "dataset_coco.json, whose cocoid / sentids are the COCO ids ECCV Caption is keyed by"
        )
    for direction in ("i2t", "t2i"):
        if missing[direction]:
            logger.warning("%d of ECCV Caption's %s queries are not in this split; scored on the other %d",
                           missing[direction], direction, len(parts[direction]))
    return ExtendedPositives(i2t=parts["i2t"], t2i=parts["t2i"], i2t_outside=outside["i2t"],
                             t2i_outside=outside["t2i"], prefix=prefix)
