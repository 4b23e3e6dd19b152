"""Run under `accelerate launch --multi_gpu --num_processes 2 ...`: the lock-boundary caches across processes.

BCLSTrainer runs of 2 epochs from the same seed, with and without the caches: (1) a locked tiny-ResNet vision tower
and GradCache (chunks of 4 rows); (2) LiT: both towers frozen, the text tower's last layer trainable (its tail runs
on cached token states, outside DDP's forward), no GradCache. Each process counts the forward calls of its vision
tower per epoch. With the caches, no epoch runs one on either process (each process embedded half of the images
before the first step and the halves were all-gathered, so every process's cache holds every training image), and
the logged losses and final weights equal the uncached run's. Writes `result-<rank>.json` into argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from trainer_bcls import (
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    RelevanceLabels,
    TfidfRelevance,
    build_tiny_model_and_processor,
    freeze_towers,
    load_pairs,
)


class EpochTowerCalls(TrainerCallback):
    """Forward calls of the vision tower in each epoch (a forward hook)."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.count, self.per_epoch = 0, []
        tower.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = self.count

    def on_epoch_end(self, args, state, control, **kwargs):
        self.per_epoch.append(self.count - self.start)


def run(pairs, relevance, out_dir: str, cached: bool, lit: bool = False) -> dict:
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(pairs["caption"], image_size=32, projection_dim=32)
    # BatchNorm in eval: exact across processes and chunks
    freeze_towers(model, freeze_vision_model=True, freeze_text_model=lit, text_unlocked_layers=int(lit))
    model.fast_inference = False  # count the tower's own forward calls, not its fused inference copy's
    counter = EpochTowerCalls(model.vision_model)
    args = BCLSTrainingArguments(
        output_dir=f"{out_dir}/run-{cached}-{lit}", per_device_train_batch_size=8, learning_rate=1e-3, num_train_epochs=2,
        embedding_chunk_size=None if lit else 4, cache_locked_features=cached, logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    trainer = BCLSTrainer(
        model=model, args=args, train_dataset=pairs, processing_class=processor,
        data_collator=BCLSDataCollator(processor, relevance=relevance, max_length=32),
    )
    trainer.add_callback(counter)
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    caches = trainer.feature_caches
    return {
        "calls_per_epoch": counter.per_epoch,
        "calls_before_training": counter.count - sum(counter.per_epoch),
        "cache_entries": len(caches.vision.rows) if caches.vision is not None else 0,
        "text_cache": caches.text.mode if caches.text is not None else None,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "weights": {name: p.detach().clone() for name, p in unwrapped.named_parameters() if p.requires_grad},
    }


def main(out_dir: str, data_dir: str) -> None:
    pairs = load_pairs(data_dir, "train").select(range(96))  # 20 images; 6 steps per epoch of 2 x 8 pairs
    relevance = RelevanceLabels.build(pairs, TfidfRelevance())
    result = {"distinct_images": len(set(pairs["image_id"]))}
    for name, lit in (("locked", False), ("lit", True)):
        cached = run(pairs, relevance, out_dir, cached=True, lit=lit)
        plain = run(pairs, relevance, out_dir, cached=False, lit=lit)
        initial = run_initial_weights(pairs, lit)
        result[name] = {
            "cached_calls_per_epoch": cached["calls_per_epoch"],
            "cached_calls_before_training": cached["calls_before_training"],
            "plain_calls_per_epoch": plain["calls_per_epoch"],
            "cache_entries": cached["cache_entries"],
            "text_cache": cached["text_cache"],
            "max_loss_diff": max(abs(a - b) for a, b in zip(cached["losses"], plain["losses"])),
            "num_losses": [len(cached["losses"]), len(plain["losses"])],
            "max_weight_diff": max(
                (cached["weights"][key] - weight).abs().max().item() for key, weight in plain["weights"].items()
            ),
            "weights_moved": max((cached["weights"][key] - weight).abs().max().item() for key, weight in initial.items()),
        }
    rank = torch.distributed.get_rank()  # initialised by the first run's training arguments
    result.update(rank=rank, world=torch.distributed.get_world_size())
    Path(out_dir, f"result-{rank}.json").write_text(json.dumps(result))


def run_initial_weights(pairs, lit: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = build_tiny_model_and_processor(pairs["caption"], image_size=32, projection_dim=32)
    freeze_towers(model, freeze_vision_model=True, freeze_text_model=lit, text_unlocked_layers=int(lit))
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
