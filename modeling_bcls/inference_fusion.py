# Licensed under the Apache License, Version 2.0.
r"""Inference fast path of a frozen CNN tower: BatchNorm folded into the convolution before it, exact-identity
squeeze-excite layers dropped, activations in place, channels_last memory format.

A convolution ``y = W ⊛ x + b`` followed by an eval-mode BatchNorm ``z = γ (y − μ) / √(σ² + ε) + β`` is one
convolution::

    s = γ / √(σ² + ε)          W' = W · s   (per output channel)          b' = (b − μ) · s + β

so ``z = W' ⊛ x + b'`` up to float rounding, one pass over the feature map instead of two. Pairs are found by
running the tower once on an example input with hooks: a ``BatchNorm2d`` whose input tensor *is* the output of a
``Conv2d`` is folded into it. A squeeze-excite layer whose gate is ``sigmoid(expand(·))`` with a zero ``expand``
weight and ``sigmoid(bias) == 1`` exactly (the EfficientNet-Lite converter's identity SE) returns its input
unchanged and is dropped. The fused tower is a copy: the model's own weights never change, and the copy is checked
against the original on the example (max difference ≤ ``1e-4`` relative to the output's scale) before it is used;
a tower that fails the check is run as it is.

This file is copied next to saved checkpoints (remote code): torch and the standard library only.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

FUSED_CHECK_TOLERANCE = 1e-4


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def state_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `module` is modified, replaced, moved or cast."""
    return tuple(
        (t.data_ptr(), t._version, t.dtype, str(t.device)) for t in (*module.parameters(), *module.buffers())
    )


def _parent_and_name(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _conv_batchnorm_pairs(tower: nn.Module, example: torch.Tensor, **tower_kwargs) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) pairs where the BatchNorm reads exactly the convolution's output tensor."""
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, module in tower.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: produced.__setitem__(id(out), name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: pairs.append((produced[id(args[0])], name))
                if id(args[0]) in produced else None))
    try:
        with torch.no_grad():
            tower(pixel_values=example, **tower_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    convs = [conv for conv, _ in pairs]
    return [(conv, bn) for conv, bn in pairs if convs.count(conv) == 1]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    weight = conv.weight.detach().double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _is_identity_squeeze_excite(module: nn.Module) -> bool:
    expand = getattr(module, "expand", None)
    gate = getattr(module, "act_expand", None)
    if "SqueezeExcite" not in type(module).__name__ or not isinstance(expand, nn.Conv2d) or expand.bias is None:
        return False
    if not isinstance(gate, nn.Sigmoid):
        return False
    with torch.no_grad():
        return bool((expand.weight == 0).all()) and bool((torch.sigmoid(expand.bias.float()) == 1.0).all())


def fuse_for_inference(tower: nn.Module, example: torch.Tensor, **tower_kwargs) -> nn.Module | None:
    """A fused, channels_last copy of an eval-mode CNN `tower` (module docstring), or None when nothing to fuse or
    the copy does not reproduce the tower on `example` ([n, C, H, W] pixel values)."""
    if not has_batchnorm(tower) or tower.training or any(m.training for m in tower.modules()):
        return None
    example = example[:2].detach()
    fused = copy.deepcopy(tower)
    for p in fused.parameters():
        p.requires_grad_(False)
    for module in fused.modules():  # hooks registered on the tower belong to the tower, not to this copy
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            hooks.clear()
    pairs = _conv_batchnorm_pairs(fused, example, **tower_kwargs)
    for conv_name, bn_name in pairs:
        _fold(fused.get_submodule(conv_name), fused.get_submodule(bn_name))
        parent, child = _parent_and_name(fused, bn_name)
        setattr(parent, child, nn.Identity())
    dropped = [name for name, m in fused.named_modules() if _is_identity_squeeze_excite(m)]
    for name in dropped:
        parent, child = _parent_and_name(fused, name)
        setattr(parent, child, nn.Identity())
    inplace = 0
    for module in fused.modules():  # the fused copy only infers: activations may overwrite their input
        if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish)) and not module.inplace:
            module.inplace = True
            inplace += 1
    fused = fused.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = tower(pixel_values=example, **tower_kwargs)
        got = fused(pixel_values=example.contiguous(memory_format=torch.channels_last), **tower_kwargs)
    for key in ("pooler_output", "last_hidden_state"):
        a, b = getattr(want, key, None), getattr(got, key, None)
        if a is None:
            continue
        scale = float(a.float().abs().max().clamp(min=1.0))
        if b is None or a.shape != b.shape or float((a.float() - b.float()).abs().max()) > FUSED_CHECK_TOLERANCE * scale:
            logger.warning("fused inference tower differs from %s on the example; running it unfused", type(tower).__name__)
            return None
    logger.info(
        "inference fast path for %s: %d BatchNorms folded into their convolutions, %d identity squeeze-excite "
        "layers dropped, %d activations in place, channels_last", type(tower).__name__, len(pairs), len(dropped), inplace,
    )
    return fused


class FusedTowerCache:
    """The fused copy of one tower, rebuilt when the tower's weights, dtype or device change."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.fused: nn.Module | None = None

    def get(self, tower: nn.Module, example: torch.Tensor, **tower_kwargs) -> nn.Module | None:
        key = (state_key(tower), tuple(example.shape[1:]), example.dtype)
        if key != self.key:
            self.fused = fuse_for_inference(tower, example, **tower_kwargs)
            self.key = key
        return self.fused


__all__ = ["FusedTowerCache", "fuse_for_inference", "has_batchnorm", "state_key"]
