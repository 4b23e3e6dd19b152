"""WebDataset shards: shard patterns → shard lists, and shards → decoded gallery samples.

A shard is a ``.tar`` archive (webdataset layout, as written by img2dataset / open_clip tooling) whose members are
grouped into samples by key: ``000123.jpg``, ``000123.txt``, ``000123.json`` form sample ``"000123"`` (the key is
the member path up to the first dot of its base name; a sample's members are consecutive). A sample holds

    one image      .jpg .jpeg .png .webp .bmp .gif .tif .tiff       (the first one met)
    its captions   .json: a list of strings, or an object with ``captions`` (list) / ``caption`` / ``text`` (str)
                   .txt:  one caption (the whole text, stripped), as open_clip reads LAION shards
                   the json's ``captions`` list wins over ``.txt``, which wins over the json's ``caption``/``text``

:func:`expand_shard_pattern` turns ``path/shard-{000000..000099}.tar`` (zero-padded numeric ranges, ``{a,b}``
alternatives, several braces, ``::``-separated patterns as open_clip) into the list of shards; local shards must
exist, fsspec URLs (``s3://``, ``https://``, ``hf://`` ...) are kept as strings and opened by fsspec.

:func:`iter_shard_samples` yields ``{"key", "image", "captions", "url"}`` per sample, the image as bytes (or
decoded to RGB ``PIL.Image`` with ``decode_images=True``). Bad input (an unreadable or truncated shard, a sample
without an image or without captions, a corrupt image when decoding) raises :class:`InvalidDataError` naming the
shard and the sample key; with ``skip_invalid=True`` it is counted in the given :class:`SkipReport` and skipped.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from typing import Any, Iterable, Iterator

from .errors import InvalidDataError, SkipReport
from .image_loading import ImageLoadError, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS", "expand_braces", "expand_shard_pattern", "is_shard_pattern", "is_url", "iter_shard_samples",
    "sample_captions", "split_member_name",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``protocol://...``) rather than a local path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", path)) and not path.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion, in order: ``{000..003}`` → 000 001 002 003 (width of the wider bound, zero-padded when a
    bound has a leading zero), ``{a,b}`` → a b; several braces give their cartesian product (leftmost slowest)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        start, stop = int(lo), int(hi)
        if stop < start:
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        padded = (len(lo) > 1 and lo.startswith("0")) or (len(hi) > 1 and hi.startswith("0"))
        width = max(len(lo), len(hi)) if padded else 0
        choices = [str(n).zfill(width) for n in range(start, stop + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def expand_shard_pattern(pattern: str | os.PathLike | Iterable[str]) -> list[str]:
    """The shards named by ``pattern``: brace patterns expanded, ``::`` separating several patterns, a local folder
    standing for its ``*.tar`` files (sorted) and local ``*``/``?`` globs expanded; fsspec URLs are kept as they
    are (no existence check: fsspec reports a missing one when it is opened).

    Raises ``InvalidDataError`` when a local pattern names no existing file (listing the first missing ones)."""
    if not isinstance(pattern, (str, os.PathLike)):
        return [shard for item in pattern for shard in expand_shard_pattern(item)]
    pattern = os.fspath(pattern)
    shards: list[str] = []
    for part in filter(None, pattern.split("::")):
        for path in expand_braces(part):
            if is_url(path):
                shards.append(path)
                continue
            path = path[len("file://") :] if path.startswith("file://") else path
            path = os.path.expanduser(path)
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not found:
                    raise InvalidDataError(f"shard folder {path} holds no .tar file")
                shards.extend(found)
            elif glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise InvalidDataError(f"shard pattern {path!r} matches no file")
                shards.extend(found)
            else:
                shards.append(path)
    if not shards:
        raise InvalidDataError(f"shard pattern {pattern!r} names no shard")
    missing = [s for s in shards if not is_url(s) and not os.path.isfile(s)]
    if missing:
        what = "matches no local file" if len(missing) == len(shards) else f"names {len(missing)} missing shard(s)"
        raise InvalidDataError(f"shard pattern {pattern!r} {what} (first: {', '.join(missing[:3])})")
    return shards


def is_shard_pattern(data: str | os.PathLike) -> bool:
    """Whether ``data`` names webdataset shards (each ``::`` part ends in ``.tar``, braces allowed)."""
    parts = [p for p in os.fspath(data).split("::") if p]
    return bool(parts) and all(p.rstrip("}").lower().endswith(".tar") or p.lower().endswith(".tar") for p in parts)


def split_member_name(name: str) -> tuple[str | None, str]:
    """``dir/000123.tar.txt``-style member name → (key ``dir/000123``, extension ``tar.txt``), webdataset's rule."""
    directory, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def sample_captions(fields: dict[str, bytes], where: str) -> list[str]:
    """The captions of one sample's members (see the module docstring for the precedence); non-empty, stripped."""
    meta: Any = None
    if "json" in fields:
        try:
            meta = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidDataError(f"{where}: unreadable .json ({err})") from None
    captions: Any = None
    if isinstance(meta, list):
        captions = meta
    elif isinstance(meta, dict) and isinstance(meta.get("captions"), list):
        captions = meta["captions"]
    elif "txt" in fields:
        try:
            captions = [fields["txt"].decode("utf-8")]
        except UnicodeDecodeError as err:
            raise InvalidDataError(f"{where}: .txt is not UTF-8 ({err})") from None
    elif isinstance(meta, dict):
        text = meta.get("caption", meta.get("text"))
        captions = [text] if text is not None else None
    if not captions:
        raise InvalidDataError(f"{where}: no caption (expected a .txt, or a .json list / 'captions' / 'caption')")
    bad = [c for c in captions if not isinstance(c, str) or not c.strip()]
    if bad:
        raise InvalidDataError(f"{where}: caption {bad[0]!r:.60} is not a non-empty string")
    return [c.strip() for c in captions]


def _open_shard(url: str):
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url[len("file://") :] if url.startswith("file://") else url, "rb")


def _build_sample(url: str, key: str, fields: dict[str, bytes], decode_images: bool) -> dict[str, Any]:
    where = f"shard {url}, sample {key!r}"
    image_ext = next((ext for ext in fields if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        raise InvalidDataError(f"{where}: no image (members: {', '.join(sorted(fields)) or 'none'})")
    captions = sample_captions(fields, where)
    image: Any = fields[image_ext]
    if decode_images:
        image = load_image({"bytes": image, "path": f"{key}.{image_ext}"}, where=where)
    return {"key": key, "image": image, "captions": captions, "url": url, "image_ext": image_ext}


def _iter_members(url: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each regular member of one shard, read as a stream."""
    with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key is None:
                continue
            handle = archive.extractfile(member)
            yield key, ext, handle.read() if handle is not None else b""


def iter_shard_samples(
    urls: str | Iterable[str],
    decode_images: bool = False,
    skip_invalid: bool = False,
    report: SkipReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield each sample of the shards, in shard order: ``{"key", "image", "captions", "url", "image_ext"}``.

    ``urls``: shard paths / URLs or a pattern (:func:`expand_shard_pattern`). ``image`` is the encoded bytes, or an
    RGB ``PIL.Image`` with ``decode_images=True``. Bad samples and unreadable shards raise ``InvalidDataError``
    naming the shard and key, or with ``skip_invalid`` are counted in ``report`` (reasons: ``sample without an
    image or caption``, ``unreadable image``, ``unreadable shard``) and skipped; the rest of a shard that breaks
    part-way is skipped with it."""
    report = report if report is not None else SkipReport()
    shards = expand_shard_pattern(urls) if isinstance(urls, (str, os.PathLike)) else list(urls)
    for url in shards:
        key, fields, last = None, {}, None
        try:
            for member_key, ext, data in _iter_members(url):
                if member_key != key:
                    if key is not None:
                        sample = _checked(url, key, fields, decode_images, skip_invalid, report)
                        if sample is not None:
                            yield sample
                    key, fields, last = member_key, {}, key
                if ext in fields:
                    raise InvalidDataError(f"shard {url}, sample {key!r}: two .{ext} members (samples must be "
                                           "consecutive in the archive)")
                fields[ext] = data
        except (tarfile.TarError, OSError, EOFError) as err:
            where = f"shard {url}" + (f" after sample {key or last!r}" if key or last else "")
            report.handle(skip_invalid, "unreadable shard", f"{where}: unreadable ({type(err).__name__}: {err})", url)
            continue
        if key is not None:
            sample = _checked(url, key, fields, decode_images, skip_invalid, report)
            if sample is not None:
                yield sample


def _checked(url, key, fields, decode_images, skip_invalid, report) -> dict[str, Any] | None:
    try:
        return _build_sample(url, key, fields, decode_images)
    except ImageLoadError as err:
        report.handle(skip_invalid, "unreadable image", str(err), f"{url}:{key}")
    except InvalidDataError as err:
        report.handle(skip_invalid, "sample without an image or caption", str(err), f"{url}:{key}")
    return None
