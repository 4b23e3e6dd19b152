"""`BCLSTrainingArguments`: `TrainingArguments` with the defaults and knobs BCLS training needs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments


# Float flags that must be finite (a NaN or infinite value would train NaN weights or fail far from the flag).
FINITE_FLOAT_ARGUMENTS = (
    "learning_rate", "tower_learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "warmup_ratio", "label_smoothing_factor", "num_train_epochs",
)


@dataclass
class BCLSTrainingArguments(TrainingArguments):
    """`TrainingArguments` for [`BCLSTrainer`].

    Defaults that differ from `TrainingArguments`:

    - `remove_unused_columns=False`: the collator needs `image`, `caption`, `image_id` and `caption_id`.
    - `metric_for_best_model="rsum"`, `greater_is_better=True`: evaluation is full-gallery retrieval, not a loss.

    New arguments:

    - `embedding_chunk_size`: gradient caching (GradCache). The batch is embedded in chunks of this many rows
      without a graph, the loss is computed on all embeddings, and the gradient is then back-propagated chunk by
      chunk, so the memory of a step is that of one chunk while the loss sees the whole batch.
    - `gather_across_processes`: with several processes, local queries are scored against the candidates of
      *all* processes (gathered with gradients), so the loss is the loss of the global batch.
    - `cache_locked_features` (default True): the frozen part of a locked or partly unlocked tower runs once per
      training image and caption (`trainer_bcls.training.feature_cache`); `cache_locked_image_features=False`
      turns off the image side only (the former flag, kept); bypassed for images when the collator augments them.
    - `feature_cache_dir`: persist those caches (safetensors + JSON manifest) so later runs start warm;
      `feature_cache_max_gb`: above this size a cache is memory-mapped from disk instead of held in memory.
    - `eval_chunk_size`: query chunk of the chunked retrieval metrics (bounds evaluation memory).
    - `tower_learning_rate`: learning rate of the towers' trainable parameters (unlocked layers, or whole towers
      when fine-tuned); `None` uses `learning_rate` everywhere. The projections always use `learning_rate`
      (`trainer_bcls.training.tower_learning_rate`).
    """

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the pair-view columns for the BCLS collator (leave False)."}
    )
    metric_for_best_model: str | None = field(
        default="rsum", metadata={"help": "Retrieval metric used to pick the best checkpoint (default rsum)."}
    )
    greater_is_better: bool | None = field(default=True, metadata={"help": "rsum is better when larger."})
    embedding_chunk_size: int | None = field(
        default=None,
        metadata={"help": "GradCache: embed the batch in chunks of this size; None embeds it in one pass."},
    )
    gather_across_processes: bool = field(
        default=True,
        metadata={"help": "Score local queries against the candidates of all processes (global-batch loss)."},
    )
    cache_locked_features: bool = field(
        default=True,
        metadata={"help": "Locked or partly unlocked towers: run their frozen part once per training image and "
                  "caption and cache its outputs (the lock-boundary caches); --no_cache_locked_features turns "
                  "every cache off."},
    )
    cache_locked_image_features: bool = field(
        default=True,
        metadata={"help": "The image side of cache_locked_features (False: images run the tower every step)."},
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Persist the lock-boundary caches in this folder (safetensors shards + JSON manifests), "
                  "so that later runs with the same towers and data start warm."},
    )
    feature_cache_max_gb: float = field(
        default=8.0,
        metadata={"help": "A lock-boundary cache larger than this many GiB is memory-mapped from disk "
                  "(feature_cache_dir, else <output_dir>/feature_cache) instead of held in memory."},
    )
    eval_chunk_size: int = field(default=1024, metadata={"help": "Query chunk size of the retrieval metrics."})
    tower_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the towers' trainable layers (default: learning_rate); the "
                  "projections keep learning_rate."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.embedding_chunk_size is not None and self.embedding_chunk_size < 1:
            raise ValueError(f"embedding_chunk_size must be a positive integer, got {self.embedding_chunk_size}")
        for name in FINITE_FLOAT_ARGUMENTS:  # NaN passes `nan < 0`: check finiteness first, at start
            value = getattr(self, name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        if not (self.feature_cache_max_gb >= 0 and math.isfinite(self.feature_cache_max_gb)):
            raise ValueError(f"--feature_cache_max_gb must be a finite number >= 0, got {self.feature_cache_max_gb}")
        if self.tower_learning_rate is not None and not self.tower_learning_rate >= 0:
            raise ValueError(f"--tower_learning_rate must be >= 0, got {self.tower_learning_rate}")
