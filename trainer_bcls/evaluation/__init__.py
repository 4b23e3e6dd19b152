"""Evaluation: full-gallery retrieval metrics of a split.

Holds the chunked metrics (Recall@K, rank statistics, mAP@R / R-Precision with binary or extended positives, Kendall τ-b / nDCG@10 against relevance labels, τ-c against
human judgments; ``metrics.py`` is also a self-contained ``evaluate`` module) and the split evaluation (embed each
image once and every caption, then score). May import ``modeling_bcls`` (through the model it is handed),
``trainer_bcls.data`` and ``trainer_bcls.distributed``; nothing from ``training`` or ``retrieval``.
"""

from .metrics import (
    ExtendedPositives,
    judgment_correlation,
    kendall_tau_b,
    kendall_tau_c,
    load_judgments,
    map_at_r,
    ndcg_at_k,
    retrieval_metrics,
    with_binary_positives,
)
from .split_evaluation import EncodedSplit, encode_images, encode_split, encode_texts, evaluate_retrieval, split_metrics

__all__ = [
    "EncodedSplit",
    "ExtendedPositives",
    "encode_images",
    "encode_split",
    "encode_texts",
    "evaluate_retrieval",
    "judgment_correlation",
    "kendall_tau_b",
    "kendall_tau_c",
    "load_judgments",
    "map_at_r",
    "ndcg_at_k",
    "retrieval_metrics",
    "split_metrics",
    "with_binary_positives",
]
