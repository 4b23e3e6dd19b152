"""The BCLS loss of the global batch: local queries × candidates gathered from every process.

See `trainer_bcls.distributed` for why ``L_r = W · Σ_{r's terms} φ / N_global`` makes DDP's averaged gradient
equal the single-process gradient on the concatenated batch.

Extra text candidates (mined hard negatives, ``hard_negative_caption_ids`` in the labels) follow the paired captions
in ``text_embeds``: image→text queries rank the paired captions of every process and then the extra ones of every
process (a column is positive when its caption belongs to the query's image, so a mined caption whose image is in
the batch is a positive, never a false negative); text→image queries are the paired captions only.
"""

from __future__ import annotations

import torch

from ..distributed import (
    gather_no_grad,
    gather_with_grad,
    global_count,
    is_distributed,
    local_offset,
    process_sizes,
)


def global_relevance(
    relevance_labels, caption_ids: torch.Tensor, all_image_ids: torch.Tensor, sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's rows of the global relevance matrix (i2t) and of its transpose (t2i).

    Each process's collator only built the B_local × B_local block; the cross-process blocks are rebuilt from
    the gathered image and caption ids with the same [`RelevanceLabels`] the collator uses, so they are exact.
    """
    all_caption_ids = gather_no_grad(caption_ids, sizes)
    full = torch.as_tensor(
        relevance_labels.batch_matrix(all_image_ids.cpu().numpy(), all_caption_ids.cpu().numpy())
    )
    start = local_offset(sizes)
    rows = slice(start, start + caption_ids.shape[0])
    return full[rows], full[:, rows].T


def global_streamed_relevance(
    labels: dict[str, torch.Tensor], all_image_ids: torch.Tensor, sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `global_relevance` for streamed labels: the batch carries the embeddings its relevance was built from
    (`reference_embeds`, `reference_mask`, `caption_embeds`); they are gathered and the global matrix rebuilt with
    `relevance_from_embeddings`, the collator's own formula."""
    from ..labels.streamed_relevance import relevance_from_embeddings

    device = all_image_ids.device
    refs = gather_no_grad(labels["reference_embeds"].to(device), sizes)
    mask = gather_no_grad(labels["reference_mask"].to(device=device, dtype=torch.uint8), sizes).bool()
    caps = gather_no_grad(labels["caption_embeds"].to(device), sizes)
    start = local_offset(sizes)
    rows = slice(start, start + labels["caption_embeds"].shape[0])
    i2t = relevance_from_embeddings(refs[rows], mask[rows], caps, all_image_ids[rows], all_image_ids)
    t2i = relevance_from_embeddings(refs, mask, caps[rows], all_image_ids, all_image_ids[rows]).T
    return i2t, t2i


def _first_occurrences(extra_ids: torch.Tensor, paired_ids: torch.Tensor) -> torch.Tensor:
    """Mask of the extra caption ids that are neither paired captions of the global batch nor repeats of an
    earlier extra id (the extra columns of one caption are kept once, as one process's collator does)."""
    if extra_ids.numel() == 0:
        return torch.ones(0, dtype=torch.bool, device=extra_ids.device)
    first = torch.zeros_like(extra_ids, dtype=torch.bool)
    unique, inverse = torch.unique(extra_ids, return_inverse=True)
    positions = torch.arange(len(extra_ids), device=extra_ids.device)
    earliest = torch.full((len(unique),), len(extra_ids), device=extra_ids.device).scatter_reduce(
        0, inverse, positions, reduce="amin")
    first[earliest] = True
    return first & ~torch.isin(extra_ids, paired_ids)


def global_bcls_loss(
    config,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    labels: dict[str, torch.Tensor],
    relevance_labels=None,
    gather: bool = True,
) -> dict[str, torch.Tensor]:
    """`bcls_loss` of local queries against the candidates of all processes, normalised by global counts
    (``gather=False``: of this process's batch alone, as `--gather_across_processes False` asks).

    Args:
        config: the model's [`BCLSConfig`] (loss hyperparameters).
        image_embeds: this process's normalised image embeddings, rows = pairs ``[B, D]``.
        text_embeds: the paired captions' embeddings ``[B, D]``, followed by those of the batch's extra candidates
            (``[B + E, D]`` when the labels carry ``hard_negative_caption_ids`` of length E).
        labels: the collator's label tensors (`image_ids`, `caption_ids`, `relevance`, `relevance_order_*`,
            `hard_negative_caption_ids`, `hard_negative_image_ids`).
        relevance_labels: the collator's [`RelevanceLabels`], needed to rebuild relevance across processes.
    """
    from modeling_bcls.losses import bcls_loss

    distributed = gather and is_distributed()
    world_size = torch.distributed.get_world_size() if distributed else 1
    device = image_embeds.device

    def sizes_of(rows: int) -> list[int]:
        return process_sizes(rows, device) if distributed else [rows]

    def with_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return gather_with_grad(tensor, sizes) if distributed else tensor

    def no_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return gather_no_grad(tensor, sizes) if distributed else tensor

    batch = image_embeds.shape[0]
    sizes = sizes_of(batch)  # one size exchange for all the gathers
    image_ids = labels.get("image_ids")
    if image_ids is None:
        image_ids = torch.arange(batch, device=device) + (local_offset(sizes) if distributed else 0)
    extra_ids = labels.get("hard_negative_caption_ids")
    if extra_ids is None and text_embeds.shape[0] != batch:
        raise ValueError(f"{batch} images but {text_embeds.shape[0]} captions and no `hard_negative_caption_ids`")
    paired_text = text_embeds[:batch]
    all_image_embeds = with_grad(image_embeds, sizes)
    all_text_embeds = with_grad(paired_text, sizes)
    all_image_ids = no_grad(image_ids, sizes)
    positive_mask = image_ids[:, None] == all_image_ids[None, :]
    positive_mask_i2t = positive_mask
    if extra_ids is not None:  # mined candidates of every process after the paired captions of every process
        extra_sizes = sizes_of(extra_ids.shape[0])
        all_extra_ids = no_grad(extra_ids, extra_sizes)
        all_extra_images = no_grad(labels["hard_negative_image_ids"], extra_sizes)
        all_extra_embeds = with_grad(text_embeds[batch:], extra_sizes)
        if world_size > 1:  # each collator dropped its own repeats; drop those across processes (first one kept)
            keep = _first_occurrences(all_extra_ids, no_grad(labels["caption_ids"], sizes))
            all_extra_ids, all_extra_images, all_extra_embeds = (
                all_extra_ids[keep], all_extra_images[keep], all_extra_embeds[keep])
        all_text_embeds = torch.cat([all_text_embeds, all_extra_embeds])
        positive_mask_i2t = torch.cat([positive_mask, image_ids[:, None] == all_extra_images[None, :]], dim=1)
    sim_i2t = image_embeds.float() @ all_text_embeds.float().T
    sim_t2i = paired_text.float() @ all_image_embeds.float().T

    relevance_i2t = relevance_t2i = order_i2t = order_t2i = None
    if labels.get("relevance") is not None:
        if world_size == 1:
            relevance_i2t = labels["relevance"]  # [B, B + E]: the collator's columns are in the same order
            relevance_t2i = relevance_i2t[:, :batch].T
            order_i2t = labels.get("relevance_order_i2t")
            order_t2i = labels.get("relevance_order_t2i")
        elif labels.get("caption_embeds") is not None:  # streamed labels: rebuilt from the gathered embeddings
            relevance_i2t, relevance_t2i = global_streamed_relevance(labels, all_image_ids, sizes)
        else:
            if relevance_labels is None or labels.get("caption_ids") is None:
                raise ValueError(
                    "The global-batch BCLS loss needs the collator's relevance labels and `caption_ids` in the "
                    "batch to rebuild the cross-process relevance: use BCLSDataCollator(processor, relevance=...)."
                )
            relevance_i2t, relevance_t2i = global_relevance(
                relevance_labels, labels["caption_ids"], all_image_ids, sizes
            )
            if extra_ids is not None:
                extra = relevance_labels.candidate_matrix(
                    image_ids.cpu().numpy(), labels["caption_ids"].cpu().numpy(), all_extra_ids.cpu().numpy()
                )
                relevance_i2t = torch.cat([relevance_i2t, torch.as_tensor(extra)], dim=1)
        relevance_i2t = relevance_i2t.to(sim_i2t.device, torch.float32)
        relevance_t2i = relevance_t2i.to(sim_t2i.device, torch.float32)

    def count_reducer(count: torch.Tensor) -> torch.Tensor:
        return (global_count(count) / world_size).to(count.dtype) if distributed else count

    return bcls_loss(
        sim_i2t,
        positive_mask_i2t,
        relevance_i2t,
        sim_t2i=sim_t2i,
        positive_mask_t2i=positive_mask,
        relevance_t2i=relevance_t2i,
        sort_order_i2t=order_i2t,
        sort_order_t2i=order_t2i,
        count_reducer=count_reducer,
        **config.loss_kwargs(),
    )
