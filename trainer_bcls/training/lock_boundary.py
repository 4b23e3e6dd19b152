"""The lock boundary of a partly frozen tower: capture the states that enter its first trainable layer group, and run
only the trainable tail on them.

With `freeze_tower(tower, unlocked_layers=N)` the tower is ``tail ∘ head``: ``head`` = the frozen layer groups
(``embeddings`` and the first blocks, all in eval mode), ``tail`` = the last N groups. The head is a fixed function
of the input, so ``h = head(x)`` can be computed once per image or caption and a step runs ``tail(h)`` only:

- **capture**: the tower runs on the input with a hook at the boundary — the input of the first trainable block
  (a forward pre-hook), or the output of the last block when only ``final`` trains — that records the states and
  stops the forward there (nothing after the boundary is computed);
- **tail**: the tower's own ``forward`` with every module of the ``embeddings`` group swapped for an identity on its
  first input and the block list cut to the trainable blocks, fed the states as its input: ``pixel_values=h`` for
  an image tower (a CNN feature map ``[B, C, h, w]`` or ViT tokens ``[B, T, D]``), ``inputs_embeds=h`` with the
  caption's ``attention_mask`` for a BERT-like text tower. Masks, the final norm / pooler and the pooling then run
  exactly as in the full forward.

`LockBoundary.check` compares ``tail(capture(x))`` with the full forward on real inputs (eval mode, so no dropout):
a tower whose forward does not follow this pattern (CLIP's text tower needs ``input_ids`` to pool) fails the check
and the caller falls back to the full forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .tower_freezing import find_block_list, layer_groups


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


class _FirstInputIdentity(nn.Module):
    """Stands in for an embeddings-group module during the tail: returns the states it is handed. Other attribute
    reads (ViT reads `embeddings.patch_embeddings.projection.weight.dtype`) go to the module it stands in for."""

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            return kwargs["inputs_embeds"]
        if args:
            return args[0]
        for key in ("pixel_values", "hidden_states", "input"):
            if kwargs.get(key) is not None:
                return kwargs[key]
        raise TypeError("lock boundary: the embeddings stand-in got no input")


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None)


@dataclass
class LockBoundary:
    """Where a partly frozen tower is cut: `blocks` (dotted name of its block list), `first_trainable` (index of
    the first trainable block; ``len(blocks)`` when only ``final`` trains) and the embeddings-group module names."""

    blocks: str
    first_trainable: int
    embedding_modules: tuple[str, ...]

    @classmethod
    def of(cls, tower: nn.Module) -> "LockBoundary | None":
        """The boundary of a tower frozen by `freeze_tower` with some groups unlocked; None when the tower is
        fully trainable, fully locked, or its trainable groups include ``embeddings``."""
        if not any(p.requires_grad for p in tower.parameters()):
            return None
        blocks = find_block_list(tower)
        groups = layer_groups(tower, blocks)
        params = dict(tower.named_parameters())
        flags = [any(params[name].requires_grad for name in group.parameters) for group in groups]
        if flags[0] or not any(flags):
            return None
        first = flags.index(True)
        block_list = tower.get_submodule(blocks)
        names = [f"{blocks}.{child}" for child, _ in block_list.named_children()]
        first_group = groups[first]
        index = next((k for k, name in enumerate(names) if name in first_group.modules), len(names))
        if index == 0:
            return None  # only the embeddings are frozen: nothing worth caching
        return cls(blocks, index, tuple(groups[0].modules))

    # ------------------------------------------------------------------ capture
    def capture(self, tower: nn.Module, **inputs) -> torch.Tensor:
        """The states at the boundary for `inputs` (the tower's keyword inputs), without computing past it."""
        block_list = tower.get_submodule(self.blocks)
        found: list[torch.Tensor] = []
        if self.first_trainable < len(block_list):
            def hook(module, args, kwargs):
                states = args[0] if args else kwargs.get("hidden_states")
                found.append(states)
                raise _StopForward
            handle = block_list[self.first_trainable].register_forward_pre_hook(hook, with_kwargs=True)
        else:
            def hook(module, args, output):
                found.append(_first_tensor(output))
                raise _StopForward
            handle = block_list[len(block_list) - 1].register_forward_hook(hook)
        try:
            tower(**inputs, return_dict=True)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not found or not isinstance(found[0], torch.Tensor):
            raise RuntimeError(f"lock boundary of {type(tower).__name__}: the boundary block never ran")
        return found[0]

    # ------------------------------------------------------------------ tail
    @contextlib.contextmanager
    def tail_only(self, tower: nn.Module) -> Iterator[None]:
        """Within the block, `tower(...)` fed boundary states runs only the trainable tail (module docstring)."""
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for name in (*self.embedding_modules, self.blocks):
                parent_name, _, child = name.rpartition(".")
                parent = tower.get_submodule(parent_name) if parent_name else tower
                original = getattr(parent, child)
                if name == self.blocks:
                    replacement = type(original)(list(original)[self.first_trainable:])
                else:
                    replacement = _FirstInputIdentity(original)
                parent._modules[child] = replacement
                swapped.append((parent, child, original))
            yield
        finally:
            for parent, child, original in reversed(swapped):
                parent._modules[child] = original


__all__ = ["LockBoundary"]
