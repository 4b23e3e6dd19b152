"""A deterministic, offline synthetic image-caption dataset in the Karpathy layout.

Each image is a scene of 1-3 coloured shapes (circle/square/triangle/diamond; red/green/blue/yellow/purple/orange;
small/large; left/right/top/bottom) on a white/black/gray background. Each image gets ``captions_per_image``
paraphrases built from different templates and synonyms ("a large red circle on the left", "there is a big red
round shape at the left side of a white picture", ...); some paraphrases leave out the size or the background.
Captions of different images share attributes, so caption-caption similarity, and with it the continuous
relevance label, is graded rather than binary. The attributes are large and flat-coloured so that tiny towers learn
the task in minutes on a CPU.

``make_synthetic_dataset(out_dir)`` writes ``dataset_synthetic.json`` + ``images/*.png`` (same bytes for the same
arguments); ``default_synthetic_dir()`` returns the cached copy the demo and the tests use, generating it on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from ..cache import bcls_cache_dir

logger = logging.getLogger(__name__)

SYNTHETIC_VERSION = "v1"
SPLITS = ("train", "val", "test")

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (145, 50, 190),
    "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (125, 125, 125)}
SIZES: dict[str, float] = {"small": 0.18, "large": 0.34}  # shape extent as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78)}

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": ("circle", "round shape", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "diamond": ("diamond", "rhombus"),
}
POSITION_WORDS = {
    "left": ("on the left", "at the left side", "in the left part"),
    "right": ("on the right", "at the right side", "in the right part"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# Scene templates: {objs} = the shape phrases, {bg} = background colour, {n} = number of shapes.
SCENE_TEMPLATES = (
    "{objs}",
    "{objs} on a {bg} background",
    "there is {objs} in a {bg} picture",
    "a {bg} image showing {objs}",
    "a picture of {objs}",
    "{bg} background with {objs}",
    "an image with {n} {shape_word}: {objs}",
    "{objs}, drawn on {bg}",
)
# Shape phrase templates; the second one leaves out the size.
OBJECT_TEMPLATES = ("{size} {colour} {shape} {pos}", "{colour} {shape} {pos}", "{size} {shape} in {colour} {pos}")

Shape = tuple[str, str, str, str]  # (size, colour, shape, position)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sample_scene(rng: random.Random) -> tuple[str, tuple[Shape, ...]]:
    num = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
    positions = rng.sample(sorted(POSITIONS), num)
    shapes = tuple(
        (rng.choice(sorted(SIZES)), rng.choice(sorted(COLOURS)), rng.choice(SHAPES), pos) for pos in sorted(positions)
    )
    return rng.choice(sorted(BACKGROUNDS)), shapes


def _object_phrase(rng: random.Random, shape: Shape) -> str:
    size, colour, kind, pos = shape
    template = rng.choice(OBJECT_TEMPLATES)
    phrase = template.format(
        size=rng.choice(SIZE_WORDS[size]),
        colour=colour,
        shape=rng.choice(SHAPE_WORDS[kind]),
        pos=rng.choice(POSITION_WORDS[pos]),
    )
    return _article(phrase)


def _caption(rng: random.Random, background: str, shapes: tuple[Shape, ...], template: str) -> str:
    order = list(shapes)
    rng.shuffle(order)
    phrases = [_object_phrase(rng, s) for s in order]
    objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    n = len(shapes)
    return template.format(objs=objs, bg=background, n=NUMBER_WORDS[n], shape_word="shape" if n == 1 else "shapes")


def _captions(rng: random.Random, background: str, shapes: tuple[Shape, ...], count: int) -> list[str]:
    captions: list[str] = []
    for _ in range(50 * count):
        templates = rng.sample(SCENE_TEMPLATES, min(count, len(SCENE_TEMPLATES)))
        for template in templates:
            caption = _caption(rng, background, shapes, template)
            if caption not in captions:
                captions.append(caption)
            if len(captions) == count:
                return captions
    raise RuntimeError(f"could not generate {count} distinct captions")  # pragma: no cover


def _draw(rng: random.Random, background: str, shapes: tuple[Shape, ...], image_size: int) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = PIL.ImageDraw.Draw(image)
    jitter = 0.03 * image_size
    for size, colour, kind, pos in shapes:
        cx, cy = POSITIONS[pos]
        cx = cx * image_size + rng.uniform(-jitter, jitter)
        cy = cy * image_size + rng.uniform(-jitter, jitter)
        r = SIZES[size] * image_size / 2
        fill = COLOURS[colour]
        if kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif kind == "square":
            s = 0.88 * r  # equal area-ish with the circle
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_train_images: int = 600,
    num_val_images: int = 100,
    num_test_images: int = 100,
    captions_per_image: int = 5,
    image_size: int = 64,
    seed: int = 0,
    image_format: str = "png",
) -> Path:
    """Write the synthetic dataset to ``out_dir`` in the Karpathy layout and return ``out_dir``.

    Files: ``dataset_synthetic.json`` (``images[]`` with ``filename``, ``imgid``, ``split``, ``sentences[]`` with
    ``raw``/``tokens``/``sentid``, plus ``scene`` with the ground-truth attributes) and ``images/<split>_<i>.png``.
    Output bytes depend only on the arguments (scenes are unique across the whole dataset).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if not 1 <= captions_per_image <= len(SCENE_TEMPLATES):
        raise ValueError(f"captions_per_image must be in 1..{len(SCENE_TEMPLATES)}, got {captions_per_image}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train_images, "val": num_val_images, "test": num_test_images}
    entries, seen = [], set()
    imgid = sentid = 0
    for split_index, split in enumerate(SPLITS):
        rng = random.Random(seed * 1_000_003 + split_index)
        for i in range(counts[split]):
            while True:
                background, shapes = _sample_scene(rng)
                if (background, shapes) not in seen:
                    seen.add((background, shapes))
                    break
            captions = _captions(rng, background, shapes, captions_per_image)
            filename = f"{split}_{i:05d}.{image_format}"
            image = _draw(rng, background, shapes, image_size)
            if image_format == "png":
                image.save(out / "images" / filename, format="PNG", optimize=False, compress_level=6)
            else:
                image.save(out / "images" / filename, format="JPEG", quality=95)
            sentences = [
                {"raw": c, "tokens": re.findall(r"[a-z]+", c.lower()), "sentid": sentid + k, "imgid": imgid}
                for k, c in enumerate(captions)
            ]
            entries.append(
                {
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentences": sentences,
                    "sentids": [s["sentid"] for s in sentences],
                    "scene": {"background": background, "shapes": [dict(zip(("size", "colour", "shape", "position"), s)) for s in shapes]},
                }
            )
            imgid += 1
            sentid += len(sentences)
    with open(out / "dataset_synthetic.json", "w", encoding="utf-8") as f:
        json.dump({"dataset": "synthetic", "images": entries}, f, indent=None, sort_keys=True)
    return out


def default_synthetic_dir(seed: int = 0, create: bool = True, **kwargs) -> Path:
    """Cached synthetic dataset: ``<cache>/synthetic-v1-seed<seed>[-<hash of non-default kwargs>]``.

    The cache root is ``$BCLS_CACHE``, else ``$XDG_CACHE_HOME/bcls``, else ``~/.cache/bcls``. With ``create``
    (default) the dataset is generated on first use into a temporary sibling directory and renamed into place, so
    concurrent first uses never see a half-written dataset. ``kwargs`` go to :func:`make_synthetic_dataset`.
    """
    name = f"synthetic-{SYNTHETIC_VERSION}-seed{seed}"
    if kwargs:
        name += "-" + hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
    target = bcls_cache_dir(name)
    if not create or (target / "dataset_synthetic.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("Generating the synthetic dataset in %s", target)
        make_synthetic_dataset(tmp, seed=seed, **kwargs)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "dataset_synthetic.json").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
