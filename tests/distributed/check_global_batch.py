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
    Path(out_dir, f"result-{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
