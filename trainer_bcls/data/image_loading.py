"""Turn whatever a dataset row holds in its image column into an RGB ``PIL.Image`` (or a clear error).

A row's image may be a decoded ``PIL.Image`` (``datasets.Image()``), the undecoded ``{"path", "bytes"}`` dict
(``datasets.Image(decode=False)``), a path, raw bytes or an ``np.ndarray``. Decoding follows ``datasets.Image``
(EXIF orientation applied) and always ends in 8-bit RGB (:func:`to_rgb`).

Decoded size is bounded: an image of more than ``max_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS`, 32 M, or
``$BCLS_MAX_IMAGE_PIXELS``) is decoded at 1/2, 1/4 or 1/8 scale when it is a JPEG (draft mode), else refused with an
error naming the file, so that a small compressed file cannot take gigabytes. A path that is not a regular file
(a named pipe, a device, a folder) is refused before it is opened.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from .errors import InvalidDataError

MAX_IMAGE_PIXELS = int(os.environ.get("BCLS_MAX_IMAGE_PIXELS", 32_000_000))  # ~96 MB as RGB; PIL warns at 89 M

# What PIL raises on unreadable, truncated or corrupt files.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


class ImageLoadError(InvalidDataError):
    """An image file is missing, unreadable or corrupt; the message names the file and the row."""


def image_path(value: Any) -> str | None:
    """The file path behind an image value, if any."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "filename", None) or None


def describe_image(value: Any) -> str:
    """Short human description of an image value for error messages."""
    path = image_path(value)
    if path:
        return path
    if isinstance(value, dict) and value.get("bytes") is not None:
        return f"<{len(value['bytes'])} bytes in memory>"
    return f"<{type(value).__name__}>"


# Single-channel modes whose values are not 0..255: PIL's convert("RGB") clips them at 255 (a 16-bit image turns white).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WIDE_MODES = (*_UINT16_MODES, "I", "F")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` as 8-bit RGB; wide single-channel modes are rescaled from the range of their mode, not clipped.

        I;16 (uint16, 16-bit PNG/TIFF):  v8 = round(v / 257)                    0..65535 → 0..255 (65535/255 = 257)
        I    (int32, PIL's mode for 16-bit PNGs too):  the same, after clipping v to 0..65535
        F    (float32):  v8 = round(255 · clip(v, 0, 1))                        floats taken as the 0..1 convention

    The mapping depends on the mode only (never on an image's own min/max), so an image keeps its brightness and two
    images of a dataset keep their relative brightness. Other modes (L, P, LA, RGBA, CMYK, ...) use ``convert("RGB")``.
    """
    image.load()  # a lazily opened file is read now, while it is open
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image)
        if image.mode == "F":
            scaled = np.clip(np.nan_to_num(values.astype(np.float64)), 0.0, 1.0) * 255.0
        else:
            scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
        image = PIL.Image.fromarray(np.rint(scaled).astype(np.uint8))  # mode L
    return image.convert("RGB")


class ImageTooLargeError(ValueError):
    """An image has more pixels than the decoding bound allows."""


def _regular_file(path: str | os.PathLike) -> str | os.PathLike:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a regular file: {os.fspath(path)}" if os.path.exists(path) else
                                f"no such file: {os.fspath(path)}")
    return path


def bound_pixels(image: PIL.Image.Image, max_pixels: int | None) -> PIL.Image.Image:
    """Make a lazily opened ``image`` decode to at most ``max_pixels`` pixels: JPEG draft mode at 1/2..1/8 scale,
    else :class:`ImageTooLargeError` (raised before any pixel is decoded)."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image
    if image.format == "JPEG":
        for scale in (2, 4, 8):
            if math.ceil(width / scale) * math.ceil(height / scale) <= max_pixels:
                image.draft(image.mode if image.mode in ("RGB", "L") else "RGB",
                            (math.ceil(width / scale), math.ceil(height / scale)))
                if image.size[0] * image.size[1] <= max_pixels:
                    return image
                break
    raise ImageTooLargeError(
        f"{width} x {height} = {width * height} pixels exceeds the decoding bound of {max_pixels} "
        "(--max_image_pixels, or $BCLS_MAX_IMAGE_PIXELS)"
    )


def _open(value: Any) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return PIL.Image.fromarray(value)
    if isinstance(value, (bytes, bytearray)):
        return PIL.Image.open(io.BytesIO(value))
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return PIL.Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return PIL.Image.open(_regular_file(value["path"]))
        raise ValueError("image value has neither 'bytes' nor 'path'")
    if isinstance(value, (str, os.PathLike)):
        return PIL.Image.open(_regular_file(value))
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def load_image(value: Any, *, where: str = "", max_pixels: int | None = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Decode ``value`` into an RGB image; raise :class:`ImageLoadError` naming the file and ``where`` (the row).

    Decoding happens here (``Image.load()``), so truncated or corrupt files fail at this call, not later; at most
    ``max_pixels`` pixels are decoded (:func:`bound_pixels`; ``None``: no bound).
    """
    try:
        image = _open(value)
        if not isinstance(value, PIL.Image.Image):
            image = bound_pixels(image, max_pixels)
        image.load()
        if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
            image = PIL.ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (*_PIL_ERRORS, TypeError) as err:
        suffix = f" ({where})" if where else ""
        raise ImageLoadError(f"cannot read image {describe_image(value)}{suffix}: {type(err).__name__}: {err}") from err


def check_image(value: Any) -> str | None:
    """Fully decode ``value`` (JPEGs in 1/8-scale draft mode, which still reads every byte) and return ``None``
    if it is a valid image, else the error text. Never raises for bad files."""
    try:
        if isinstance(value, PIL.Image.Image):
            return None
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path") and not os.path.isfile(value["path"]):
            return "file not found"
        if isinstance(value, (str, os.PathLike)) and not os.path.isfile(value):
            return "file not found"
        with _open(value) as image:
            bound_pixels(image, MAX_IMAGE_PIXELS)  # what `load_image` would refuse
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except (*_PIL_ERRORS, TypeError) as err:
        return f"{type(err).__name__}: {err}"


def find_unreadable_images(
    values: list[Any], *, num_threads: int | None = None, desc: str = "Checking images"
) -> dict[int, str]:
    """Decode-check every image value (threads, progress bar); return ``{position: error}`` for the bad ones."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    bad: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = pool.map(check_image, values)
        for i, error in enumerate(tqdm(results, total=len(values), desc=desc, disable=len(values) < 1000)):
            if error is not None:
                bad[i] = error
    return bad
