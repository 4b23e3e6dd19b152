"""`BCLSTrainer`: the transformers `Trainer` for BCLS retrievers.

What it adds to `Trainer`:

- `compute_loss` takes the BCLS loss from the model (or, with several processes or gradient caching, computes it
  on the global / cached batch) and tracks its parts, logged as `loss_triplet` and `loss_kendall` next to `loss`.
- `evaluate()` runs full-gallery retrieval on the eval split (unique images embedded once, every caption) and
  returns `eval_rsum`, `eval_i2t_r1`, ... (plus relevance-aware metrics when relevance labels are given), so that
  `metric_for_best_model="rsum"`, `load_best_model_at_end` and early stopping work.
- locked and partly unlocked towers (`trainer_bcls.training.tower_freezing.freeze_tower`) run their frozen part once
  per image and caption: `train()` first fills the lock-boundary caches (`trainer_bcls.training.feature_cache`,
  `cache_locked_features=True`, the default; persisted in `feature_cache_dir`), the collator then stops decoding
  and tokenising, and each step feeds the model `vision_pooled_output` / `text_pooled_output` (or runs only the
  trainable tail on cached boundary states). Image caches are bypassed, with a warning, when the collator augments
  images; a dataset without pair-view ids falls back to the per-step locked-image cache
  (`trainer_bcls.training.locked_image_cache`).
- streams (`trainer_bcls.data.streaming.StreamingPairs`: webdataset shards, HF streaming datasets) train with
  `max_steps`; each process and DataLoader worker reads its own shards (the DataLoader is not re-sharded by
  accelerate), the lock-boundary and locked-image caches are off (one log line: the frozen towers run at every
  step), and `resume_from_checkpoint` restores the position in the stream by replaying it: the Trainer skips the
  batches already trained, which the stream reproduces (seeded shuffle, caption choice by seed/epoch/key); those
  batches are read and collated again, so resuming late in a long run costs that reading time
  (`ignore_data_skip=True` restarts the stream at its beginning instead).
- `create_model_card` writes a `huggingface_hub.ModelCard` (base models, datasets, license, `model-index` with the
  eval split) rendered from the project's `model_card.md` Jinja template.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .checkpoints import loss_config_changes, resolve_checkpoint
from .feature_cache import FeatureCaches, build_feature_caches, cached_text_pooled, cached_vision_pooled
from ..data.loaders import without_image_decoding
from ..data.streaming import StreamingPairs
from ..distributed import is_distributed
from ..labels.streamed_relevance import STREAM_LABEL_KEYS
from ..evaluation.split_evaluation import evaluate_retrieval
from .global_loss import global_bcls_loss
from .gradcache import cached_embeddings
from .locked_image_cache import LockedImageFeatureCache
from .tower_freezing import is_tower_locked
from .tower_learning_rate import tower_parameter_groups
from .training_args import BCLSTrainingArguments

logger = logging.getLogger(__name__)

LABEL_KEYS = (
    "image_ids", "caption_ids", "relevance", "relevance_order_i2t", "relevance_order_t2i",
    "hard_negative_caption_ids", "hard_negative_image_ids", *STREAM_LABEL_KEYS,
)
HARD_NEGATIVE_PREFIX = "hard_negative_"  # the collator's extra text candidates: hard_negative_input_ids, ...
MODEL_FEATURE_KEYS = (
    "pixel_values", "input_ids", "attention_mask", "token_type_ids", "position_ids", "vision_pooled_output",
    "text_pooled_output",
)
TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
IN_MEMORY_ROWS = 2_000_000  # cached training reads at most this many pair-view rows (ids, caption) into memory


class _RowList(torch.utils.data.Dataset):
    """Rows held as a list of dicts (the id and caption columns of a cached pair view)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self.rows[i] for i in indices]


def _zero_grads(params: tuple[torch.Tensor, ...], set_to_none: bool = True) -> None:
    """`nn.Module.zero_grad` over `params` only (a frozen tower's parameters never get a gradient; listing them
    walks every module of the tower, which costs a cached step more than its forward)."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            p.grad.detach_().zero_()


class BCLSTrainer(Trainer):
    """Trainer for [`BCLSModel`] on pair-view datasets with [`BCLSDataCollator`].

    Args:
        eval_relevance: relevance labels of the eval split ([`RelevanceLabels`]); when given, evaluation also
            reports Kendall τ-b and nDCG@10 of the model's similarities against them.
        data_description: a short description of the training data for the model card.
        All other arguments are those of `transformers.Trainer`; `processing_class` should be the
        [`BCLSProcessor`] (it is saved next to the model and used to embed the eval split).
    """

    def __init__(self, *args, eval_relevance=None, data_description: str | None = None, **kwargs):
        train_dataset = kwargs.get("train_dataset")
        if isinstance(train_dataset, StreamingPairs):
            args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
            if args_ is not None and args_.max_steps <= 0:
                raise ValueError("training from a stream (shards or --streaming) needs --max_steps: a stream has no "
                                 "length, so epochs cannot be counted")
        if isinstance(train_dataset, Dataset) and "image" in train_dataset.column_names:
            # Decode images in the collator, where a corrupt file is reported with its row (or skipped and
            # counted with `skip_invalid`), instead of inside `Dataset.__getitem__`.
            kwargs["train_dataset"] = without_image_decoding(train_dataset)
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, BCLSTrainingArguments):
            raise TypeError("BCLSTrainer needs BCLSTrainingArguments (it adds embedding_chunk_size and friends).")
        # The BCLS loss is a per-batch mean that ignores `num_items_in_batch`: let the Trainer divide by the
        # gradient accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self.eval_relevance = eval_relevance
        self.data_description = data_description
        self._loss_parts: dict[str, torch.Tensor] = {}
        self._loss_parts_count = 0
        self._batches_without_negatives: torch.Tensor | int = 0  # summed on the device: no sync per step
        self._batches_counted = 0
        self.locked_image_cache = LockedImageFeatureCache()
        self.feature_caches = FeatureCaches()
        self._warned_cache_bypass = False

    # ------------------------------------------------------------------ train
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, refusing a configuration that has no negatives, and warning once at the end with
        the count of batches that had none (every pair of one image: loss 0, nothing trained).

        `resume_from_checkpoint`: `True`, `"true"` or `"last"` resume from the newest complete checkpoint of
        `output_dir`; a half-written checkpoint is reported (see `trainer_bcls.training.checkpoints.resolve_checkpoint`),
        and a checkpoint saved with other loss hyperparameters than the model's is refused, naming them."""
        args = self.args
        global_batch = args.world_size > 1 and args.gather_across_processes
        if args.per_device_train_batch_size == 1 and not global_batch:
            raise ValueError(
                "per_device_train_batch_size=1 without a global batch: every batch is one pair, which has no "
                "negative, so the loss is 0 and nothing trains. Use a batch of several images (or several "
                "processes with gather_across_processes=True)."
            )
        # "True"/"last" (as the command line gives them) → the newest complete checkpoint; half-written ones named
        resume_from_checkpoint = resolve_checkpoint(resume_from_checkpoint, args.output_dir)
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if resume_from_checkpoint is not None and config is not None:
            changes = loss_config_changes(resume_from_checkpoint, config)
            if changes:  # the saved config would describe a run whose first steps did not follow it
                raise ValueError(
                    f"--resume_from_checkpoint {resume_from_checkpoint}: the loss flags differ from the checkpoint's "
                    f"({'; '.join(changes)}). Resume with the checkpoint's loss flags, or start a new run "
                    "(--model_name_or_path on the checkpoint) to train on with other ones."
                )
        self._batches_without_negatives, self._batches_counted = 0, 0
        self._trainable_parameters = None  # which parameters train is fixed for the run (see _clip_grad_norm)
        self._prepare_feature_caches()
        collator = self.data_collator
        model = self.model
        frozen = any(not p.requires_grad for p in model.parameters())
        if frozen:  # the Trainer's model.zero_grad() after every step: only parameters that can have a gradient
            params = tuple(p for p in model.parameters() if p.requires_grad or p.grad is not None)
            model.zero_grad = partial(_zero_grads, params)
        train_dataset = self.train_dataset
        if self.feature_caches.vision is not None and isinstance(train_dataset, Dataset):
            # The collator reads no image: rows are the small id/caption columns, read from Arrow once into memory
            # (a list lookup per row instead of an Arrow gather per step; above IN_MEMORY_ROWS, an Arrow view).
            columns = train_dataset.select_columns([c for c in train_dataset.column_names if c != "image"])
            self.train_dataset = _RowList(columns.to_list()) if len(columns) <= IN_MEMORY_ROWS else columns
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            self.train_dataset = train_dataset
            if hasattr(getattr(collator, "relevance", None), "flush"):  # streamed labels: their new embeddings
                collator.relevance.flush()
            if hasattr(collator, "load_images"):
                collator.load_images, collator.tokenize = True, True
            if frozen:
                del model.zero_grad
        without = int(self._batches_without_negatives)
        if without:
            logger.warning(
                "%d of %d training batches had no negative (every pair of one image): their loss is 0 and they "
                "trained nothing. Use larger batches, or data with fewer captions per image.",
                without,
                self._batches_counted,
            )
        return result

    @property
    def is_streaming(self) -> bool:
        return isinstance(self.train_dataset, StreamingPairs)

    def get_train_dataloader(self):
        """`Trainer.get_train_dataloader`; for a stream, a DataLoader over this process's share of the shards
        (`StreamingPairs` splits by process and worker itself), wrapped by accelerate without re-sharding or
        dispatching (accelerate's default for an `IterableDataset` would read everything in process 0)."""
        if not self.is_streaming:
            return super().get_train_dataloader()
        from accelerate.data_loader import prepare_data_loader

        args = self.args
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
            drop_last=args.dataloader_drop_last,
        )
        return prepare_data_loader(
            loader, device=args.device, num_processes=1, process_index=0, put_on_device=True, dispatch_batches=False,
            non_blocking=args.dataloader_pin_memory,
        )

    def _prepare_feature_caches(self) -> None:
        """Fill the lock-boundary caches of the frozen towers over the training split (`feature_cache`) and tell
        the collator which inputs it no longer needs to build."""
        args, collator = self.args, self.data_collator
        self.feature_caches = FeatureCaches()
        if self.is_streaming and args.cache_locked_features:
            logger.info("training from a stream: the lock-boundary caches need a map-style dataset, the frozen "
                        "towers run at every step")
        if not args.cache_locked_features or not isinstance(self.train_dataset, Dataset):
            return
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "vision_model") or self.processing_class is None:
            return
        cache_images = args.cache_locked_image_features
        if cache_images and getattr(collator, "image_transform", None) is not None:
            cache_images = False
            if not any(p.requires_grad for p in model.vision_model.parameters()):
                logger.warning(
                    "The vision tower is locked but the collator augments images (image_transform): the image cache "
                    "is bypassed and every step runs the tower."
                )
                self._warned_cache_bypass = True
        self.feature_caches = build_feature_caches(
            model,
            self.train_dataset,
            self.processing_class,
            max_length=getattr(collator, "max_length", None),
            cache_images=cache_images,
            cache_text=True,
            gradcache=args.embedding_chunk_size is not None,
            autocast=self.accelerator.autocast,
            precision=str(self.accelerator.mixed_precision),
            cache_dir=args.feature_cache_dir,
            max_gb=args.feature_cache_max_gb,
            skip_invalid=getattr(collator, "skip_invalid", False),
            batch_size=min(max(args.per_device_train_batch_size, 16), 128),
            is_main_process=self.is_world_process_zero(),
            fallback_dir=args.output_dir,
            show_progress=self.is_world_process_zero() and not args.disable_tqdm,
        )
        if hasattr(collator, "load_images"):
            collator.load_images = self.feature_caches.vision is None
            collator.tokenize = self.feature_caches.text is None
            collator.invalid_image_ids = frozenset(self.feature_caches.invalid_image_ids)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`, with `args.tower_learning_rate` (when set) for the towers' trainable
        parameters and `args.learning_rate` for the rest (`trainer_bcls.training.tower_learning_rate`)."""
        if self.optimizer is not None or self.args.tower_learning_rate is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if special or not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, torch.optim.Optimizer):
            raise ValueError(
                f"tower_learning_rate works with plain torch optimizers; optim={self.args.optim!r} builds its own "
                "parameter groups. Leave tower_learning_rate unset with this optimizer."
            )
        groups = tower_parameter_groups(
            opt_model,
            self.get_decay_parameter_names(opt_model),
            weight_decay=self.args.weight_decay,
            learning_rate=self.args.learning_rate,
            tower_learning_rate=self.args.tower_learning_rate,
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _clip_grad_norm(self, model):
        """`Trainer._clip_grad_norm` over the trainable parameters only: a frozen tower's parameters never have a
        gradient, and listing them walks every module of the tower at every step. (FSDP / DeepSpeed: unchanged.)"""
        from accelerate.utils import DistributedType

        plain = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                      DistributedType.MULTI_GPU)
        if not plain or self.args.max_grad_norm is None:
            return super()._clip_grad_norm(model)
        trainable = getattr(self, "_trainable_parameters", None)
        if trainable is None or trainable[0] is not model:
            trainable = (model, [p for p in model.parameters() if p.requires_grad])
            self._trainable_parameters = trainable
        return self.accelerator.clip_grad_norm_(trainable[1], self.args.max_grad_norm)

    # ------------------------------------------------------------------ loss
    @property
    def relevance_labels(self):
        """The training relevance labels (taken from the collator), used to rebuild global relevance."""
        return getattr(self.data_collator, "relevance", None)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        inputs = self._with_cached_features(model, inputs)
        inputs = self._with_locked_image_features(model, inputs)
        distributed = is_distributed() and self.args.gather_across_processes
        image_ids = inputs.get("image_ids")
        extra = inputs.get("hard_negative_caption_ids")
        if model.training and not distributed and isinstance(image_ids, torch.Tensor) and image_ids.numel():
            no_negative = (image_ids == image_ids[0]).all()
            if extra is not None:  # mined candidates of other images are negatives too
                no_negative = no_negative & (inputs["hard_negative_image_ids"] == image_ids[0]).all()
            self._batches_without_negatives = self._batches_without_negatives + no_negative
            self._batches_counted += 1
        if self.args.embedding_chunk_size is None and not distributed and extra is None:
            outputs = model(**{key: value for key, value in inputs.items() if key not in STREAM_LABEL_KEYS})
            if outputs.loss is None:
                raise ValueError("The model returned no loss: the batch needs `return_loss=True`.")
            parts = {"loss_triplet": outputs.loss_triplet, "loss_kendall": outputs.loss_kendall}
            loss = outputs.loss
        else:
            loss, parts, outputs = self._compute_global_loss(model, inputs)
        self._track_loss_parts(parts)
        return (loss, outputs) if return_outputs else loss

    def _unwrap(self, model: nn.Module) -> nn.Module:
        """`accelerator.unwrap_model(model)`, remembered per wrapper: accelerate's walks every module (looking for
        compiled regions) at each call, which costs a cached step more than its forward."""
        cached = getattr(self, "_unwrapped", None)
        if cached is None or cached[0] is not model:
            cached = (model, self.accelerator.unwrap_model(model))
            self._unwrapped = cached
        return cached[1]

    def _with_cached_features(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with the towers' inputs replaced by their pooled outputs from the lock-boundary caches."""
        caches = self.feature_caches
        if not caches or not model.training:
            return inputs
        unwrapped = self._unwrap(model)
        inputs = dict(inputs)
        if caches.vision is not None:
            inputs.pop("pixel_values", None)
            inputs["vision_pooled_output"] = cached_vision_pooled(
                unwrapped, caches.vision, inputs["image_ids"], self.accelerator.autocast
            )
        if caches.text is not None:
            for key in TEXT_INPUT_KEYS:
                inputs.pop(key, None)
                inputs.pop(HARD_NEGATIVE_PREFIX + key, None)
            caption_ids = inputs["caption_ids"]
            if inputs.get("hard_negative_caption_ids") is not None:  # extra candidates after the paired captions
                caption_ids = torch.cat([caption_ids, inputs["hard_negative_caption_ids"]])
            inputs["text_pooled_output"] = cached_text_pooled(
                unwrapped, caches.text, caption_ids, self.accelerator.autocast
            )
        return inputs

    def _with_locked_image_features(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with `pixel_values` replaced by the cached pooled outputs of a locked vision tower."""
        args = self.args
        if not (args.cache_locked_features and args.cache_locked_image_features) or inputs.get("pixel_values") is None:
            return inputs
        if self.is_streaming:  # a stream's distinct images are unbounded: no per-image cache
            return inputs
        unwrapped = self._unwrap(model)
        tower = getattr(unwrapped, "vision_model", None)
        if tower is None or not is_tower_locked(tower):
            return inputs
        if getattr(self.data_collator, "image_transform", None) is not None:
            if not self._warned_cache_bypass:
                logger.warning(
                    "The vision tower is locked but the collator augments images (image_transform): the locked-image "
                    "cache is bypassed and every step runs the tower."
                )
                self._warned_cache_bypass = True
            return inputs
        pooled = self.locked_image_cache.pooled_features(
            unwrapped, inputs["pixel_values"], autocast=self.accelerator.autocast
        )
        inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
        inputs["vision_pooled_output"] = pooled
        return inputs

    def _compute_global_loss(self, model: nn.Module, inputs: dict[str, Any]):
        """BCLS loss of the global (all processes) and/or cached (chunk-embedded) batch."""
        labels = {key: inputs[key] for key in LABEL_KEYS if key in inputs}
        features = {
            key: inputs[key] for key in MODEL_FEATURE_KEYS if inputs.get(key) is not None
        }
        for key in TEXT_INPUT_KEYS:  # the extra (mined) candidates' tokens follow the paired captions'
            if inputs.get(HARD_NEGATIVE_PREFIX + key) is not None and key in features:
                features[key] = torch.cat([features[key], inputs[HARD_NEGATIVE_PREFIX + key]])
        chunk_size = self.args.embedding_chunk_size
        if chunk_size is not None and model.training and torch.is_grad_enabled():
            unwrapped = self._unwrap(model)
            return cached_embeddings(
                unwrapped,
                features,
                chunk_size=chunk_size,
                loss_fn=lambda img, txt: global_bcls_loss(unwrapped.config, img, txt, labels, self.relevance_labels,
                                                      gather=self.args.gather_across_processes),
                sync_gradients=is_distributed(),
            )
        outputs = model(**features, return_loss=False)
        config = self._unwrap(model).config
        loss_dict = global_bcls_loss(config, outputs.image_embeds, outputs.text_embeds, labels, self.relevance_labels,
                                     gather=self.args.gather_across_processes)
        parts = {"loss_triplet": loss_dict["triplet"], "loss_kendall": loss_dict["kendall"]}
        return loss_dict["loss"], parts, outputs

    def _track_loss_parts(self, parts: dict[str, torch.Tensor | None]) -> None:
        for key, value in parts.items():
            if value is None:
                continue
            value = value.detach().float()
            self._loss_parts[key] = self._loss_parts.get(key, torch.zeros_like(value)) + value
        self._loss_parts_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the running means of the loss parts (averaged over processes) to the training logs, and with
        `tower_learning_rate` the towers' current rate as `tower_learning_rate` (`learning_rate` is the heads')."""
        if "learning_rate" in logs and self.optimizer is not None:
            tower_groups = [g for g in self.optimizer.param_groups if g.get("tower")]
            if tower_groups:
                logs["tower_learning_rate"] = tower_groups[0]["lr"]
        if "loss" in logs and self._loss_parts_count > 0:
            for key, total in self._loss_parts.items():
                mean = total / self._loss_parts_count
                logs[key] = round(self.accelerator.gather(mean.reshape(1)).mean().item(), 6)
            self._loss_parts = {}
            self._loss_parts_count = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------ evaluation
    def evaluate(
        self,
        eval_dataset=None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Full-gallery image↔text retrieval on the eval split, instead of an eval loss."""
        override = eval_dataset is not None
        eval_dataset = eval_dataset if override else self.eval_dataset
        if eval_dataset is None:
            raise ValueError("BCLSTrainer.evaluate needs an eval_dataset (a pair-view dataset).")
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics

        start = time.time()
        model = self.accelerator.unwrap_model(self.model)
        metrics = evaluate_retrieval(
            model,
            eval_dataset,
            self.processing_class,
            relevance=self.eval_relevance,
            batch_size=self.args.per_device_eval_batch_size,
            chunk_size=self.args.eval_chunk_size,
            max_length=getattr(self.data_collator, "max_length", None),
            show_progress=self.is_world_process_zero() and not self.args.disable_tqdm,
        )
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        if self.state.epoch is not None and not math.isnan(self.state.epoch):
            metrics["epoch"] = self.state.epoch
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`Trainer._save` (safetensors weights, config, processor), with the training arguments as JSON.

        `Trainer` pickles the arguments to `training_args.bin`; a published retriever carries no pickle, so they
        are written to `training_args.json` instead. (Checkpoints still hold the Trainer's own optimizer, scheduler
        and RNG state files, which only `--resume_from_checkpoint` reads.)
        """
        super()._save(output_dir, state_dict)
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:
            (output_dir / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            (output_dir / "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")

    # ------------------------------------------------------------ model card
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset: str | None = None,
        eval_split: str | None = None,
        datasets: str | list[str] | None = None,
        license: str | None = None,
        **kwargs,
    ) -> None:
        """Writes `README.md` in the output dir: `huggingface_hub.ModelCard` rendered from `model_card.md`.

        `eval_split` names the split the logged `eval_*` metrics were measured on; `datasets` are Hub dataset ids
        for the card metadata; `license` defaults to "apache-2.0". Values given once are remembered, so the card
        that `push_to_hub` regenerates keeps them (other `Trainer.create_model_card` arguments are ignored).
        """
        if not self.is_world_process_zero():
            return
        from ..hub.model_card import write_model_card

        given = {"model_name": model_name, "dataset": dataset, "eval_split": eval_split, "datasets": datasets,
                 "license": license}
        self._card_options = {**getattr(self, "_card_options", {}), **{k: v for k, v in given.items() if v}}
        options = self._card_options
        write_model_card(
            self.args.output_dir,
            model=self.accelerator.unwrap_model(self.model),
            log_history=self.state.log_history,
            model_name=options.get("model_name") or self.args.hub_model_id,
            dataset=options.get("dataset") or self.data_description,
            eval_split=options.get("eval_split"),
            datasets=options.get("datasets"),
            license=options.get("license", "apache-2.0"),
        )
