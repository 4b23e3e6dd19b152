"""Training side of BCLS: data, continuous relevance labels, collator, Trainer subclass and retrieval metrics."""

from .training.collator import BCLSDataCollator
from .data.loaders import (
    ImageCaptionIndex,
    densify_ids,
    load_hf_dataset,
    load_imagefolder,
    load_karpathy,
    load_pairs,
    validate_images,
    without_image_decoding,
)
from .evaluation.split_evaluation import EncodedSplit, encode_split, evaluate_retrieval, split_metrics
from .evaluation.metrics import retrieval_metrics
from .labels.relevance import (
    PrecomputedRelevance,
    RelevanceLabels,
    SentenceEmbeddingRelevance,
    TfidfRelevance,
    build_relevance_labels,
)
from .labels.streamed_relevance import StreamedRelevanceLabels
from .data.streaming import StreamingPairs
from .data.synthetic import default_synthetic_dir, make_synthetic_dataset
from .towers.tiny_towers import build_tiny_model_and_processor
from .training.tower_freezing import freeze_tower, freeze_towers, layer_groups, unfreeze_tower
from .training.trainer import BCLSTrainer
from .training.training_args import BCLSTrainingArguments

__all__ = [
    "BCLSDataCollator",
    "BCLSTrainer",
    "BCLSTrainingArguments",
    "EncodedSplit",
    "ImageCaptionIndex",
    "PrecomputedRelevance",
    "RelevanceLabels",
    "SentenceEmbeddingRelevance",
    "StreamedRelevanceLabels",
    "StreamingPairs",
    "TfidfRelevance",
    "build_relevance_labels",
    "build_tiny_model_and_processor",
    "default_synthetic_dir",
    "encode_split",
    "evaluate_retrieval",
    "freeze_tower",
    "freeze_towers",
    "load_hf_dataset",
    "load_imagefolder",
    "load_karpathy",
    "layer_groups",
    "load_pairs",
    "make_synthetic_dataset",
    "retrieval_metrics",
    "densify_ids",
    "split_metrics",
    "unfreeze_tower",
    "validate_images",
    "without_image_decoding",
]
