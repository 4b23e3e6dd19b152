#!/usr/bin/env python
"""Training throughput of `BCLSTrainer` against a plain `transformers.Trainer` + `VisionTextDualEncoderModel`.

    python benchmarks/bench_train.py                       # synthetic data, batch 64, 3 rounds x 30 timed steps
    python benchmarks/bench_train.py --data ../shared/data/flickr8k --profile

What it measures: steps/s of a full training step (fetching + collating the batch, forward, loss, backward, gradient
clipping, AdamW) on the *same* towers, data, batch, optimizer and logging, in one process:

- baseline: `transformers.Trainer` on `VisionTextDualEncoderModel` (CLIP loss, `return_loss=True`), with a minimal
  collator that turns pair-view rows into `pixel_values` / `input_ids` / `attention_mask` with the same processor;
- BCLS: `BCLSTrainer` on `BCLSModel` with `BCLSDataCollator`, (a) BCLS loss (Triplet-SN + Kendall SW-HS) with
  TF-IDF relevance labels computed in the collator, (b) Triplet-SN only (no relevance).

Both models are built from the same configs (a small ViT + a small BERT with a word-level vocabulary, pooler outputs
and bias-free projections on both sides), so the only differences are the trainer, the collator and the loss.
Each round runs every method for `--warmup_steps` + `--steps` steps (methods interleaved, rounds rotate the order, so
load from other processes hits all alike); a callback records the time between consecutive `on_step_end`s (the
whole step, data included) and between `on_step_begin` and `on_step_end` (compute only), warmup steps left out, and
the table gives medians. `ratio` is BCLS steps/s ÷ baseline steps/s (the target is ≥ 0.9). By default torch runs
one thread (`--threads 1`): all the work of a step is then on the main thread, and its CPU time (`CPU s/step`,
`time.thread_time`) is a measure that other jobs on a shared machine barely disturb (wall-clock medians are
reported too).
`--profile` adds a cProfile breakdown of the BCLS step (collator / relevance labels / forward / loss / backward /
optimizer), which says where the time goes when the ratio is low.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainingArguments,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    set_seed,
)

from modeling_bcls import BCLSConfig, BCLSModel  # noqa: E402
from trainer_bcls import (  # noqa: E402
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    build_relevance_labels,
    build_tiny_model_and_processor,
    load_pairs,
    make_synthetic_dataset,
)
from trainer_bcls.towers.tiny_towers import tiny_bert_config, tiny_vit_config  # noqa: E402

BASELINE = "Trainer + VisionTextDualEncoder (CLIP loss)"
BCLS_KENDALL = "BCLSTrainer, BCLS loss (Triplet-SN + Kendall, TF-IDF relevance)"
BCLS_TRIPLET = "BCLSTrainer, Triplet-SN only"
METHODS = (BASELINE, BCLS_KENDALL, BCLS_TRIPLET)


def limit_threads(num_threads: int) -> None:
    """torch's intra-op threads *and* the BLAS / OpenMP pools of numpy and scipy (threadpoolctl, a scikit-learn
    dependency). On a busy 2-core machine numpy's OpenBLAS, left at 2 threads, takes ~15 ms for the 64x384 @ 384x64
    product of the collator's relevance labels instead of ~0.05 ms (its threads wait for busy cores)."""
    torch.set_num_threads(num_threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    threadpool_limits(limits=num_threads)


class StepTimer(TrainerCallback):
    """Per step: wall-clock and main-thread CPU time from one `on_step_end` to the next (the whole step, batch fetch
    included), and wall-clock from `on_step_begin` to `on_step_end` (compute only)."""

    def __init__(self) -> None:
        self.wall_ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.compute: list[float] = []
        self._begin = 0.0

    def _mark(self) -> None:
        self.wall_ends.append(time.perf_counter())
        self.cpu_ends.append(time.thread_time())

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark()  # the first interval also holds the dataloader start; it is a warmup step

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.compute.append(time.perf_counter() - self._begin)
        self._mark()

    def intervals(self, skip: int) -> dict[str, list[float]]:
        def diffs(ends):
            return [b - a for a, b in zip(ends, ends[1:])][skip:]

        return {"wall": diffs(self.wall_ends), "cpu": diffs(self.cpu_ends), "compute": self.compute[skip:]}


class PairCollator:
    """Pair-view rows → `VisionTextDualEncoderModel` inputs (same processor and truncation as the BCLS collator)."""

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        images = [row["image"].convert("RGB") for row in rows]
        batch = dict(
            self.processor(
                images=images,
                text=[row["caption"] for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        batch["return_loss"] = True
        return batch


def load_data(args, workdir: Path) -> tuple[Any, str]:
    """Pairs of `--data` (first `--max_pairs`), or a synthetic dataset written under `workdir`."""
    if args.data:
        pairs = load_pairs(args.data, "train", check_images=False)
        return pairs.select(range(min(len(pairs), args.max_pairs))), str(args.data)
    folder = make_synthetic_dataset(
        workdir / "synthetic", num_train_images=args.synthetic_images, num_val_images=1, num_test_images=1
    )
    return load_pairs(folder, "train"), f"synthetic ({args.synthetic_images} images x 5 captions, 64x64)"


def common_args(args, output_dir: str, seed: int) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=0,
        max_steps=args.warmup_steps + args.steps,
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )


def build_trainer(method: str, args, pairs, processor, vision_config, text_config, relevance, timer, output_dir):
    set_seed(0)
    if method == BASELINE:
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision_config, text_config, projection_dim=args.projection_dim
        )
        model = VisionTextDualEncoderModel(config=config)
        return Trainer(
            model=model,
            args=TrainingArguments(**common_args(args, output_dir, 0)),
            train_dataset=pairs,
            data_collator=PairCollator(processor, args.max_length),
            callbacks=[timer],
        )
    objective = "bcls" if method == BCLS_KENDALL else "triplet_sn"
    config = BCLSConfig.from_vision_text_configs(
        vision_config, text_config, projection_dim=args.projection_dim, objective=objective
    )
    model = BCLSModel(config)
    collator = BCLSDataCollator(
        processor, relevance=relevance if method == BCLS_KENDALL else None, max_length=args.max_length
    )
    return BCLSTrainer(
        model=model,
        args=BCLSTrainingArguments(**common_args(args, output_dir, 0)),
        train_dataset=pairs,
        data_collator=collator,
        processing_class=processor,
        callbacks=[timer],
    )


def profile_bcls(args, pairs, processor, vision_config, text_config, relevance, output_dir) -> str:
    """cProfile of a BCLS (Kendall) run: seconds per step in each part of the step."""
    timer = StepTimer()
    trainer = build_trainer(
        BCLS_KENDALL, args, pairs, processor, vision_config, text_config, relevance, timer, output_dir
    )
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.train()
    profiler.disable()
    steps = args.warmup_steps + args.steps
    stats = pstats.Stats(profiler)
    parts = [
        ("whole training loop", "trainer.py", "_inner_training_loop"),
        ("collator (all)", "collator.py", "__call__"),
        ("  processor (decode, resize, tokenize)", "processing_utils.py", "__call__"),
        ("  relevance labels (batch_matrix)", "relevance.py", "batch_matrix"),
        ("  relevance sort orders", "collator.py", "relevance_sort_order"),
        ("compute_loss (forward + loss)", "trainer_bcls/training/trainer.py", "compute_loss"),
        ("  loss (bcls_loss)", "loss_bcls.py", "bcls_loss"),
        ("    Kendall SW-HS", "loss_kendall.py", "_kendall_parts"),
        ("backward", "torch/autograd/__init__.py", "backward"),
        ("gradient clipping", "transformers/trainer.py", "_clip_grad_norm"),
        ("optimizer step", "accelerate/optimizer.py", "step"),
        ("logging", "trainer_bcls/training/trainer.py", "log"),
    ]
    lines = ["| part of the BCLS step | s/step | share |", "|---|---|---|"]
    totals = {}
    for name, file_part, func in parts:
        total = max(  # cumulative time; max, not sum, so that nested same-named functions count once
            (
                value[3]
                for (filename, _, funcname), value in stats.stats.items()
                if funcname == func and file_part in filename
            ),
            default=0.0,
        )
        totals[name] = total
    whole = totals["whole training loop"] or 1.0
    for name, _, _ in parts:
        lines.append(f"| {name} | {totals[name] / steps:.4f} | {100 * totals[name] / whole:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", default=None, help="Karpathy data (e.g. ../shared/data/flickr8k); default: synthetic.")
    p.add_argument("--max_pairs", type=int, default=6400, help="Pairs used from --data.")
    p.add_argument("--synthetic_images", type=int, default=600, help="Train images of the synthetic data.")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="Timed steps per method and round.")
    p.add_argument("--warmup_steps", type=int, default=5, help="Untimed steps at the start of each run.")
    p.add_argument("--rounds", type=int, default=3, help="Rounds; methods are interleaved within a round.")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--hidden_size", type=int, default=64, help="Width of both towers.")
    p.add_argument("--layers", type=int, default=2, help="Layers of both towers.")
    p.add_argument("--projection_dim", type=int, default=128)
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (0: torch's default). With 1, the main-thread CPU time is the whole cost of a step, a "
        "measure that other jobs on a shared machine do not disturb.",
    )
    p.add_argument("--profile", action="store_true", help="Also print a cProfile breakdown of the BCLS step.")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1, --warmup_steps >= 0")
    if args.threads > 0:
        limit_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()

    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        return _run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args, workdir: Path) -> list[dict]:
    pairs, description = load_data(args, workdir)
    _, processor = build_tiny_model_and_processor(
        pairs["caption"], image_size=args.image_size, max_length=args.max_length, vision="vit"
    )
    vision_config = tiny_vit_config(image_size=args.image_size, hidden_size=args.hidden_size, layers=args.layers)
    text_config = tiny_bert_config(
        vocab_size=len(processor.tokenizer),
        hidden_size=args.hidden_size,
        layers=args.layers,
        max_length=args.max_length,
    )
    relevance = build_relevance_labels(pairs, kind="tfidf")
    print(
        f"data: {description}, {len(pairs)} pairs; towers: ViT {args.image_size}px + BERT, hidden {args.hidden_size}, "
        f"{args.layers} layers; batch {args.batch_size}; {args.rounds} rounds x ({args.warmup_steps} warmup + "
        f"{args.steps} timed) steps per method; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": [], "compute": []} for m in METHODS}
    output_dir = str(workdir / "trainer_output")
    for round_index in range(args.rounds):
        shift = round_index % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            timer = StepTimer()
            trainer = build_trainer(
                method, args, pairs, processor, vision_config, text_config, relevance, timer, output_dir
            )
            trainer.train()
            intervals = timer.intervals(skip=args.warmup_steps)
            for key, values in intervals.items():
                times[method][key] += values
            median = statistics.median(intervals["wall"])
            print(f"round {round_index}: {method}: median {median:.4f} s/step", flush=True)
            del trainer
    profile = None
    if args.profile:
        profile = profile_bcls(args, pairs, processor, vision_config, text_config, relevance, output_dir)

    medians = {m: {k: statistics.median(v) for k, v in times[m].items()} for m in METHODS}
    base = medians[BASELINE]
    rows = []
    lines = [
        "| method | steps | s/step | steps/s | ratio | CPU s/step | CPU ratio | compute s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        med = medians[method]
        row = {
            "method": method,
            "steps": len(times[method]["wall"]),
            "s_per_step": med["wall"],
            "steps_per_s": 1 / med["wall"],
            "ratio": base["wall"] / med["wall"],
            "cpu_s_per_step": med["cpu"],
            "cpu_ratio": base["cpu"] / med["cpu"] if med["cpu"] > 0 else float("nan"),
            "compute_s_per_step": med["compute"],
        }
        rows.append(row)
        lines.append(
            f"| {method} | {row['steps']} | {row['s_per_step']:.4f} | {row['steps_per_s']:.2f} | {row['ratio']:.2f} | "
            f"{row['cpu_s_per_step']:.4f} | {row['cpu_ratio']:.2f} | {row['compute_s_per_step']:.4f} |"
        )
    print()
    print("\n".join(lines))
    print(
        "\nratio = steps/s ÷ baseline steps/s (medians of the whole step, batch fetch included; target ≥ 0.90). "
        "CPU = main-thread CPU time, immune to other load when --threads 1 (all work is then on the main thread)."
    )
    if profile:
        print("\n" + profile)
    return rows


if __name__ == "__main__":
    main()
