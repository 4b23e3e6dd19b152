"""Labels: the continuous relevance labels ``R[i, j]`` of a split and the caption embedders behind them.

``relevance(image i, caption j) = max_c cos(e(c), e(caption j))`` over the reference captions ``c`` of image ``i``,
``R = 1`` on positives, with caption embeddings cached on disk; for streams, ``StreamedRelevanceLabels`` embeds captions
as they arrive and takes the sample's own captions as references. May import ``trainer_bcls.data`` (the caption index,
data errors) and ``trainer_bcls.cache``; nothing from ``training``, ``evaluation`` or ``retrieval``.
"""

from .caption_embedders import CaptionEmbedder, PrecomputedRelevance, SentenceEmbeddingRelevance, TfidfRelevance
from .relevance import RelevanceLabels, build_relevance_labels
from .streamed_relevance import StreamedRelevanceLabels

__all__ = [
    "CaptionEmbedder",
    "PrecomputedRelevance",
    "RelevanceLabels",
    "SentenceEmbeddingRelevance",
    "StreamedRelevanceLabels",
    "TfidfRelevance",
    "build_relevance_labels",
]
