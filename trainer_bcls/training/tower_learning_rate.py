"""Optimizer parameter groups with a separate learning rate for the towers' trainable parameters.

Fine-tuning pretrained layers usually wants a smaller step than the freshly initialised projections (LiT's unlocked
text tower, a partially unlocked image tower): with `tower_learning_rate` set, the parameters of
`BCLSModel.vision_model` and `BCLSModel.text_model` that train get it, and everything else (the projections) keeps
`learning_rate`. Each of the two is split again by weight decay, exactly as `Trainer.create_optimizer` splits
(`Trainer.get_decay_parameter_names`), so the groups are

    {towers, heads} x {decay, no decay}  (empty groups dropped)

and a learning-rate scheduler scales every group's own rate by the same factor.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

TOWER_PREFIXES = ("vision_model.", "text_model.")


def is_tower_parameter(name: str) -> bool:
    """True for a parameter of the vision or text tower (`BCLSModel` parameter names)."""
    return name.startswith(TOWER_PREFIXES)


def tower_parameter_groups(
    model: nn.Module,
    decay_parameter_names: Collection[str],
    weight_decay: float,
    learning_rate: float,
    tower_learning_rate: float,
) -> list[dict]:
    """Parameter groups (trainable parameters only) for `torch.optim` with per-group `lr` and `weight_decay`."""
    if tower_learning_rate < 0:
        raise ValueError(f"tower_learning_rate must be >= 0, got {tower_learning_rate}")
    decay_names = set(decay_parameter_names)
    groups = []
    for tower in (False, True):
        for decay in (True, False):
            params = [
                p for n, p in model.named_parameters()
                if p.requires_grad and is_tower_parameter(n) == tower and (n in decay_names) == decay
            ]
            if params:
                groups.append({
                    "params": params,
                    "lr": tower_learning_rate if tower else learning_rate,
                    "weight_decay": weight_decay if decay else 0.0,
                    "tower": tower,
                })
    return groups
