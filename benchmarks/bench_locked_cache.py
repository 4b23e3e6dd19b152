#!/usr/bin/env python
"""Epoch time of training with a locked image tower: with the per-image feature cache vs the same run without it.

    python benchmarks/bench_locked_cache.py                    # ResNet-18 layout at 64 px, synthetic data, 3 epochs
    python benchmarks/bench_locked_cache.py --vision tiny --images 200 --epochs 2

Both runs are the same `BCLSTrainer` run (same seed, data order, towers, batch, optimizer): a from-scratch image tower
locked with `freeze_towers(model, freeze_vision_model=True)` (LiT), a trainable tiny BERT text tower, the BCLS loss
with TF-IDF relevance. The only difference is `cache_locked_image_features`. A callback times every epoch (wall
clock, the whole epoch: batch loading and collation, forward, loss, backward, optimizer) and a forward hook counts
the image tower's calls. After an untimed warm-up run, the runs alternate (uncached, cached, uncached, ...) for
`--repeats` rounds in one process and the table gives the per-epoch medians; `speed-up` is uncached ÷ cached time
of the same epoch. Torch and BLAS run one thread (`--threads`). The final weights of the two runs are compared too
(they must agree to float rounding).

The synthetic dataset has 5 captions per image, so without the cache every image goes through the tower 5 times
per epoch; with it, once in the whole run: the lock-boundary cache (`trainer_bcls.training.feature_cache`) is filled
inside `train()` before the first step, and that time counts in epoch 1. The tower's fused inference copy is off
here (`model.fast_inference = False`), so the table shows the cache alone (`bench_towers.py` measures the fused
tower).
"""

from __future__ import annotations

import argparse
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
from transformers import ResNetConfig, TrainerCallback, ViTImageProcessorPil  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from modeling_bcls import BCLSConfig, BCLSModel, BCLSProcessor  # noqa: E402
from trainer_bcls import (  # noqa: E402
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    RelevanceLabels,
    TfidfRelevance,
    freeze_towers,
    load_pairs,
    make_synthetic_dataset,
)
from trainer_bcls.towers.tiny_towers import build_word_tokenizer, tiny_bert_config, tiny_resnet_config  # noqa: E402

VISION_CONFIGS = {
    "resnet18": lambda: ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
        downsample_in_first_stage=False,
    ),
    "tiny": tiny_resnet_config,
}


class EpochTimer(TrainerCallback):
    """Wall-clock time and image-tower calls of every epoch."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.calls, self.times, self.calls_per_epoch = 0, [], []
        tower.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1

    def mark(self) -> None:
        """Start epoch 1's clock now: the lock-boundary cache is filled inside `train()`, before epoch 1 begins."""
        self._start, self._calls, self._marked = time.perf_counter(), self.calls, True

    def on_epoch_begin(self, args, state, control, **kwargs):
        if getattr(self, "_marked", False):
            self._marked = False
            return
        self._start, self._calls = time.perf_counter(), self.calls

    def on_epoch_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        self.calls_per_epoch.append(self.calls - self._calls)


def build(captions, vision: str, image_size: int):
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(captions)
    tokenizer.model_max_length = 32
    config = BCLSConfig.from_vision_text_configs(
        VISION_CONFIGS[vision](), tiny_bert_config(len(tokenizer), max_length=32), projection_dim=128,
        text_pooling="mean",
    )
    model = BCLSModel(config)
    freeze_towers(model, freeze_vision_model=True)
    image_processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return model, BCLSProcessor(image_processor=image_processor, tokenizer=tokenizer)


def run(pairs, relevance, args, cached: bool, output_dir: str, epochs: int | None = None) -> dict:
    model, processor = build(pairs["caption"], args.vision, args.image_size)
    model.fast_inference = False  # this benchmark measures the cache alone (bench_towers.py: the fused tower)
    timer = EpochTimer(model.vision_model)
    training_args = BCLSTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, learning_rate=1e-3,
        num_train_epochs=epochs or args.epochs, cache_locked_image_features=cached, logging_steps=10**6,
        eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    trainer = BCLSTrainer(
        model=model, args=training_args, train_dataset=pairs, processing_class=processor,
        data_collator=BCLSDataCollator(processor, relevance=relevance, max_length=32),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(timer)
    timer.mark()
    trainer.train()
    vision_cache = trainer.feature_caches.vision
    return {
        "times": timer.times,
        "calls": timer.calls_per_epoch,
        "entries": len(vision_cache.rows) if vision_cache is not None else len(trainer.locked_image_cache),
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--vision", choices=sorted(VISION_CONFIGS), default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--images", type=int, default=100, help="training images (5 captions each)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (0: leave as they are)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=args.threads)
        except ImportError:  # pragma: no cover
            pass
    transformers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(
            Path(tmp) / "data", num_train_images=args.images, num_val_images=1, num_test_images=1,
            image_size=args.image_size,
        )
        pairs = load_pairs(str(data), "train")
        relevance = RelevanceLabels.build(pairs, TfidfRelevance())
        warmup = pairs.select(range(2 * args.batch_size))  # lazy initialisations, outside the timed runs
        run(warmup, relevance, args, False, str(Path(tmp) / "warmup"), epochs=1)
        results: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for cached in (False, True):
                results[cached].append(run(pairs, relevance, args, cached, str(Path(tmp) / f"run-{cached}")))

    def median_epoch(cached: bool, epoch: int, key: str = "times") -> float:
        return statistics.median(r[key][epoch] for r in results[cached])

    weight_diff = max(
        (results[True][0]["weights"][n] - w).abs().max().item() for n, w in results[False][0]["weights"].items()
    )
    print(
        f"\nLocked {args.vision} image tower ({args.image_size} px) + trainable tiny BERT, {args.images} images x 5 "
        f"captions, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats} run(s); "
        f"max |weight difference| cached vs uncached after training: {weight_diff:.1e}\n"
    )
    print("| epoch | no cache: s | tower calls | cached: s | tower calls | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for epoch in range(args.epochs):
        plain, cached = median_epoch(False, epoch), median_epoch(True, epoch)
        plain_calls, cached_calls = results[False][0]["calls"][epoch], results[True][0]["calls"][epoch]
        rows.append((epoch + 1, plain, cached))
        print(f"| {epoch + 1} | {plain:.2f} | {plain_calls} | {cached:.2f} | {cached_calls} | {plain / cached:.2f}x |")
    total_plain = sum(r[1] for r in rows)
    total_cached = sum(r[2] for r in rows)
    print(f"| all | {total_plain:.2f} | | {total_cached:.2f} | | {total_plain / total_cached:.2f}x |")
    print(f"\ncache entries after the run: {results[True][0]['entries']} (distinct training images: {args.images})")
    return {"rows": rows, "weight_diff": weight_diff, "entries": results[True][0]["entries"]}


if __name__ == "__main__":
    main()
