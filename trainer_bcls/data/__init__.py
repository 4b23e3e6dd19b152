"""Data: image-caption datasets on disk or on the Hub → ``datasets.Dataset`` pair views (one row per caption).

Holds the loaders (Karpathy json, imagefolder + metadata, saved / parquet / Hub datasets), image decoding to RGB,
the image → captions index of a split, webdataset shards (patterns, reading, writing) and streams of training pairs
(``StreamingPairs``), the synthetic demo data, train-time augmentation and the data errors (:class:`InvalidDataError`,
counted skips). May import only the standard library, PIL, numpy, ``datasets``, ``torch.utils.data`` and
``trainer_bcls.cache``: nothing from ``labels``, ``training``, ``evaluation``, ``retrieval`` or ``modeling_bcls``.
"""

from .augmentation import RandomResizedCropFlip
from .caption_index import ImageCaptionIndex, check_pair_view, pair_columns_numpy, pair_keys
from .errors import InvalidDataError, SkipReport
from .image_loading import ImageLoadError, load_image, to_rgb
from .loaders import (
    densify_ids,
    load_hf_dataset,
    load_imagefolder,
    load_karpathy,
    load_pairs,
    resolve_image_column,
    validate_images,
    without_image_decoding,
)
from .shard_writer import karpathy_shard_samples, write_shards
from .shards import expand_shard_pattern, iter_shard_samples
from .streaming import StreamingPairs, hf_stream_samples, shard_samples
from .synthetic import default_synthetic_dir, make_synthetic_dataset

__all__ = [
    "ImageCaptionIndex",
    "ImageLoadError",
    "InvalidDataError",
    "RandomResizedCropFlip",
    "SkipReport",
    "StreamingPairs",
    "check_pair_view",
    "default_synthetic_dir",
    "densify_ids",
    "expand_shard_pattern",
    "iter_shard_samples",
    "karpathy_shard_samples",
    "hf_stream_samples",
    "load_hf_dataset",
    "load_image",
    "load_imagefolder",
    "load_karpathy",
    "load_pairs",
    "make_synthetic_dataset",
    "pair_columns_numpy",
    "pair_keys",
    "resolve_image_column",
    "shard_samples",
    "to_rgb",
    "validate_images",
    "without_image_decoding",
    "write_shards",
]
