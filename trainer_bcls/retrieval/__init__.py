"""Retrieval: embed a gallery once into an on-disk index, then search it by text or by image.

Holds :class:`RetrievalIndex` (embeddings in safetensors + ``index.json`` [+ ``index.faiss``], incremental
updates, a multi-process build in ``parallel_index``), the image sources it embeds (a folder walked recursively, a datasets image column) and the inference
device / bf16 choice. May import ``modeling_bcls``, ``trainer_bcls.data`` (image loading), ``trainer_bcls.evaluation``
(the batch encoders) and ``trainer_bcls.fingerprint``; nothing from ``training``.
"""

from .image_sources import DatasetSource, FolderSource, ImageSource, open_image_source
from .index import (
    IndexingReport,
    RetrievalIndex,
    RetrievalModel,
    SearchHit,
    build_index,
    embed_image_queries,
    embed_text_queries,
)
from .inference_device import default_device, prepare_for_inference, resolve_device

__all__ = [
    "DatasetSource",
    "FolderSource",
    "ImageSource",
    "IndexingReport",
    "RetrievalIndex",
    "RetrievalModel",
    "SearchHit",
    "build_index",
    "default_device",
    "embed_image_queries",
    "embed_text_queries",
    "open_image_source",
    "prepare_for_inference",
    "resolve_device",
]
