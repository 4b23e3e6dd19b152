#!/usr/bin/env python
"""Mine hard negatives for BCLS training with a first-pass model (relevance-aware: likely false negatives left out).

    python examples/mine_hard_negatives.py --model outputs/first_pass --data path/to/flickr8k \\
        --relevance sentence --relevance_model sentence-transformers/all-MiniLM-L6-v2 \\
        --num_negatives 5 --range_max 50 --relevance_threshold 0.5 --output outputs/mined
    python examples/train.py --data outputs/mined --hard_negatives_per_row 1 ...     # then train on it

For each training image: the `--range_max` captions of other images that the model scores highest, without those
whose relevance to the image is `--relevance_threshold` or more (likely false negatives) and, with
`--relative_margin m`, those scored above (1 − m) × the image's mean positive score; the first `--num_negatives` are
kept (`trainer_bcls.training.hard_negative_mining`). `--output` is a `save_to_disk` DatasetDict: the training split's
pair view with the columns `hard_negative_caption_ids`, `hard_negative_image_ids`, `hard_negatives`, and the
`--eval_split` pair view as it was, so `train.py --data OUTPUT` trains and evaluates on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import DatasetDict  # noqa: E402

from modeling_bcls import BCLSModel, BCLSProcessor  # noqa: E402
from trainer_bcls import build_relevance_labels, default_synthetic_dir, load_pairs  # noqa: E402
from trainer_bcls.data.loaders import with_image_paths  # noqa: E402
from trainer_bcls.retrieval.inference_device import prepare_for_inference  # noqa: E402
from trainer_bcls.training.hard_negative_mining import mine_hard_negatives  # noqa: E402

logger = logging.getLogger("bcls.mine_hard_negatives")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The first-pass BCLS model (a saved folder or Hub id).")
    parser.add_argument("--data", default=None, help="Data as for train.py; default: the embedded synthetic data.")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="val", help="Copied unchanged into the output ('none': not copied).")
    parser.add_argument("--output", required=True, help="Folder of the mined DatasetDict (save_to_disk).")
    parser.add_argument("--relevance", default="tfidf", help="sentence | tfidf | precomputed (as train.py)")
    parser.add_argument("--relevance_model", default=None)
    parser.add_argument("--relevance_embeddings", default=None)
    parser.add_argument("--num_negatives", type=int, default=5)
    parser.add_argument("--range_max", type=int, default=50)
    parser.add_argument("--relevance_threshold", type=float, default=0.5,
                        help="Candidates whose relevance to the image is at least this are left out.")
    parser.add_argument("--relative_margin", type=float, default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--feature_cache_dir", default=None,
                        help="train.py's --feature_cache_dir of a run with locked towers: pooled tower outputs are read "
                             "from it (computed and added for what is missing) instead of running the towers.")
    parser.add_argument("--device", default=None, help="cuda, mps, cpu, ... (default: cuda, else mps, else cpu).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.relevance in ("none", ""):
        raise ValueError("--relevance none: mining needs relevance labels to leave likely false negatives out")
    if args.num_negatives < 1 or args.range_max < args.num_negatives:
        raise ValueError(f"need 1 <= --num_negatives <= --range_max, got {args.num_negatives} and {args.range_max}")
    if args.relative_margin is not None and not 0 <= args.relative_margin < 1:
        raise ValueError(f"--relative_margin must be in [0, 1), got {args.relative_margin}")
    if not math.isfinite(args.relevance_threshold):
        raise ValueError(f"--relevance_threshold must be a finite number, got {args.relevance_threshold}")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty")
    data = args.data or str(default_synthetic_dir())
    pairs = load_pairs(data, args.train_split)
    splits = {}
    if args.eval_split and args.eval_split.lower() != "none":  # loaded first: a wrong split name fails before mining
        splits[args.eval_split] = load_pairs(data, args.eval_split)
    relevance = build_relevance_labels(pairs, kind=args.relevance, model_name_or_path=args.relevance_model,
                                       embeddings_path=args.relevance_embeddings)
    model = prepare_for_inference(BCLSModel.from_pretrained(args.model), args.device)
    processor = BCLSProcessor.from_pretrained(args.model)
    mined, counts = mine_hard_negatives(
        model, pairs, processor, relevance, num_negatives=args.num_negatives, range_max=args.range_max,
        relevance_threshold=args.relevance_threshold, relative_margin=args.relative_margin,
        batch_size=args.batch_size, max_length=args.max_length, feature_cache_dir=args.feature_cache_dir,
    )
    splits = {args.train_split: mined, **splits}
    # images on disk are saved as their paths (not copied): the saved folder stays small and the lock-boundary
    # caches of the original data still match
    DatasetDict({name: with_image_paths(pairs) for name, pairs in splits.items()}).save_to_disk(str(output))
    counts = {**counts, "model": args.model, "relevance_threshold": args.relevance_threshold,
              "range_max": args.range_max, "num_negatives": args.num_negatives, "relative_margin": args.relative_margin}
    (output / "mining.json").write_text(json.dumps(counts, indent=1))
    print(json.dumps(counts, indent=1))
    return counts


if __name__ == "__main__":
    from trainer_bcls.cli import run_cli

    sys.exit(run_cli(main))
