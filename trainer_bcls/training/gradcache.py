"""Gradient caching (GradCache; Gao et al. 2021) for the BCLS loss.

The loss needs the whole batch (every caption is a candidate of every image), but the towers need memory per
row. GradCache splits a step in three passes:

1. embed the batch in chunks of ``chunk_size`` rows **without** a graph (remembering each chunk's RNG state);
2. compute the loss on the concatenated embeddings ``E`` (leaves) and back-propagate to get ``∂L/∂E``;
3. when the Trainer back-propagates the returned loss, a hook re-embeds each chunk **with** a graph under the
   same RNG state and back-propagates ``⟨E_chunk, ∂L/∂E_chunk⟩``.

The gradients equal those of the unchunked batch (dropout included, thanks to the replayed RNG state), at the
memory cost of one chunk plus the embeddings. This is the scheme of sentence-transformers'
``CachedMultipleNegativesRankingLoss``, applied to both towers.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class RandomState:
    """The CPU (and, if present, CUDA) RNG state at capture time, replayable with ``replay()``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        devices = [self.device] if self.cuda_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


IMAGE_FEATURE_KEYS = ("pixel_values", "vision_pooled_output")


def _rows(features: dict[str, torch.Tensor], image: bool) -> int:
    """Rows of one modality's inputs (images, or texts: the paired captions plus any extra candidates)."""
    return max((len(v) for k, v in features.items() if (k in IMAGE_FEATURE_KEYS) == image), default=0)


def _chunk(features: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The inputs of rows ``rows`` of each modality; a modality with no row there is left out (the text side can be
    longer than the image side when the batch carries extra text candidates)."""
    chunk = {}
    for image in (True, False):
        if rows.start < _rows(features, image):
            chunk.update({k: v[rows] for k, v in features.items() if (k in IMAGE_FEATURE_KEYS) == image})
    return chunk


def _embed(model: nn.Module, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    outputs = model(**features, return_loss=False)
    return outputs.image_embeds, outputs.text_embeds


def cached_embeddings(
    model: nn.Module,
    features: dict[str, torch.Tensor],
    chunk_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    sync_gradients: bool = False,
):
    """Loss of the whole batch with chunk-by-chunk back-propagation (see module docstring).

    Args:
        model: the *unwrapped* model (no DDP wrapper: its forward would start collectives per chunk).
        features: ``pixel_values``, ``input_ids``, ``attention_mask`` of the batch.
        chunk_size: rows per chunk.
        loss_fn: ``(image_embeds, text_embeds) -> dict(loss, triplet, kendall)`` on the whole batch.
        sync_gradients: all-reduce (average) the parameter gradients over processes after the chunked backward,
            which is what DDP would have done.

    Returns:
        ``(loss, parts, None)``: ``loss`` is a leaf whose backward runs the chunked backward.
    """
    batch_norms = [name for name, module in model.named_modules() if isinstance(module, _BatchNorm) and module.training]
    if batch_norms:
        raise ValueError(
            f"embedding_chunk_size needs towers without BatchNorm in training mode (found {batch_norms[0]!r}): "
            "per-chunk batch statistics would change the loss and gradients. Freeze BatchNorm (module.eval()) "
            "or train without chunks."
        )
    batch_size = max(_rows(features, image=True), _rows(features, image=False))
    chunks = [slice(start, start + chunk_size) for start in range(0, batch_size, chunk_size)]
    device = next(iter(features.values())).device
    states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for rows in chunks:
            states.append(RandomState(device))
            image_embeds, text_embeds = _embed(model, _chunk(features, rows))
            image_parts += [image_embeds] if image_embeds is not None else []
            text_parts += [text_embeds] if text_embeds is not None else []
    image_embeds = torch.cat(image_parts).detach().requires_grad_()
    text_embeds = torch.cat(text_parts).detach().requires_grad_()
    with torch.enable_grad():
        loss_dict = loss_fn(image_embeds, text_embeds)
        loss_dict["loss"].backward()
    loss = loss_dict["loss"].detach().requires_grad_()
    loss.register_hook(
        partial(
            _chunked_backward,
            model=model,
            features=features,
            chunks=chunks,
            states=states,
            image_grad=image_embeds.grad,
            text_grad=text_embeds.grad,
            sync_gradients=sync_gradients,
        )
    )
    parts = {"loss_triplet": loss_dict["triplet"].detach(), "loss_kendall": loss_dict["kendall"].detach()}
    return loss, parts, None


def _chunked_backward(
    grad_output: torch.Tensor,
    model: nn.Module,
    features: dict[str, torch.Tensor],
    chunks: list[slice],
    states: list[RandomState],
    image_grad: torch.Tensor,
    text_grad: torch.Tensor,
    sync_gradients: bool,
) -> None:
    """Backward hook: re-embed each chunk with a graph and push the cached embedding gradients through it."""
    with torch.enable_grad():
        for rows, state in zip(chunks, states):
            with state.replay():
                image_embeds, text_embeds = _embed(model, _chunk(features, rows))
            surrogate = sum(
                (embeds * (grad[rows] * grad_output)).sum()
                for embeds, grad in ((image_embeds, image_grad), (text_embeds, text_grad))
                if embeds is not None
            )
            surrogate.backward()
    if sync_gradients and dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        for parameter in model.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad.div_(world_size)
