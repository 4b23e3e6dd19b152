#!/usr/bin/env python
"""Evaluate a BCLS retriever: full-gallery retrieval metrics (JSON) and a PNG report.

    python examples/evaluate.py --model outputs/demo --split test --output_dir outputs/demo/eval
    python examples/evaluate.py --model DIR --dataset path/to/flickr8k --split val \\
        --relevance sentence --relevance_model sentence-transformers/all-MiniLM-L6-v2 \\
        --judgments ExpertAnnotations.txt
    python examples/evaluate.py --model DIR --dataset dataset_coco.json --split test --eccv_caption
    python examples/evaluate.py --model DIR --split test --extra_positives verified.json

Writes `metrics.json` and `report.png` (top-5 images for a few caption queries, top captions for a few images,
model similarity against continuous relevance with Kendall τ-b) to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

# `examples/evaluate.py` must not shadow the `evaluate` package: drop this folder from the import path, and add
# the repository root so that the scripts also run from a source checkout.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_bcls import BCLSModel, BCLSProcessor  # noqa: E402
from trainer_bcls import build_relevance_labels, default_synthetic_dir, encode_split, load_pairs  # noqa: E402
from trainer_bcls.evaluation.split_evaluation import split_metrics  # noqa: E402
from trainer_bcls.data.image_loading import to_rgb  # noqa: E402
from trainer_bcls.retrieval.inference_device import prepare_for_inference  # noqa: E402
from trainer_bcls.evaluation.metrics import judgment_correlation, load_judgments  # noqa: E402
from trainer_bcls.evaluation.extended_positives import eccv_caption_positives, load_extra_positives  # noqa: E402
from trainer_bcls.data.caption_index import ImageCaptionIndex, pair_keys  # noqa: E402

logger = logging.getLogger("bcls.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A saved BCLS model folder (or Hub id).")
    parser.add_argument("--dataset", default=None, help="Data as for train.py; default: embedded synthetic data.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--caption_column", default=None)
    parser.add_argument("--allow_outside_paths", action="store_true",
                        help="Accept image paths outside the dataset folder ('..', absolute paths).")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="Skip (count, log) bad rows (missing/corrupt image, empty caption) instead of failing.")
    parser.add_argument("--relevance", default="tfidf", help="sentence | tfidf | precomputed | none")
    parser.add_argument("--relevance_model", default=None)
    parser.add_argument("--relevance_embeddings", default=None)
    parser.add_argument("--judgments", default=None, help="Flickr8k-Expert / CrowdFlower judgments file.")
    parser.add_argument("--judgments_score_columns", type=int, nargs="+", default=None,
                        help="0-based score fields of --judgments to use (default: all; 0 for CrowdFlowerAnnotations.txt).")
    parser.add_argument("--extra_positives", default=None,
                        help='JSON {"i2t": {image_key: [caption keys]}, "t2i": {caption_key: [image keys]}}: '
                             "positives added to the binary ones; ext_ mAP@R / R-Precision / R@K of the listed queries.")
    parser.add_argument("--eccv_caption", action="store_true",
                        help="eccv_ mAP@R / R-Precision / R@K with ECCV Caption's positives (COCO Karpathy test split; "
                             "needs the eccv-caption package).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--output_dir", default=None, help="Default: <model>/eval-<split>.")
    parser.add_argument("--num_examples", type=int, default=3, help="Queries shown in the report.")
    parser.add_argument("--no_report", action="store_true", help="Skip the PNG report.")
    parser.add_argument("--device", default=None, help="cuda, mps, cpu, ... (default: cuda, else mps, else cpu).")
    parser.add_argument("--bf16", action="store_true", help="Run the model in bfloat16 (embeddings stay float32).")
    return parser.parse_args(argv)


def judgment_metrics(path: str, encoded, pairs, score_columns=None) -> dict[str, float]:
    """Kendall τ-c between model similarities and human scores (image file names must match the split's)."""
    filenames = pairs["filename"]
    image_of_file = {Path(f).name: int(i) for f, i in zip(filenames, pairs["image_id"])}
    captions_of_image = encoded.index.image_caption_ids
    image_embeds, text_embeds = encoded.image_embeds, encoded.text_embeds

    def similarity(query_image: str, caption_image: str, caption_index: int) -> float | None:
        query, owner = image_of_file.get(Path(query_image).name), image_of_file.get(Path(caption_image).name)
        if query is None or owner is None or caption_index >= len(captions_of_image[owner]):
            return None
        caption_id = int(captions_of_image[owner][caption_index])
        return float(image_embeds[query] @ text_embeds[caption_id])

    result = judgment_correlation(load_judgments(path, score_columns), similarity)
    return {f"judgments_{key}": value for key, value in result.items()}


def save_report(path: Path, encoded, pairs, relevance, num_examples: int) -> None:
    """Top-5 images per caption query, top captions per image query, similarity vs relevance scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import kendalltau

    index = encoded.index
    captions = {int(c): t for c, t in zip(pairs["caption_id"], pairs["caption"])}
    sim = encoded.image_embeds @ encoded.text_embeds.T  # [N_images, N_captions]
    rng = np.random.default_rng(0)
    caption_queries = rng.choice(sim.shape[1], size=min(num_examples, sim.shape[1]), replace=False)
    image_queries = rng.choice(sim.shape[0], size=min(num_examples, sim.shape[0]), replace=False)

    rows = len(caption_queries) + 1
    fig = plt.figure(figsize=(16, 3.2 * rows))
    grid = fig.add_gridspec(rows, 6)
    for r, caption_id in enumerate(caption_queries):
        top = torch.topk(sim[:, caption_id], k=min(5, sim.shape[0])).indices.tolist()
        ax = fig.add_subplot(grid[r, 0])
        ax.axis("off")
        ax.text(0, 0.5, "\n".join(_wrap(captions[int(caption_id)], 30)), fontsize=9, va="center")
        for k, image_id in enumerate(top):
            ax = fig.add_subplot(grid[r, k + 1])
            ax.imshow(to_rgb(pairs[int(index.image_row[image_id])]["image"]))
            hit = int(index.caption_image_ids[caption_id]) == image_id
            ax.set_title(f"{'✓ ' if hit else ''}{sim[image_id, caption_id]:.3f}", fontsize=9,
                         color="green" if hit else "black")
            ax.axis("off")
    ax = fig.add_subplot(grid[rows - 1, 0:3])
    ax.axis("off")
    lines = []
    for image_id in image_queries:
        top = torch.topk(sim[image_id], k=min(3, sim.shape[1])).indices.tolist()
        lines.append(f"image {Path(pairs[int(index.image_row[image_id])]['filename']).name}:")
        for caption_id in top:
            mark = "✓" if int(index.caption_image_ids[caption_id]) == int(image_id) else " "
            lines.append(f"  {mark} {sim[image_id, caption_id]:.3f}  {captions[caption_id][:70]}")
    ax.text(0, 1, "\n".join(lines), fontsize=8, va="top", family="monospace")
    ax = fig.add_subplot(grid[rows - 1, 3:6])
    if relevance is not None:
        image_ids = image_queries
        rel = np.asarray(relevance.matrix(np.asarray(image_ids), np.arange(sim.shape[1])))
        s = sim[torch.as_tensor(image_ids)].numpy()
        tau = np.mean([kendalltau(s[i], rel[i]).statistic for i in range(len(image_ids))])
        ax.scatter(rel.ravel(), s.ravel(), s=3, alpha=0.4)
        ax.set_xlabel("continuous relevance")
        ax.set_ylabel("model cosine similarity")
        ax.set_title(f"similarity vs relevance ({len(image_ids)} image queries), mean Kendall τ-b = {tau:.3f}")
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model = prepare_for_inference(BCLSModel.from_pretrained(args.model), args.device, args.bf16)
    processor = BCLSProcessor.from_pretrained(args.model)
    data = args.dataset or str(default_synthetic_dir())
    pairs = load_pairs(data, args.split, args.image_column, args.caption_column, skip_invalid=args.skip_invalid,
                       allow_outside_paths=args.allow_outside_paths)
    relevance = build_relevance_labels(
        pairs, kind=args.relevance, model_name_or_path=args.relevance_model,
        embeddings_path=args.relevance_embeddings,
    )
    extended = []
    if args.extra_positives or args.eccv_caption:
        try:  # checked before embedding anything
            index = ImageCaptionIndex.from_pairs(pairs)
            image_keys, caption_keys = pair_keys(pairs, index)
            if args.extra_positives:
                extended.append(load_extra_positives(
                    args.extra_positives, image_keys, caption_keys, index.caption_image_ids))
            if args.eccv_caption:
                extended.append(eccv_caption_positives(image_keys, caption_keys))
        except (ValueError, ImportError) as err:
            sys.exit(f"error: {err}")
    encoded = encode_split(model, pairs, processor, batch_size=args.batch_size, max_length=args.max_length)
    metrics = split_metrics(encoded, relevance, extended_positives=extended or None)
    if args.judgments:
        metrics.update(judgment_metrics(args.judgments, encoded, pairs, args.judgments_score_columns))

    output_dir = Path(args.output_dir or Path(args.model) / f"eval-{args.split}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if not args.no_report:
        save_report(output_dir / "report.png", encoded, pairs, relevance, args.num_examples)
    print_table(metrics, f"{data} [{args.split}]: {len(encoded.image_embeds)} images, "
                f"{len(encoded.text_embeds)} captions")
    print(f"wrote {output_dir / 'metrics.json'}" + ("" if args.no_report else f" and {output_dir / 'report.png'}"))
    return metrics


def print_table(metrics: dict[str, float], title: str) -> None:
    print(f"\n{title}")
    print("| metric | value |\n| --- | --- |")
    for key, value in metrics.items():
        print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    import sys

    from trainer_bcls.cli import run_cli

    sys.exit(run_cli(main))
