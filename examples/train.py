#!/usr/bin/env python
"""Fine-tune an image-text retriever with BCLS (Triplet-SN + Kendall SW-HS).

    python examples/train.py --output_dir outputs/demo            # tiny towers on the embedded synthetic data
    accelerate launch examples/train.py \\
        --vision_model google/vit-base-patch16-224-in21k \\
        --text_model sentence-transformers/all-MiniLM-L6-v2 \\
        --data path/to/flickr30k --eval_split val \\
        --relevance sentence --relevance_model sentence-transformers/all-MiniLM-L6-v2 \\
        --per_device_train_batch_size 128 --num_train_epochs 10 --output_dir outputs/flickr30k
    accelerate launch examples/train.py --clip_model openai/clip-vit-base-patch32 --data ... --output_dir ...
    python examples/train.py --data 'shards/shard-{000000..000099}.tar' --max_steps 5000 --eval_data path/to/flickr8k \
        --relevance_model sentence-transformers/all-MiniLM-L6-v2 --output_dir outputs/shards   # webdataset shards
    python examples/train.py --data user/dataset --streaming --max_steps 5000 ...   # an HF streaming dataset

Every `TrainingArguments` flag works (see `--help`), plus the model, data, relevance and loss flags below.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import transformers
from transformers import HfArgumentParser, IntervalStrategy, set_seed

# `examples/evaluate.py` must not shadow the `evaluate` package: drop this folder from the import path, and add
# the repository root so that the scripts also run from a source checkout.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_bcls import BCLSModel, BCLSProcessor  # noqa: E402
from modeling_bcls.configuration_bcls import FLOAT_KNOB_RANGES, float_knob_problem  # noqa: E402
from modeling_bcls.losses import resolve_objective  # noqa: E402
from trainer_bcls import (  # noqa: E402
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    SentenceEmbeddingRelevance,
    StreamedRelevanceLabels,
    build_relevance_labels,
    StreamingPairs,
    build_tiny_model_and_processor,
    default_synthetic_dir,
    freeze_towers,
    load_pairs,
)
from trainer_bcls.data.streaming import hf_stream_samples, is_shard_pattern, shard_samples  # noqa: E402
from trainer_bcls.hub.model_card import is_hub_repo_id  # noqa: E402

logger = logging.getLogger("bcls.train")

# Training defaults for the tiny from-scratch towers (no model flag given); any flag given on the command line wins.
TINY_TOWER_DEFAULTS = {
    "learning_rate": 1e-3,
    "num_train_epochs": 12.0,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "logging_steps": 20,
    "eval_strategy": "epoch",
    "save_strategy": "no",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved BCLS model to continue from."})
    vision_model: str | None = field(default=None, metadata={"help": "Vision tower: path or Hub id."})
    text_model: str | None = field(default=None, metadata={"help": "Text tower: path or Hub id."})
    clip_model: str | None = field(default=None, metadata={"help": "A CLIP checkpoint to convert (both towers)."})
    projection_dim: int = field(default=256, metadata={"help": "Joint embedding size (new projections only)."})
    projection_hidden_dim: int | None = field(
        default=None, metadata={"help": "New projections as MLPs with this hidden width (default: linear, as CLIP)."}
    )
    text_pooling: str = field(default="auto", metadata={"help": "auto | pooler | mean | cls"})
    vision_pooling: str = field(default="auto", metadata={"help": "auto | pooler | mean | cls"})
    tiny_image_size: int = field(default=64, metadata={"help": "Image size of the tiny from-scratch towers."})
    max_length: int = field(default=64, metadata={"help": "Maximum caption length in tokens."})
    freeze_vision_model: bool = field(
        default=False, metadata={"help": "Lock the vision tower (LiT); its features are cached per image."}
    )
    freeze_text_model: bool = field(default=False, metadata={"help": "Lock the text tower."})
    vision_unlocked_layers: int = field(
        default=0, metadata={"help": "With --freeze_vision_model: the last N layer groups of the tower still train."}
    )
    text_unlocked_layers: int = field(
        default=0, metadata={"help": "With --freeze_text_model: the last N layer groups of the tower still train."}
    )


@dataclass
class DataArguments:
    data: str | None = field(
        default=None,
        metadata={"help": "Karpathy json/folder, imagefolder with metadata, saved dataset or Hub id; "
                  "default: the embedded synthetic dataset."},
    )
    train_split: str = field(default="train")
    eval_split: str | None = field(
        default="val", metadata={"help": "Split for evaluation; 'none' (or '') trains without evaluation."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream --data (a Hub id or local parquet files) with load_dataset(streaming=True); "
                  "webdataset shard patterns (path/shard-{000000..000099}.tar, fsspec URLs) always stream. "
                  "Needs --max_steps."},
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "Streams: samples in the shuffle buffer."})
    stream_captions: str = field(
        default="one", metadata={"help": "Streams: one (a caption drawn per sample per epoch) | all (a pair each)."}
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Map-style data of the eval split (default --data; shards: no evaluation)."}
    )
    image_column: str | None = field(default=None)
    caption_column: str | None = field(default=None)
    skip_invalid: bool = field(default=False, metadata={"help": "Skip (count, log) bad rows instead of failing."})
    allow_outside_paths: bool = field(
        default=False, metadata={"help": "Accept image paths outside the dataset folder ('..', absolute paths)."}
    )
    merge_duplicate_images: bool = field(
        default=False, metadata={"help": "Make byte-identical images one image with all their captions."}
    )
    max_train_pairs: int | None = field(default=None, metadata={"help": "Truncate the training pairs."})
    relevance: str | None = field(
        default=None,
        metadata={"help": "Continuous labels: sentence | tfidf | precomputed | none (default: tfidf; sentence for streams)"},
    )
    relevance_model: str | None = field(
        default=None, metadata={"help": "Text encoder for --relevance sentence (e.g. all-MiniLM-L6-v2)."}
    )
    relevance_embeddings: str | None = field(default=None, metadata={"help": "File for --relevance precomputed."})
    relevance_references: str = field(
        default="all",
        metadata={"help": "all | paired | sample. sample: the streamed labels (captions embedded as they arrive, "
                  "references = the captions the sample carries; a map-style row carries its own caption only); "
                  "--relevance sentence only. Streams (--streaming, shard patterns) always use sample."},
    )
    relevance_cache_max_gb: float = field(
        default=2.0, metadata={"help": "On-disk bound of the streamed labels' caption-embedding cache."}
    )
    relevance_cache_dir: str | None = field(default=None, metadata={"help": "Cache of caption embeddings."})
    hard_negatives_per_row: int = field(
        default=0,
        metadata={"help": "Mined hard negatives (examples/mine_hard_negatives.py) added per row as extra text "
                  "candidates; 0: none."},
    )


@dataclass
class LossArguments:
    """Loss hyperparameters; unset ones keep the `BCLSConfig` defaults (or the loaded model's)."""

    binary_loss: str | None = field(default=None, metadata={"help": "Binary term: triplet_sn | vse | infonce"})
    objective: str | None = field(
        default=None, metadata={"help": "Legacy: bcls | triplet_sn | vse | infonce (sets binary_loss and kendall_weight)"}
    )
    margin: float | None = None
    soft_negative_temperature: float | None = None
    kendall_weight: float | None = None
    kendall_window_size: int | None = None
    kendall_label_gap: float | None = None
    kendall_surrogate: str | None = None
    kendall_temperature: float | None = None
    kendall_hard_mining: bool | None = None
    infonce_temperature: float | None = None
    false_negative_threshold: float | None = field(
        default=None,
        metadata={"help": "Relevance-aware negatives: leave negatives with relevance above this out of the binary term."},
    )
    false_negative_ramp: float | None = field(
        default=None, metadata={"help": "Soft exclusion width: weight 1 - clamp((R - threshold) / ramp, 0, 1); 0 = hard."}
    )

    def overrides(self) -> dict:
        """The flags that were set, with a legacy `--objective` translated into `binary_loss` / `kendall_weight`."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        objective = values.pop("objective", None)
        if objective is not None:
            binary_loss, kendall_weight = resolve_objective(objective, "triplet_sn", values.get("kendall_weight", 1.0))
            if values.setdefault("binary_loss", binary_loss) != binary_loss:
                raise ValueError(f"--objective {objective} contradicts --binary_loss {values['binary_loss']}")
            if kendall_weight == 0:
                values["kendall_weight"] = 0.0
        check_loss_overrides(values)
        return values


def check_loss_overrides(values: dict) -> None:
    """Range checks of the loss flags that were given (finite, in range), naming the flag; run at start, and
    needed because overrides set on a loaded model's config bypass its own checks."""
    for name, value in values.items():
        problem = float_knob_problem(name, value) if name in FLOAT_KNOB_RANGES else None
        if name == "kendall_window_size" and value < 1:
            problem = f"kendall_window_size must be >= 1, got {value}"
        if name == "false_negative_threshold" and not math.isfinite(value):
            problem = f"false_negative_threshold must be a finite number, got {value}"
        if problem is not None:
            raise ValueError(f"--{problem}")


def build_model_and_processor(model_args: ModelArguments, loss_overrides: dict, train_pairs):
    """The model and processor named by the flags (tiny from-scratch towers when none is named)."""
    if model_args.model_name_or_path:
        model = BCLSModel.from_pretrained(model_args.model_name_or_path)
        processor = BCLSProcessor.from_pretrained(model_args.model_name_or_path)
        for key, value in loss_overrides.items():
            setattr(model.config, key, value)
        model.config.check_hyperparameters()  # setattr skips the config's range checks
    elif model_args.clip_model:
        model = BCLSModel.from_clip_pretrained(model_args.clip_model, **loss_overrides)
        processor = BCLSProcessor.from_pretrained(model_args.clip_model)
    elif model_args.vision_model or model_args.text_model:
        if not (model_args.vision_model and model_args.text_model):
            raise ValueError("--vision_model and --text_model go together (or use --clip_model).")
        model = BCLSModel.from_vision_text_pretrained(
            model_args.vision_model,
            model_args.text_model,
            projection_dim=model_args.projection_dim,
            projection_hidden_dim=model_args.projection_hidden_dim,
            text_pooling=model_args.text_pooling,
            vision_pooling=model_args.vision_pooling,
            **loss_overrides,
        )
        processor = BCLSProcessor.from_vision_text_pretrained(model_args.vision_model, model_args.text_model)
    else:
        model, processor = build_tiny_model_and_processor(
            train_pairs["caption"],
            image_size=model_args.tiny_image_size,
            projection_dim=min(model_args.projection_dim, 128),
            projection_hidden_dim=model_args.projection_hidden_dim,
            max_length=model_args.max_length,
            **loss_overrides,
        )
    return model, processor


def load_stream(data: str, data_args: DataArguments, seed: int) -> StreamingPairs:
    """Training pairs streamed from webdataset shards or `load_dataset(..., streaming=True)`."""
    if data_args.max_train_pairs is not None:
        raise ValueError("--max_train_pairs applies to map-style data; a stream trains for --max_steps")
    if is_shard_pattern(data):
        samples = shard_samples(data, skip_invalid=data_args.skip_invalid)
    else:
        samples = hf_stream_samples(data, data_args.train_split, data_args.image_column, data_args.caption_column,
                                    skip_invalid=data_args.skip_invalid)
    return StreamingPairs(samples, captions=data_args.stream_captions, seed=seed,
                          shuffle_buffer=data_args.shuffle_buffer)


def first_captions(pairs: StreamingPairs, count: int = 5000) -> list[str]:
    """Captions of the first samples of the stream (the vocabulary of the tiny from-scratch text tower)."""
    captions: list[str] = []
    for sample in pairs.samples.take(count):
        captions.extend(sample["captions"])
    return captions


def build_streamed_relevance(data_args: DataArguments) -> StreamedRelevanceLabels | None:
    """The streamed labels (`--relevance_references sample`, and every stream); `None` for `--relevance none`."""
    if data_args.relevance in ("none", ""):
        return None
    if data_args.relevance != "sentence":
        raise ValueError(
            f"--relevance {data_args.relevance} cannot label a stream or --relevance_references sample: TF-IDF is "
            "fitted on every caption of the split and a precomputed file is indexed by split caption ids. Use "
            "--relevance sentence (captions embedded as they arrive) or --relevance none."
        )
    embedder = SentenceEmbeddingRelevance(data_args.relevance_model or "sentence-transformers/all-MiniLM-L6-v2")
    return StreamedRelevanceLabels(embedder, cache_dir=data_args.relevance_cache_dir,
                                   max_cache_gb=data_args.relevance_cache_max_gb)


def same_rows(a, b) -> bool:
    """Whether two pair views hold the same (file, caption) rows, in the same order."""
    return len(a) == len(b) and a["filename"] == b["filename"] and a["caption"] == b["caption"]


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, LossArguments, BCLSTrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, loss_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_flags = ("--model_name_or_path", "--clip_model", "--vision_model", "--text_model")
        if not any(arg.split("=")[0] in model_flags for arg in argv):
            # argparse keeps the last occurrence of a flag, so flags given by the user override these.
            argv = [item for name, value in TINY_TOWER_DEFAULTS.items() for item in (f"--{name}", str(value))] + argv
        model_args, data_args, loss_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    loss_overrides = loss_args.overrides()  # checked before any data is loaded

    data = data_args.data or str(default_synthetic_dir())
    data_file_options = dict(allow_outside_paths=data_args.allow_outside_paths,
                             merge_duplicate_images=data_args.merge_duplicate_images)
    streaming = data_args.streaming or is_shard_pattern(data)
    if data_args.relevance is None and not streaming:
        data_args.relevance = "tfidf"
    eval_data = data_args.eval_data or (None if is_shard_pattern(data) else data)
    if data_args.hard_negatives_per_row < 0:
        raise ValueError(f"--hard_negatives_per_row must be >= 0, got {data_args.hard_negatives_per_row}")
    if data_args.hard_negatives_per_row and (streaming or data_args.max_train_pairs is not None):
        raise ValueError("--hard_negatives_per_row: mined hard negatives are caption ids of a whole map-style split "
                         "(a saved dataset from examples/mine_hard_negatives.py); they do not combine with "
                         f"{'a stream' if streaming else '--max_train_pairs'}")
    if streaming:
        train_pairs = load_stream(data, data_args, training_args.seed)
        if data_args.relevance is None:
            data_args.relevance = "sentence"  # the default TF-IDF cannot label a stream
            logger.info("streamed data: relevance labels from the sentence embedder, embedded as captions arrive")
        data_args.relevance_references = "sample"
        tiny_towers = not any((model_args.model_name_or_path, model_args.clip_model, model_args.vision_model,
                               model_args.text_model))
        # the tiny from-scratch text tower's vocabulary: read from the stream only when that tower is built
        vocabulary = {"caption": first_captions(train_pairs)} if tiny_towers else None
    else:
        train_pairs = load_pairs(
            data, data_args.train_split, data_args.image_column, data_args.caption_column, data_args.skip_invalid,
            **data_file_options,
        )
        all_train_pairs = train_pairs
        if data_args.hard_negatives_per_row and "hard_negative_caption_ids" not in train_pairs.column_names:
            raise ValueError(
                f"--hard_negatives_per_row {data_args.hard_negatives_per_row}: the training split of {data} has no "
                "mined hard negatives (column hard_negative_caption_ids); mine them with "
                "examples/mine_hard_negatives.py and pass its --output as --data"
            )
        if data_args.max_train_pairs is not None:
            train_pairs = train_pairs.select(range(min(data_args.max_train_pairs, len(train_pairs))))
        vocabulary = train_pairs
    eval_pairs = None
    if data_args.eval_split and data_args.eval_split.lower() != "none" and eval_data is None:
        logger.info("training from shards without --eval_data: no evaluation")
    elif data_args.eval_split and data_args.eval_split.lower() != "none":
        eval_pairs = load_pairs(
            eval_data, data_args.eval_split, data_args.image_column, data_args.caption_column,
            data_args.skip_invalid, **data_file_options,
        )
        if not streaming and eval_data == data and same_rows(all_train_pairs, eval_pairs):
            raise ValueError(
                f"--train_split {data_args.train_split!r} and --eval_split {data_args.eval_split!r} are the same rows "
                "of the data: evaluation and --load_best_model_at_end would score the training pairs. Name a "
                "held-out split, or pass --eval_split none to train without evaluation."
            )
    if eval_pairs is None and training_args.eval_strategy != IntervalStrategy.NO:
        logger.info("no eval split: evaluation during training is off")
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False
    train_size = repr(train_pairs) if streaming else f"{len(train_pairs)} training pairs"
    logger.info("data %s: %s, %s eval pairs", data, train_size, eval_pairs and len(eval_pairs))

    model, processor = build_model_and_processor(model_args, loss_overrides, vocabulary)
    freeze_towers(
        model,
        freeze_vision_model=model_args.freeze_vision_model,
        vision_unlocked_layers=model_args.vision_unlocked_layers,
        freeze_text_model=model_args.freeze_text_model,
        text_unlocked_layers=model_args.text_unlocked_layers,
    )

    relevance_kwargs = dict(
        kind=data_args.relevance,
        model_name_or_path=data_args.relevance_model,
        embeddings_path=data_args.relevance_embeddings,
        references=data_args.relevance_references,
        cache_dir=data_args.relevance_cache_dir,
    )
    if data_args.relevance_references == "sample":
        relevance_kwargs["references"] = "all"  # the eval split keeps the map-style labels its metrics are read by
        train_relevance = build_streamed_relevance(data_args)
    else:
        train_relevance = build_relevance_labels(train_pairs, **relevance_kwargs)
    eval_relevance = None
    if eval_pairs is not None and data_args.relevance != "precomputed":  # a precomputed file covers one split
        eval_relevance = build_relevance_labels(eval_pairs, **relevance_kwargs)
    if train_relevance is None and model.config.false_negative_threshold is not None:
        raise ValueError(
            "--false_negative_threshold weights negatives by their relevance labels: use --relevance sentence, tfidf "
            "or precomputed (not none)."
        )
    if train_relevance is None and model.config.kendall_weight != 0:
        logger.warning(
            f"--relevance none: the Kendall term is off, BCLS trains with the binary loss "
            f"({model.config.binary_loss}) alone."
        )

    collator = BCLSDataCollator(
        processor, relevance=train_relevance, max_length=model_args.max_length, skip_invalid=data_args.skip_invalid,
        hard_negatives_per_row=data_args.hard_negatives_per_row,
    )
    trainer = BCLSTrainer(
        model=model,
        args=training_args,
        train_dataset=train_pairs,
        eval_dataset=eval_pairs,
        data_collator=collator,
        processing_class=processor,
        eval_relevance=eval_relevance,
        data_description=f"{Path(data).name if Path(data).exists() else data} ({data_args.train_split} split, "
        f"{'streamed' if streaming else f'{len(train_pairs)} pairs'}); relevance labels: {data_args.relevance}",
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    if eval_pairs is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model()
    trainer.save_state()
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.create_model_card(
        eval_split=data_args.eval_split if eval_pairs is not None else None,
        datasets=[data] if is_hub_repo_id(data) else None,  # a Hub dataset id (not a local path)
    )
    if training_args.push_to_hub:
        trainer.push_to_hub()
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in metrics.items() if k.startswith("eval_")}, indent=2))
    return metrics


if __name__ == "__main__":
    import sys

    from trainer_bcls.cli import run_cli

    sys.exit(run_cli(main, strip_debug=False))  # --debug is a TrainingArguments flag: BCLS_DEBUG=1 instead
