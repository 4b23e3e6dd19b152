#!/usr/bin/env python
"""Retrieve with a BCLS model: text→image over a folder of images, and image→text over a list of captions.

    python examples/retrieve.py --model outputs/demo --images path/to/images --query "a red circle" --top_k 5
    python examples/retrieve.py --model outputs/demo --image photo.jpg --captions "a dog" "a cat" "a red circle"
    python examples/retrieve.py --model outputs/demo --image photo.jpg --captions_file captions.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

# `examples/evaluate.py` must not shadow the `evaluate` package: drop this folder from the import path, and add
# the repository root so that the scripts also run from a source checkout.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_bcls import BCLSModel, BCLSProcessor  # noqa: E402
from trainer_bcls.evaluation import encode_images, encode_texts  # noqa: E402
from trainer_bcls.image_loading import to_rgb  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_images(folder: Path) -> tuple[list[Path], list[Image.Image]]:
    """Every readable image in `folder` (sorted); unreadable files are reported and skipped."""
    paths, images, skipped = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                images.append(to_rgb(image))
            paths.append(path)
        except (UnidentifiedImageError, OSError) as error:
            skipped.append(f"{path.name} ({error.__class__.__name__})")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}", file=sys.stderr)
    if not images:
        raise SystemExit(f"no readable images in {folder}")
    return paths, images


def text_to_image(model, processor, images_dir: str, queries: list[str], top_k: int) -> list[list[tuple[str, float]]]:
    paths, images = load_images(Path(images_dir))
    image_embeds = encode_images(model, processor, images, show_progress=False)
    text_embeds = encode_texts(model, processor, queries, show_progress=False)
    scores = text_embeds @ image_embeds.T
    results = []
    for row in scores:
        top = torch.topk(row, k=min(top_k, len(paths)))
        results.append([(str(paths[i]), float(s)) for s, i in zip(top.values, top.indices)])
    return results


def image_to_text(model, processor, image_path: str, captions: list[str], top_k: int) -> list[tuple[str, float]]:
    with Image.open(image_path) as image:
        image_embeds = encode_images(model, processor, [to_rgb(image)], show_progress=False)
    text_embeds = encode_texts(model, processor, captions, show_progress=False)
    scores = (image_embeds @ text_embeds.T)[0]
    top = torch.topk(scores, k=min(top_k, len(captions)))
    return [(captions[i], float(s)) for s, i in zip(top.values, top.indices)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", help="Folder of images to search (text→image).")
    parser.add_argument("--query", action="append", default=[], help="Caption query (repeatable).")
    parser.add_argument("--image", help="Image query (image→text).")
    parser.add_argument("--captions", nargs="*", default=[], help="Candidate captions for --image.")
    parser.add_argument("--captions_file", help="File with one candidate caption per line.")
    parser.add_argument("--top_k", type=int, default=5)
    args = parser.parse_args(argv)
    if not ((args.images and args.query) or args.image):
        parser.error("give --images with --query (text→image), or --image with --captions (image→text)")

    model = BCLSModel.from_pretrained(args.model).eval()
    processor = BCLSProcessor.from_pretrained(args.model)
    output: dict = {}
    if args.images and args.query:
        output["text_to_image"] = {}
        for query, hits in zip(args.query, text_to_image(model, processor, args.images, args.query, args.top_k)):
            output["text_to_image"][query] = hits
            print(f"\nquery: {query}")
            for rank, (path, score) in enumerate(hits, 1):
                print(f"  {rank}. {score:.4f}  {path}")
    if args.image:
        captions = list(args.captions)
        if args.captions_file:
            captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()]
        if not captions:
            parser.error("--image needs --captions or --captions_file")
        hits = image_to_text(model, processor, args.image, captions, args.top_k)
        output["image_to_text"] = hits
        print(f"\nimage: {args.image}")
        for rank, (caption, score) in enumerate(hits, 1):
            print(f"  {rank}. {score:.4f}  {caption}")
    return output


if __name__ == "__main__":
    main()
