"""Embedding a pair-view split once per image and once per caption, and its full-gallery retrieval metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.loaders import ImageCaptionIndex
from ..distributed import gather_no_grad, is_distributed
from ..data.image_loading import to_rgb
from .metrics import retrieval_metrics


@dataclass
class EncodedSplit:
    """Embeddings of a split: one row per unique image (by `image_id`) and per caption (by `caption_id`)."""

    image_embeds: torch.Tensor  # [N_images, D], row k = image_id k
    text_embeds: torch.Tensor  # [N_captions, D], row k = caption_id k
    index: ImageCaptionIndex

    @property
    def caption_image_ids(self) -> np.ndarray:
        return self.index.caption_image_ids


def _shard(num_items: int) -> range:
    """Contiguous block of items for this process (all items when not distributed)."""
    if not is_distributed():
        return range(num_items)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per_process = -(-num_items // world)
    return range(min(rank * per_process, num_items), min((rank + 1) * per_process, num_items))


class _LazyImages:
    """Images of some rows of a dataset, decoded a slice at a time (never the whole gallery in memory)."""

    def __init__(self, pairs, rows: list[int]) -> None:
        self.pairs, self.rows = pairs, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows: slice) -> list:
        return self.pairs.select(self.rows[rows])["image"]


def _to_rgb(image):
    if isinstance(image, dict):  # undecoded datasets Image: {"path", "bytes"}
        from datasets import Image as ImageFeature

        image = ImageFeature().decode_example(image)
    return to_rgb(image)


@torch.no_grad()
def encode_images(model, processor, images, batch_size: int = 64, show_progress: bool = True) -> torch.Tensor:
    """Normalised image embeddings of a sequence of PIL images (or datasets image dicts)."""
    device = model.device
    embeds = []
    for start in tqdm(range(0, len(images), batch_size), desc="Embedding images", disable=not show_progress):
        batch = [_to_rgb(image) for image in images[start : start + batch_size]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        embeds.append(model.encode_image(pixel_values).float().cpu())
    if not embeds:
        return torch.zeros(0, model.config.projection_dim)
    return torch.cat(embeds)


@torch.no_grad()
def encode_texts(
    model, processor, texts: list[str], batch_size: int = 256, max_length: int | None = None, show_progress=True
) -> torch.Tensor:
    """Normalised text embeddings of a list of captions (padded per batch, in length order for speed)."""
    device = model.device
    order = np.argsort([-len(text) for text in texts], kind="stable")
    embeds = torch.zeros(len(texts), model.config.projection_dim)
    for start in tqdm(range(0, len(texts), batch_size), desc="Embedding captions", disable=not show_progress):
        rows = order[start : start + batch_size]
        tokens = processor(
            text=[texts[i] for i in rows],
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        features = model.encode_text(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        embeds[torch.as_tensor(rows)] = features.float().cpu()
    return embeds


def encode_split(
    model,
    pairs,
    processor,
    batch_size: int = 64,
    max_length: int | None = None,
    show_progress: bool = True,
) -> EncodedSplit:
    """Embeds each unique image once and every caption of a pair-view split.

    With several processes, each process embeds a contiguous shard and the shards are gathered, so every
    process ends with the full embeddings.
    """
    index = ImageCaptionIndex.from_pairs(pairs)
    was_training = model.training
    model.eval()
    try:
        image_shard = _shard(index.num_images)
        image_rows = [int(index.image_row[i]) for i in image_shard]
        images = _LazyImages(pairs, image_rows)
        image_embeds = encode_images(model, processor, images, batch_size, show_progress)

        caption_shard = _shard(len(index.caption_image_ids))
        captions_by_id = _captions_by_id(pairs)
        texts = [captions_by_id[i] for i in caption_shard]
        text_embeds = encode_texts(model, processor, texts, batch_size * 4, max_length, show_progress)
    finally:
        model.train(was_training)
    if is_distributed():
        image_embeds = gather_no_grad(image_embeds.to(model.device)).cpu()
        text_embeds = gather_no_grad(text_embeds.to(model.device)).cpu()
    return EncodedSplit(image_embeds=image_embeds, text_embeds=text_embeds, index=index)


def _captions_by_id(pairs) -> list[str]:
    captions, caption_ids = pairs["caption"], pairs["caption_id"]
    ordered = [""] * len(captions)
    for caption, caption_id in zip(captions, caption_ids):
        ordered[int(caption_id)] = caption
    return ordered


def split_metrics(
    encoded: EncodedSplit, relevance=None, chunk_size: int = 1024, extended_positives=None
) -> dict[str, float]:
    """Retrieval metrics of an encoded split (R@K, rsum, ranks, mAP@R, R-Precision); `relevance`
    ([`RelevanceLabels`]) adds Kendall τ-b and nDCG@10, `extended_positives` ([`ExtendedPositives`], e.g. from
    `extended_positives.load_extra_positives`) their prefixed mAP@R / R-P / R@K."""
    relevance_rows = None
    if relevance is not None:
        all_captions = np.arange(len(encoded.caption_image_ids))

        def relevance_rows(image_indices: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(relevance.matrix(np.asarray(image_indices), all_captions))

    return retrieval_metrics(
        encoded.image_embeds,
        encoded.text_embeds,
        encoded.caption_image_ids,
        chunk_size=chunk_size,
        relevance=relevance_rows,
        extended_positives=extended_positives,
    )


def evaluate_retrieval(
    model,
    pairs,
    processor,
    relevance=None,
    batch_size: int = 64,
    chunk_size: int = 1024,
    max_length: int | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Full-gallery retrieval metrics of `model` on a pair-view split (see `trainer_bcls.evaluation.metrics`)."""
    encoded = encode_split(model, pairs, processor, batch_size, max_length, show_progress)
    return split_metrics(encoded, relevance, chunk_size)
