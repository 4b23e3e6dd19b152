"""Run under `accelerate launch --multi_gpu --num_processes 2 ...`: the global-batch BCLS loss is exact.

Each process takes half of one batch, embeds it through the DDP-wrapped model and computes the global-batch loss
(local queries × gathered candidates). The mean of the per-process losses must equal the single-process loss on
the whole batch, and the gradients after DDP averaging must equal the single-process gradients; the same for
gradient caching (chunked embedding) across processes. Writes `result-<rank>.json` into the folder given as argv[1].
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer_bcls import BCLSDataCollator, build_tiny_model_and_processor, load_pairs
from trainer_bcls.training.global_loss import global_bcls_loss
from trainer_bcls.training.gradcache import cached_embeddings
from trainer_bcls.labels.relevance import RelevanceLabels, TfidfRelevance


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main(out_dir: str, data_dir: str) -> None:
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    pairs = load_pairs(data_dir, "train")
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(
        pairs["caption"], image_size=32, projection_dim=32, vision="vit"  # no BatchNorm: exact across processes
    )
    model.config.kendall_window_size = 3
    relevance = RelevanceLabels.build(pairs, TfidfRelevance())
    collator = BCLSDataCollator(processor, relevance=relevance)

    # 12 rows, several captions per image, so positives also cross process boundaries.
    rows = [pairs[i] for i in range(12)]
    full = collator(rows)
    per_process = len(rows) // world
    local = collator(rows[rank * per_process : (rank + 1) * per_process])

    reference = copy.deepcopy(model)
    ddp_model = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(ddp_model)
    features = ("pixel_values", "input_ids", "attention_mask")
    result = {"rank": rank, "world": world}
    # Every binary loss with the Kendall term on top (the composable objective), and relevance-aware negatives
    # (soft and hard), whose weights come from the cross-process relevance rebuilt from the gathered ids.
    settings = {
        "triplet_sn": dict(binary_loss="triplet_sn"),
        "vse": dict(binary_loss="vse"),
        "infonce": dict(binary_loss="infonce"),
        "triplet_sn_soft_false_negatives": dict(binary_loss="triplet_sn", false_negative_threshold=0.04,
                                                false_negative_ramp=0.06),
        "vse_hard_false_negatives": dict(binary_loss="vse", false_negative_threshold=0.06),
    }
    negatives = full["image_ids"][:, None] != full["image_ids"][None, :]
    result["relevance_of_negatives"] = full["relevance"][negatives].tolist()
    for binary_loss, overrides in settings.items():
        for config in (reference.config, unwrapped.config):
            config.false_negative_threshold, config.false_negative_ramp = None, 0.0
            for key, value in overrides.items():
                setattr(config, key, value)

        # Reference: one process, whole batch, the model's own loss.
        reference.zero_grad()
        ref_out = reference(**full)
        ref_out.loss.backward()
        ref_grads = grads_of(reference)

        # Global batch across processes, through DDP.
        unwrapped.zero_grad()
        out = ddp_model(**{k: local[k] for k in features}, return_loss=False)
        loss = global_bcls_loss(unwrapped.config, out.image_embeds, out.text_embeds, local, relevance)["loss"]
        loss.backward()
        ddp_grads = grads_of(unwrapped)
        mean_loss = accelerator.reduce(loss.detach().clone(), reduction="mean").item()

        # Gradient caching across processes (chunks of 2 rows), gradients averaged like DDP.
        unwrapped.zero_grad()
        cached_loss, _, _ = cached_embeddings(
            unwrapped,
            {k: local[k] for k in features},
            chunk_size=2,
            loss_fn=lambda img, txt: global_bcls_loss(unwrapped.config, img, txt, local, relevance),
            sync_gradients=True,
        )
        cached_loss.backward()
        cached_grads = grads_of(unwrapped)
        cached_mean = accelerator.reduce(cached_loss.detach().clone(), reduction="mean").item()

        result[binary_loss] = {
            "reference_loss": ref_out.loss.item(),
            "global_loss_mean": mean_loss,
            "cached_loss_mean": cached_mean,
            "max_grad_diff": max_grad_diff(ddp_grads, ref_grads),
            "max_cached_grad_diff": max_grad_diff(cached_grads, ref_grads),
            "reference_kendall": ref_out.loss_kendall.item(),
        }
    # --gather_across_processes False: each process's loss is the one-process loss of its local batch alone
    with torch.no_grad():
        out = ddp_model(**{k: local[k] for k in features}, return_loss=False)
        local_only = global_bcls_loss(unwrapped.config, out.image_embeds, out.text_embeds, local, relevance,
                                      gather=False)["loss"]
        result["local_only"] = {"loss": local_only.item(), "reference": reference(**local).loss.item(),
                                "global": global_bcls_loss(unwrapped.config, out.image_embeds, out.text_embeds,
                                                           local, relevance)["loss"].item()}
    result["mined"] = check_mined_candidates(pairs, processor, relevance, reference, ddp_model, unwrapped,
                                             accelerator, rank, world)
    Path(out_dir, f"result-{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


def check_mined_candidates(pairs, processor, relevance, reference, ddp_model, unwrapped, accelerator, rank, world):
    """Mined hard negatives as extra text candidates (one per row): the global loss equals `bcls_loss` on the full
    candidate matrix of one process. Most extras come from images outside the batch; row 0's is an unpaired caption
    of an image that only the other process holds (a positive across processes), and row 1's is a caption paired on
    the other process (dropped there, as the one-process collator drops it)."""
    from modeling_bcls.losses import bcls_loss

    rows = [dict(pairs[i]) for i in range(12)]
    outside = [r for r in pairs if r["image_id"] not in {x["image_id"] for x in rows}]
    picks = list(outside[:12])
    last_image = rows[-1]["image_id"]  # held by the second process only
    picks[0] = next(r for r in pairs if r["image_id"] == last_image and r["caption_id"] not in
                    {x["caption_id"] for x in rows})
    picks[1] = rows[7]
    for row, pick in zip(rows, picks):
        row.update(hard_negative_caption_ids=[pick["caption_id"]], hard_negative_image_ids=[pick["image_id"]],
                   hard_negatives=[pick["caption"]])
    collator = BCLSDataCollator(processor, relevance=relevance, hard_negatives_per_row=1)
    full = collator(rows)
    per_process = len(rows) // world
    local = collator(rows[rank * per_process : (rank + 1) * per_process])
    for config in (reference.config, unwrapped.config):
        config.binary_loss, config.false_negative_threshold, config.false_negative_ramp = "triplet_sn", 0.04, 0.06

    def with_extra_text(batch):
        return {"pixel_values": batch["pixel_values"],
                **{k: torch.cat([batch[k], batch[f"hard_negative_{k}"]]) for k in ("input_ids", "attention_mask")}}

    B = len(rows)
    reference.zero_grad()
    out = reference(**with_extra_text(full), return_loss=False)
    candidates = torch.cat([full["image_ids"], full["hard_negative_image_ids"]])
    mask = full["image_ids"][:, None] == candidates[None, :]
    sim = out.image_embeds @ out.text_embeds.T
    R = full["relevance"]
    ref = bcls_loss(sim, mask, R, sim_t2i=sim[:, :B].T, positive_mask_t2i=mask[:, :B].T, relevance_t2i=R[:, :B].T,
                    **reference.config.loss_kwargs())
    ref_loss = ref["loss"]
    ref_loss.backward()
    ref_grads = grads_of(reference)

    unwrapped.zero_grad()
    out = ddp_model(**with_extra_text(local), return_loss=False)
    loss = global_bcls_loss(unwrapped.config, out.image_embeds, out.text_embeds, local, relevance)["loss"]
    loss.backward()
    ddp_grads = grads_of(unwrapped)
    unwrapped.zero_grad()
    cached_loss, _, _ = cached_embeddings(
        unwrapped, with_extra_text(local), chunk_size=4,
        loss_fn=lambda img, txt: global_bcls_loss(unwrapped.config, img, txt, local, relevance), sync_gradients=True,
    )
    cached_loss.backward()
    return {
        "extra_candidates": int(full["hard_negative_caption_ids"].numel()),
        "extra_positives": int(mask[:, B:].sum()),
        "processes_hold_last_image": [bool((r["image_id"] == last_image)) for r in rows].count(True),
        "reference_loss": ref_loss.item(),
        "global_loss_mean": accelerator.reduce(loss.detach().clone(), reduction="mean").item(),
        "cached_loss_mean": accelerator.reduce(cached_loss.detach().clone(), reduction="mean").item(),
        "max_grad_diff": max_grad_diff(ddp_grads, ref_grads),
        "max_cached_grad_diff": max_grad_diff(grads_of(unwrapped), ref_grads),
        "reference_kendall": ref["kendall"].item(),
    }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
