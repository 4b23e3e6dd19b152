"""Image-caption datasets on disk or on the Hub → ``datasets.Dataset`` pair views.

Pair view (one row per caption, the training view)::

    image       datasets.Image()  lazy: the row stores a path (or bytes); decoded on access
    caption     string
    image_id    int64, dense 0..N_images-1 within the split, in source order
    caption_id  int64, dense 0..N_captions-1 within the split, grouped by image
    filename    string, the image file (for reports)

and, where the source has them, its original ids (strings), the keys of extended-positive files (COCO /
ECCV Caption ids): ``source_image_id`` (Karpathy ``cocoid``, a metadata ``image_id``) and ``source_caption_id``
(Karpathy ``sentids``, a metadata ``caption_id``); :func:`trainer_bcls.data.caption_index.pair_keys` names every
image and caption by them, else by file name and ``file#k``.

The image → captions view is :class:`ImageCaptionIndex` (``ImageCaptionIndex.from_pairs(pairs)``).

Loaders: :func:`load_karpathy` (``dataset_*.json`` + image folder, as used for Flickr8k/Flickr30k/COCO retrieval),
:func:`load_imagefolder` (``metadata.jsonl``/``metadata.csv``), :func:`load_hf_dataset` (Hub id, ``save_to_disk``
folder or a ``Dataset``), and the dispatcher :func:`load_pairs`.

Bad input (missing image file, corrupt image, empty or non-string caption, image without captions, unknown column,
duplicate ids) raises :class:`InvalidDataError` / ``ValueError`` naming the file, row or column; with
``skip_invalid=True`` the bad item is skipped, counted and logged instead. Captions and file existence are checked
at load time. Decodability is checked at load time when ``check_images`` is True; the default (``None``) checks
splits of at most ``AUTO_CHECK_MAX_IMAGES`` images (about 1 s per 5k small JPEGs) and leaves bigger ones to
:func:`validate_images` or to the collator, which reports (or skips) a corrupt image when it meets one.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk

from .caption_index import ImageCaptionIndex, check_pair_view, pair_columns_numpy
from .duplicates import duplicate_groups, shared_captions
from .errors import InvalidDataError, SkipReport
from .image_loading import describe_image, find_unreadable_images

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_CHECK_MAX_IMAGES",
    "PAIR_FEATURES",
    "ImageCaptionIndex",
    "InvalidDataError",
    "densify_ids",
    "load_hf_dataset",
    "load_imagefolder",
    "load_karpathy",
    "load_pairs",
    "validate_images",
    "without_image_decoding",
]

AUTO_CHECK_MAX_IMAGES = 50_000
PAIR_FEATURES = Features(
    {
        "image": Image(),
        "caption": Value("string"),
        "image_id": Value("int64"),
        "caption_id": Value("int64"),
        "filename": Value("string"),
    }
)
SOURCE_ID_FEATURES = {"source_image_id": Value("string"), "source_caption_id": Value("string")}
SPLIT_ALIASES = {"validation": ("val", "dev", "valid"), "val": ("validation", "dev", "valid"), "dev": ("val", "validation")}
CAPTION_COLUMN_CANDIDATES = ("caption", "captions", "text", "sentences")


@dataclass
class _ImageEntry:
    """One source image before validation: its captions, where it comes from, and how to get its pixels."""

    filename: str
    captions: list[Any]
    where: str  # names the file/row for error messages
    value: Any  # the image value: an absolute path, or a row index into the source dataset
    path: str | None = None  # local file to check for existence
    image_key: str | None = None  # the source's own image id (Karpathy cocoid, metadata image_id)
    caption_keys: list[str | None] | None = None  # the source's own caption ids, one per caption
    kept: list[int] = field(default_factory=list)  # indices of the captions that passed validation


# ----------------------------------------------------------------------------------------------------------------
# validation and pair-view construction shared by all loaders


def _outside_root(path: str, roots: Sequence[os.PathLike | str]) -> bool:
    """Whether `path` (after `..` and absolute parts are resolved lexically) lies outside every one of `roots`.
    Symbolic links inside a root are followed as the user laid them out."""
    target = os.path.abspath(path)
    return not any(os.path.commonpath([os.path.abspath(root), target]) == os.path.abspath(root) for root in roots)


def _check_inside(report: SkipReport, skip_invalid: bool, where: str, path: str, roots, allow: bool) -> bool:
    """False (error raised, or skip counted) when `path` points outside the dataset folder and that is not allowed."""
    if allow or not _outside_root(path, roots):
        return True
    report.handle(
        skip_invalid, "image outside the dataset folder",
        f"{where}: image path {path} is outside the dataset folder {os.path.abspath(roots[0])} (pass "
        "allow_outside_paths=True / --allow_outside_paths if that is intended)", where,
    )  # fmt: skip
    return False


def _report_duplicates(
    kept: list[tuple[_ImageEntry, list[str]]], values: list[Any] | None, merge: bool
) -> list[tuple[_ImageEntry, list[str]]]:
    """Warn about byte-identical images (`values`: their image values; `None`: not checked) and captions shared by
    several images; with `merge`, each group of identical images becomes one image with all their captions."""
    groups = duplicate_groups(values) if values is not None else []
    if groups:
        copies = sum(len(g) - 1 for g in groups)
        examples = "; ".join(" = ".join(kept[i][0].filename for i in g[:3]) for g in groups[:3])
        if merge:
            drop = {i for g in groups for i in g[1:]}
            for group in groups:
                for i in group[1:]:
                    kept[group[0]][1].extend(kept[i][1])
                kept[group[0]][0].caption_keys = None  # merged captions: the source caption ids are not kept
            kept = [item for i, item in enumerate(kept) if i not in drop]
            logger.warning("merged %d byte-identical image(s) into %d image(s) (e.g. %s)", copies + len(groups),
                           len(groups), examples)
        else:
            logger.warning(
                "%d image(s) are byte-identical copies of another (%d group(s), e.g. %s): the losses treat them as "
                "negatives of each other; merge_duplicate_images=True (--merge_duplicate_images) makes each group "
                "one image", copies, len(groups), examples,
            )  # fmt: skip
    shared = shared_captions([captions for _, captions in kept])
    if shared:
        top = sorted(shared.items(), key=lambda item: -item[1])[:3]
        logger.warning(
            "%d caption text(s) describe several images (e.g. %s): the binary loss pushes identical captions of "
            "different images apart", len(shared), "; ".join(f"{text!r:.60} x {n} images" for text, n in top),
        )  # fmt: skip
    return kept


def _validate_entries(
    entries: list[_ImageEntry],
    report: SkipReport,
    skip_invalid: bool,
    check_images: bool | None,
    image_value=lambda e: e.value,
    merge_duplicates: bool = False,
) -> list[tuple[_ImageEntry, list[str]]]:
    """Check captions and image files, report duplicates; return the kept entries with their cleaned captions."""
    kept: list[tuple[_ImageEntry, list[str]]] = []
    for entry in entries:
        captions: list[str] = []
        entry.kept = []
        for k, caption in enumerate(entry.captions):
            if not isinstance(caption, str):
                report.handle(
                    skip_invalid,
                    "non-string caption",
                    f"{entry.where}: caption {k} is {type(caption).__name__} {caption!r:.80}, expected a non-empty string",
                    f"{entry.where} caption {k}",
                )
            elif not caption.strip():
                report.handle(skip_invalid, "empty caption", f"{entry.where}: caption {k} is empty", f"{entry.where} caption {k}")
            else:
                captions.append(caption.strip())
                entry.kept.append(k)
        if not captions:
            why = "no valid caption left" if entry.captions else "no caption"
            report.handle(skip_invalid, "image with no caption", f"{entry.where}: image {entry.filename!r} has {why}", entry.where)
            continue
        if entry.path is not None and not os.path.isfile(entry.path):
            report.handle(skip_invalid, "missing image file", f"{entry.where}: image file not found: {entry.path}", entry.path)
            continue
        kept.append((entry, captions))

    if check_images is None:
        check_images = len(kept) <= AUTO_CHECK_MAX_IMAGES
        if not check_images:
            logger.info(
                "%d images: skipping the up-front decodability check (check_images=True forces it); corrupt images "
                "will be reported by the collator",
                len(kept),
            )
    if check_images and kept:
        bad = find_unreadable_images([image_value(e) for e, _ in kept])
        for i, error in bad.items():
            entry = kept[i][0]
            report.handle(
                skip_invalid,
                "unreadable image",
                f"{entry.where}: cannot read image {entry.path or entry.filename}: {error}",
                entry.path or entry.where,
            )
        kept = [item for i, item in enumerate(kept) if i not in bad]
    if not kept:
        raise InvalidDataError("no valid image-caption pair left" + (f" (skipped: {report.as_dict()})" if report.total else ""))
    # the byte digests read every file again: done when the images are checked (or duplicates are to be merged)
    values = [image_value(e) for e, _ in kept] if check_images or merge_duplicates else None
    return _report_duplicates(kept, values, merge_duplicates)


def _pair_columns(kept: list[tuple[_ImageEntry, list[str]]]) -> dict[str, list]:
    columns: dict[str, list] = {"caption": [], "image_id": [], "caption_id": [], "filename": []}
    for image_id, (entry, captions) in enumerate(kept):
        for caption in captions:
            columns["caption"].append(caption)
            columns["image_id"].append(image_id)
            columns["caption_id"].append(len(columns["caption_id"]))
            columns["filename"].append(entry.filename)
    if all(entry.image_key is not None for entry, _ in kept):
        columns["source_image_id"] = [entry.image_key for entry, captions in kept for _ in captions]
    caption_keys = [
        entry.caption_keys[k] if entry.caption_keys is not None and k < len(entry.caption_keys) else None
        for entry, _ in kept for k in entry.kept
    ]
    if all(key is not None for key in caption_keys):
        columns["source_caption_id"] = caption_keys
    return columns


def _features(columns: dict[str, list]) -> Features:
    return Features({**PAIR_FEATURES, **{k: v for k, v in SOURCE_ID_FEATURES.items() if k in columns}})


def _pairs_from_paths(kept: list[tuple[_ImageEntry, list[str]]]) -> Dataset:
    columns = _pair_columns(kept)
    columns["image"] = [entry.value for entry, captions in kept for _ in captions]
    features = _features(columns)
    return Dataset.from_dict({name: columns[name] for name in features}, features=features)


def _pairs_from_source(kept: list[tuple[_ImageEntry, list[str]]], source: Dataset, image_column: str) -> Dataset:
    """Pair view whose image column is copied (undecoded) from rows of ``source``."""
    columns = _pair_columns(kept)
    rows = [entry.value for entry, captions in kept for _ in captions]
    images = _undecoded(source.select_columns([image_column]), image_column).select(rows).flatten_indices()
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    for name, feature in _features(columns).items():
        if name != "image":
            images = images.add_column(name, columns[name], feature=feature)
    return images.cast_column("image", Image())


def _undecoded(ds: Dataset, column: str) -> Dataset:
    feature = ds.features[column]
    if isinstance(feature, Image) and not feature.decode:
        return ds
    if not isinstance(feature, Image) and not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"image column {column!r} has feature {feature}; expected datasets.Image() or file paths (string)")
    return ds.cast_column(column, Image(decode=False))


def _finish(kept, report: SkipReport, what: str, build) -> Dataset:
    report.log(logger, what)
    pairs = build(kept)
    logger.info("%s: %d images, %d captions", what, len(kept), len(pairs))
    return pairs


def _resolve_splits(split: str | Sequence[str], available: set[str], where: str) -> set[str]:
    wanted = [split] if isinstance(split, str) else list(split)
    resolved = set()
    for s in wanted:
        match = s if s in available else next((a for a in SPLIT_ALIASES.get(s, ()) if a in available), None)
        if match is None:
            raise ValueError(f"split {s!r} not found in {where}; available splits: {sorted(map(str, available))}")
        resolved.add(match)
    return resolved


# ----------------------------------------------------------------------------------------------------------------
# Karpathy layout


def _karpathy_files(folder: Path) -> list[Path]:
    """``dataset_*.json`` files of a folder, except ``save_to_disk``'s ``dataset_dict.json``/``dataset_info.json``."""
    return sorted(p for p in folder.glob("dataset_*.json") if p.name not in ("dataset_dict.json", "dataset_info.json"))


def _find_karpathy_json(path: Path) -> Path:
    if path.is_file():
        return path
    found = _karpathy_files(path)
    if not found:
        raise FileNotFoundError(f"no dataset_*.json (Karpathy layout) in {path}")
    if len(found) > 1:
        raise ValueError(f"several Karpathy files in {path}: {[f.name for f in found]}; pass the json file itself")
    return found[0]


def load_karpathy(
    path: str | os.PathLike,
    split: str | Sequence[str] = "train",
    *,
    image_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    check_images: bool | None = None,
    allow_outside_paths: bool = False,
    merge_duplicate_images: bool = False,
) -> Dataset:
    """Pair view of a Karpathy-layout split.

    Args:
        path: a ``dataset_*.json`` file or the folder holding exactly one.
        split: ``"train"``, ``"val"``, ``"test"``, ``"restval"`` (COCO) or a list of them (e.g. ``["train", "restval"]``);
            ``"validation"``/``"dev"`` fall back to ``"val"``.
        image_root: folder of the images; default ``<json folder>/images`` if it exists, else the json folder.
            An entry's image is ``image_root / entry.get("filepath", "") / entry["filename"]`` (COCO has ``filepath``).
        skip_invalid: skip (count, log) bad entries instead of raising :class:`InvalidDataError`.
        check_images: decode every image up front (``None``: only for splits of ≤ ``AUTO_CHECK_MAX_IMAGES`` images).
        allow_outside_paths: accept images outside ``image_root`` and the json folder (``..``, absolute paths).
        merge_duplicate_images: byte-identical images become one image with all their captions (else a warning).
    """
    json_path = _find_karpathy_json(Path(path))
    with open(json_path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise InvalidDataError(f"{json_path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InvalidDataError(f"{json_path}: expected a Karpathy file {{'images': [...]}}")
    if image_root is None:
        image_root = json_path.parent / "images" if (json_path.parent / "images").is_dir() else json_path.parent
    root = Path(image_root)
    available = {e.get("split") for e in data["images"] if isinstance(e, dict)}
    splits = _resolve_splits(split, available, str(json_path))

    report = SkipReport()
    entries: list[_ImageEntry] = []
    seen_files: dict[str, int] = {}
    seen_imgids: dict[Any, int] = {}
    seen_sentids: dict[Any, int] = {}
    for idx, e in enumerate(data["images"]):
        if not isinstance(e, dict) or e.get("split") not in splits:
            continue
        filename = e.get("filename")
        where = f"{json_path.name} images[{idx}]"
        if not isinstance(filename, str) or not filename:
            report.handle(skip_invalid, "entry without filename", f"{where}: missing or invalid 'filename'", where)
            continue
        rel = os.path.join(e.get("filepath") or "", filename)
        where = f"{where} ({rel})"
        if rel in seen_files:
            report.handle(
                skip_invalid, "duplicate image", f"{where}: duplicate filename {rel!r} (also images[{seen_files[rel]}])", where
            )
            continue
        if "imgid" in e and e["imgid"] in seen_imgids:
            report.handle(
                skip_invalid, "duplicate image", f"{where}: duplicate imgid {e['imgid']} (also images[{seen_imgids[e['imgid']]}])", where
            )
            continue
        sentences = e.get("sentences") or []
        if not isinstance(sentences, list):
            report.handle(skip_invalid, "malformed entry", f"{where}: 'sentences' must be a list", where)
            continue
        captions, caption_keys = [], []
        sentids = e.get("sentids") if isinstance(e.get("sentids"), list) else []
        for k, s in enumerate(sentences):
            sid = s.get("sentid") if isinstance(s, dict) else None
            if sid is not None and sid in seen_sentids:
                report.handle(
                    skip_invalid,
                    "duplicate caption id",
                    f"{where}: duplicate sentid {sid} in sentences[{k}] (also in images[{seen_sentids[sid]}])",
                    f"{where} sentences[{k}]",
                )
                continue
            if sid is not None:
                seen_sentids[sid] = idx
            captions.append(s.get("raw") if isinstance(s, dict) else s)
            key = sid if sid is not None else (sentids[k] if len(sentids) == len(sentences) else None)
            caption_keys.append(None if key is None else str(key))
        seen_files[rel] = idx
        if "imgid" in e:
            seen_imgids[e["imgid"]] = idx
        path_str = os.path.normpath(root / rel)
        if not _check_inside(report, skip_invalid, where, path_str, [root, json_path.parent], allow_outside_paths):
            continue
        image_key = None if e.get("cocoid") is None else str(e["cocoid"])
        entries.append(_ImageEntry(filename=rel, captions=captions, where=where, value=path_str, path=path_str,
                                   image_key=image_key, caption_keys=caption_keys))
    kept = _validate_entries(entries, report, skip_invalid, check_images, merge_duplicates=merge_duplicate_images)
    return _finish(kept, report, f"load_karpathy({json_path.name}, {sorted(splits)})", _pairs_from_paths)


# ----------------------------------------------------------------------------------------------------------------
# imagefolder with metadata.jsonl / metadata.csv


def _metadata_file(folder: Path) -> Path | None:
    found = [folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"both metadata.jsonl and metadata.csv in {folder}; keep one")
    return found[0] if found else None


def _read_metadata(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a metadata.jsonl / metadata.csv file."""
    rows = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte order mark is not part of the data
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InvalidDataError(f"{path} line {line_no}: invalid JSON: {err}") from err
                if not isinstance(row, dict):
                    raise InvalidDataError(f"{path} line {line_no}: expected a JSON object")
                rows.append((line_no, row))
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:  # else a BOM would prefix the first column's name
            reader = csv.DictReader(f)
            for row in reader:
                rows.append((reader.line_num, row))
    return rows


def _as_caption_list(value: Any) -> list[Any]:
    """A metadata caption cell → list of captions.

    A string cell that is a list literal counts as a list: JSON (``["a dog", "a cat"]``) or Python
    (``['a dog', 'a cat']``, as pandas writes a list column to CSV), the latter read with ``ast.literal_eval``, which
    evaluates literals only (never code). Bracketed text that is neither (``[sic] a dog]``) stays one caption.
    """
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.lstrip().startswith("[") and value.rstrip().endswith("]"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return [value]
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
    return [value]


def _caption_columns(caption_column: str | Sequence[str] | None, available: list[str], where: str) -> list[str]:
    if caption_column is None:
        found = [c for c in CAPTION_COLUMN_CANDIDATES if c in available]
        if not found:
            raise ValueError(
                f"no caption column in {where}: looked for {list(CAPTION_COLUMN_CANDIDATES)}; available columns: "
                f"{available} (pass caption_column=...)"
            )
        return found[:1]
    columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    missing = [c for c in columns if c not in available]
    if missing:
        raise ValueError(f"caption column(s) {missing} not found in {where}; available columns: {available}")
    return columns


def load_imagefolder(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    caption_column: str | Sequence[str] | None = None,
    skip_invalid: bool = False,
    check_images: bool | None = None,
    allow_outside_paths: bool = False,
    merge_duplicate_images: bool = False,
) -> Dataset:
    """Pair view of an HF-imagefolder-style folder with ``metadata.jsonl`` or ``metadata.csv``.

    Each metadata row has ``file_name`` (relative to the metadata file) and its captions: a ``caption`` string or a
    ``captions`` list (in CSV, a JSON list such as ``["a dog", "a brown dog"]`` or a Python one as pandas writes it,
    ``['a dog', 'a brown dog']``); a UTF-8 byte order mark is ignored; ``caption_column`` may name other
    columns (a list of columns contributes one caption each). Each ``file_name`` must appear once.
    Split lookup: ``<path>/<split>/metadata.*`` (``val``/``validation`` aliases), else ``<path>/metadata.*`` filtered by
    its ``split`` column if it has one; a flat folder without a split column is the ``"train"`` split.
    A ``file_name`` outside ``path`` (``..``, an absolute path) is an error unless ``allow_outside_paths``;
    ``merge_duplicate_images``: see :func:`load_karpathy`.
    """
    root = Path(path)
    meta = None
    if split is not None:
        for name in (split, *SPLIT_ALIASES.get(split, ())):
            if (root / name).is_dir() and (meta := _metadata_file(root / name)) is not None:
                break
    filter_split = False
    if meta is None:
        meta = _metadata_file(root)
        if meta is None:
            raise FileNotFoundError(f"no metadata.jsonl or metadata.csv in {root}" + (f" or {root / split}" if split else ""))
        filter_split = split is not None
    rows = _read_metadata(meta)
    if not rows:
        raise InvalidDataError(f"{meta} has no rows")
    available = list(dict.fromkeys(k for _, row in rows for k in row))
    if "file_name" not in available:
        raise ValueError(f"{meta}: no 'file_name' column; available columns: {available}")
    columns = _caption_columns(caption_column, available, str(meta))
    if filter_split:
        if "split" in available:
            splits = _resolve_splits(split, {row.get("split") for _, row in rows}, str(meta))
            rows = [(n, row) for n, row in rows if row.get("split") in splits]
        elif split != "train":
            raise ValueError(f"split {split!r} not found: {meta} has no 'split' column and there is no {root / split}")

    report = SkipReport()
    entries: list[_ImageEntry] = []
    seen: dict[str, int] = {}
    for line_no, row in rows:
        where = f"{meta.name} line {line_no}"
        file_name = row.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            report.handle(skip_invalid, "row without file_name", f"{where}: missing or empty 'file_name'", where)
            continue
        key = os.path.normpath(file_name)
        where = f"{where} ({file_name})"
        if key in seen:
            report.handle(
                skip_invalid,
                "duplicate image",
                f"{where}: duplicate file_name {file_name!r} (also line {seen[key]}); give each image one row "
                "with a 'captions' list",
                where,
            )
            continue
        seen[key] = line_no
        captions = [c for col in columns for c in _as_caption_list(row.get(col))]
        path_str = os.path.normpath(meta.parent / file_name)
        if not _check_inside(report, skip_invalid, where, path_str, [root], allow_outside_paths):
            continue
        image_key = None if row.get("image_id") in (None, "") else str(row["image_id"])
        caption_keys = None
        if row.get("caption_id") not in (None, ""):
            caption_keys = [str(key) for key in _as_caption_list(row["caption_id"])]
            if len(caption_keys) != len(captions):
                raise InvalidDataError(
                    f"{where}: {len(caption_keys)} caption_id value(s) for {len(captions)} caption(s); give one per caption"
                )
        entries.append(_ImageEntry(filename=file_name, captions=captions, where=where, value=path_str, path=path_str,
                                   image_key=image_key, caption_keys=caption_keys))
    kept = _validate_entries(entries, report, skip_invalid, check_images, merge_duplicates=merge_duplicate_images)
    return _finish(kept, report, f"load_imagefolder({meta})", _pairs_from_paths)


# ----------------------------------------------------------------------------------------------------------------
# Hub / save_to_disk / in-memory datasets


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _split_of_dataset(dataset: Dataset, split: str | Sequence[str], where: str) -> Dataset:
    """The rows of ``split`` in a single ``Dataset`` (not a ``DatasetDict``).

    A ``Dataset`` holds one split: the one it was created or saved as (``dataset.split``, e.g. ``"validation"``
    for ``load_dataset(..., split="validation")``), or ``"train"`` when it has no split name (``Dataset.from_dict``;
    the convention of ``datasets.load_dataset`` for plain data files). A ``split`` column, when present, names the
    split of each row instead, as in imagefolder metadata. Any other split name is an error listing what exists,
    so that a training split is never silently evaluated on as well.
    """
    if "split" in dataset.column_names:
        values = dataset.select_columns(["split"]).with_format("arrow")[:].column("split").to_pylist()
        splits = _resolve_splits(split, set(values), f"the 'split' column of {where}")
        rows = [i for i, value in enumerate(values) if value in splits]
        selected = dataset.select(rows)
        if "image_id" in selected.column_names and "caption_id" in selected.column_names:
            selected = densify_ids(selected)
        return selected
    own = str(dataset.split) if dataset.split is not None else "train"
    wanted = [split] if isinstance(split, str) else list(split)
    if all(s == own for s in wanted):
        return dataset
    hint = "" if dataset.split is not None else " (a Dataset without a split name is the 'train' split)"
    _resolve_splits(split, {own}, f"{where}, a single datasets.Dataset{hint}")
    return dataset


def resolve_image_column(dataset: Dataset, image_column: str | None, where: str, flag: str) -> str:
    """`image_column` checked against `dataset`'s columns, or, when None, the column named "image", else the first
    `datasets.Image` column; a clear error naming `where`, the columns and the `flag` to pass otherwise."""
    available = dataset.column_names
    if image_column is None:
        image_columns = [c for c, f in dataset.features.items() if isinstance(f, Image)]
        image_column = "image" if "image" in available else (image_columns[0] if image_columns else None)
        if image_column is None:
            raise ValueError(f"no image column in {where}; available columns: {available} (pass {flag})")
    elif image_column not in available:
        raise ValueError(f"image column {image_column!r} not found in {where}; available columns: {available}")
    return image_column


def load_hf_dataset(
    dataset: str | os.PathLike | Dataset | DatasetDict,
    split: str = "train",
    *,
    image_column: str | None = None,
    caption_column: str | Sequence[str] | None = None,
    image_id_column: str | None = None,
    skip_invalid: bool = False,
    check_images: bool | None = None,
    merge_duplicate_images: bool = False,
    **load_kwargs,
) -> Dataset:
    """Pair view of an image-level dataset: a ``Dataset``/``DatasetDict``, a ``save_to_disk`` folder or a Hub id
    (``datasets.load_dataset(name, split=split, **load_kwargs)``, online only).

    Args:
        image_column: a ``datasets.Image`` column or a column of file paths; default ``"image"`` or the first Image
            column.
        caption_column: one column (string or list of strings per row) or a list of string columns; default the first
            of ``caption``, ``captions``, ``text``, ``sentences``.
        image_id_column: rows sharing this column's value are one image (datasets with one row per caption);
            without it every row is a distinct image.
    An already built pair view (with ``image_id``/``caption_id``) is returned as is, after checking its ids.

    ``split`` picks a split of a ``DatasetDict``; of a single ``Dataset`` see :func:`_split_of_dataset` (its own
    split name, ``"train"`` without one, or its ``split`` column); an unknown split is an error listing what exists.
    """
    name = dataset if isinstance(dataset, str) else None
    split_applied = False  # datasets.load_dataset(split=split) already picked the rows of `split`
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        if path.is_dir() and _is_saved_dataset(path):
            dataset = load_from_disk(str(path))
            name = str(path)
        else:
            dataset = load_dataset(str(dataset), split=split, **load_kwargs)
            split_applied = True
    if isinstance(dataset, DatasetDict):
        splits = _resolve_splits(split, set(dataset), name or "the DatasetDict")
        dataset = dataset[splits.pop()]
    elif isinstance(dataset, Dataset) and not split_applied:
        dataset = _split_of_dataset(dataset, split, name or "the dataset")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    where = name or "the dataset"
    available = dataset.column_names
    if "image_id" in available and "caption_id" in available:
        check_pair_view(dataset)
        ImageCaptionIndex.from_pairs(dataset)  # raises on duplicate / non-dense ids
        if isinstance(dataset.features["image"], Value):  # saved by reference (`with_image_paths`)
            dataset = dataset.cast_column("image", Image())
        return dataset

    image_column = resolve_image_column(dataset, image_column, where, "image_column=...")
    columns = _caption_columns(caption_column, available, where)
    if image_id_column is not None and image_id_column not in available:
        raise ValueError(f"image_id column {image_id_column!r} not found in {where}; available columns: {available}")

    undecoded = _undecoded(dataset.select_columns([image_column]), image_column)
    image_table = undecoded.flatten().with_format("arrow")[:]
    paths = image_table.column(f"{image_column}.path").to_pylist()
    has_bytes = image_table.column(f"{image_column}.bytes").is_valid().to_numpy(zero_copy_only=False)
    del image_table
    caption_values = {c: dataset.select_columns([c]).with_format("arrow")[:].column(c).to_pylist() for c in columns}
    group_keys = (
        dataset.select_columns([image_id_column]).with_format("arrow")[:].column(image_id_column).to_pylist()
        if image_id_column
        else None
    )

    entries: list[_ImageEntry] = []
    by_key: dict[Any, _ImageEntry] = {}
    for row in range(len(dataset)):
        captions = [c for col in columns for c in _as_caption_list(caption_values[col][row])]
        if group_keys is not None and group_keys[row] in by_key:
            by_key[group_keys[row]].captions.extend(captions)
            continue
        path = paths[row]
        filename = os.path.basename(path) if path else f"row{row}"
        # a path-only image on local disk: check that the file exists
        local = path if path and not has_bytes[row] and os.path.isabs(path) else None
        entry = _ImageEntry(filename=filename, captions=captions, where=f"{where} row {row}", value=row, path=local)
        if group_keys is not None:
            by_key[group_keys[row]] = entry
        entries.append(entry)

    report = SkipReport()
    kept = _validate_entries(
        entries, report, skip_invalid, check_images, image_value=lambda e: undecoded[int(e.value)][image_column],
        merge_duplicates=merge_duplicate_images,
    )
    return _finish(kept, report, f"load_hf_dataset({where})", lambda k: _pairs_from_source(k, dataset, image_column))


# ----------------------------------------------------------------------------------------------------------------
# dispatcher and helpers


def load_pairs(
    data: str | os.PathLike | Dataset | DatasetDict,
    split: str | Sequence[str] = "train",
    image_column: str | None = None,
    caption_column: str | Sequence[str] | None = None,
    skip_invalid: bool = False,
    check_images: bool | None = None,
    image_id_column: str | None = None,
    allow_outside_paths: bool = False,
    merge_duplicate_images: bool = False,
    **kwargs,
) -> Dataset:
    """Pair view of ``split`` of ``data``, dispatching on what ``data`` is:

    - a ``Dataset``/``DatasetDict`` → :func:`load_hf_dataset`;
    - a ``.json`` file, or a folder with ``dataset_*.json`` → :func:`load_karpathy` (``kwargs``: ``image_root``);
    - a folder with ``metadata.jsonl``/``metadata.csv`` (or ``<split>/metadata.*``) → :func:`load_imagefolder`;
    - a ``save_to_disk`` folder → :func:`load_hf_dataset`;
    - another folder → ``datasets.load_dataset(folder, split=split, **kwargs)`` (parquet, csv, json, arrow files);
    - any other string → ``datasets.load_dataset(data, split=split, **kwargs)`` on the Hub (needs network).

    ``image_column``/``caption_column``/``image_id_column``: see :func:`load_hf_dataset` (``caption_column`` also
    applies to imagefolder metadata). ``allow_outside_paths`` (Karpathy, imagefolder): accept image paths outside
    the dataset folder; ``merge_duplicate_images``: byte-identical images become one image id.
    """
    common = dict(skip_invalid=skip_invalid, check_images=check_images, merge_duplicate_images=merge_duplicate_images)
    files = dict(allow_outside_paths=allow_outside_paths)
    hf = dict(image_column=image_column, caption_column=caption_column, image_id_column=image_id_column, **common)
    if isinstance(data, (Dataset, DatasetDict)):
        return load_hf_dataset(data, split, **hf)
    path = Path(data).expanduser()
    is_karpathy = (path.is_file() and path.suffix == ".json") or (path.is_dir() and bool(_karpathy_files(path)))
    if is_karpathy:
        if image_column is not None or caption_column is not None or image_id_column is not None:
            raise ValueError(
                "Karpathy-layout data has fixed columns (filename, sentences[].raw): drop image_column/caption_column/"
                "image_id_column"
            )
        return load_karpathy(path, split, **common, **files, **kwargs)
    if path.is_file():
        raise ValueError(f"unsupported data file {path}: expected a Karpathy dataset_*.json")
    if path.is_dir():
        split_names = (split, *SPLIT_ALIASES.get(split, ())) if isinstance(split, str) else ()
        split_dirs = [path / name for name in split_names]
        if _metadata_file(path) is not None or any(d.is_dir() and _metadata_file(d) for d in split_dirs):
            if not isinstance(split, str):
                raise ValueError("imagefolder data takes one split name")
            if image_column not in (None, "file_name") or image_id_column is not None:
                raise ValueError("imagefolder data has one row per image named in 'file_name': drop image_column/image_id_column")
            return load_imagefolder(path, split, caption_column=caption_column, **common, **files)
        if _is_saved_dataset(path):
            return load_hf_dataset(path, split, **hf)
        if not isinstance(split, str):
            raise ValueError("datasets.load_dataset folders take one split name")
        try:  # a folder of data files (parquet, csv, json, arrow, ...) that datasets.load_dataset understands
            dataset = load_dataset(str(path), split=split, **kwargs)
        except Exception as err:
            raise ValueError(
                f"unrecognised data folder {path}: expected dataset_*.json (Karpathy), metadata.jsonl/metadata.csv "
                f"(imagefolder), a datasets.save_to_disk folder or data files for datasets.load_dataset, which "
                f"failed with {type(err).__name__}: {err}"
            ) from err
        return load_hf_dataset(dataset, split, **hf)
    text = str(data)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise FileNotFoundError(f"data path not found: {text}")
    if not isinstance(split, str):
        raise ValueError("Hub datasets take one split name")
    return load_hf_dataset(text, split, **hf, **kwargs)


def with_image_paths(pairs: Dataset) -> Dataset:
    """The pair view with its ``image`` column as absolute file paths (strings) when every image is a file on disk,
    so that ``save_to_disk`` stores references instead of copying every image into the saved folder (it embeds the
    bytes of ``datasets.Image`` columns); ``load_pairs`` on the saved folder turns the paths back into images, and
    the lock-boundary caches find the images by file as before. Images held as bytes are kept as they are."""
    undecoded = _undecoded(pairs.select_columns(["image"]), "image").flatten().with_format("arrow")[:]
    paths = undecoded.column("image.path").to_pylist()
    has_bytes = undecoded.column("image.bytes").is_valid().to_numpy(zero_copy_only=False)
    if has_bytes.any() or not all(p and os.path.isfile(p) for p in paths):
        return pairs
    columns = [c for c in pairs.column_names if c != "image"]
    return pairs.select_columns(columns).add_column("image", [os.path.abspath(p) for p in paths])


def densify_ids(pairs: Dataset) -> Dataset:
    """Renumber ``image_id`` and ``caption_id`` to dense ranges (keeping their order), e.g. after ``filter``/``select``."""
    check_pair_view(pairs)
    cols = pair_columns_numpy(pairs, ["image_id", "caption_id"])
    image_ids, caption_ids = (np.asarray(cols[k], dtype=np.int64) for k in ("image_id", "caption_id"))
    new_image = np.searchsorted(np.unique(image_ids), image_ids)
    new_caption = np.searchsorted(np.unique(caption_ids), caption_ids)
    if len(np.unique(caption_ids)) != len(caption_ids):
        ImageCaptionIndex.from_pairs(pairs)  # raises, naming the duplicate rows
    out = pairs.flatten_indices() if pairs._indices is not None else pairs
    out = out.remove_columns(["image_id", "caption_id"])
    out = out.add_column("image_id", new_image.tolist(), feature=Value("int64"))
    out = out.add_column("caption_id", new_caption.tolist(), feature=Value("int64"))
    return out.select_columns([c for c in pairs.column_names])


def validate_images(pairs: Dataset, skip_invalid: bool = False, num_threads: int | None = None) -> Dataset:
    """Decode every image of a pair view once (progress bar); raise naming the file and row of the first corrupt
    image, or with ``skip_invalid`` drop all rows of corrupt images, log the count and renumber the ids."""
    check_pair_view(pairs)
    index = ImageCaptionIndex.from_pairs(pairs)
    undecoded = without_image_decoding(pairs)
    rows = index.image_row.tolist()
    bad = find_unreadable_images([undecoded[r]["image"] for r in rows], num_threads=num_threads)
    if not bad:
        return pairs
    report = SkipReport()
    for i in sorted(bad):
        where = f"row {rows[i]} (image_id {i}, {index.filenames[i] or describe_image(undecoded[rows[i]]['image'])})"
        report.handle(skip_invalid, "unreadable image", f"cannot read image at {where}: {bad[i]}", where)
    report.log(logger, "validate_images")
    image_ids = np.asarray(pair_columns_numpy(pairs, ["image_id"])["image_id"])
    keep = np.flatnonzero(~np.isin(image_ids, np.asarray(sorted(bad))))
    if len(keep) == 0:
        raise InvalidDataError(f"no readable image left ({len(bad)} unreadable)")
    return densify_ids(pairs.select(keep))


def without_image_decoding(pairs: Dataset) -> Dataset:
    """The pair view with ``image`` left undecoded (``{"path", "bytes"}``); give this to a DataLoader so that the
    collator, not ``Dataset.__getitem__``, decodes images and can report or skip (``skip_invalid``) corrupt ones."""
    return pairs.cast_column("image", Image(decode=False))
