"""Cache of the pooled outputs of a locked image tower: each image goes through the tower once per training run.

With a locked vision tower (`freeze_tower(model.vision_model)`: no trainable parameter, every module in eval mode)
the pooled output ``f(x) = pool(vision_tower(x))`` is a fixed function of the pixels, so

    cache[(weights fingerprint, content digest of x)] = f(x)

returns the same values as running the tower; the projection ``W_v`` and the loss still run every step, so the
loss and every gradient are those of the uncached step. After every distinct image has been seen once (with
several captions per image, mostly within the first epoch) a step runs no image forward pass at all.

Keys:

- **content digest**: SHA-256 (first 16 bytes) of the row's `pixel_values` bytes, dtype and shape, so two images
  share an entry only when the tower would see the same input; the processor output of a JPEG is deterministic.
- **weights fingerprint**: SHA-256 of the tower's parameters and buffers, recomputed only when one of them changes
  (PyTorch's in-place version counter or storage), plus the vision pooling, the autocast state and the device.
  A new fingerprint empties the cache.

Several processes: every step, each process's new entries are all-gathered (one size exchange, then digests and
features only when some process had misses), so a process hits images another process embedded before; the calls
happen in `compute_loss`, in lockstep on all processes.

Random augmentation: the pixels of an augmented image differ at every epoch, so content keys never return a wrong
feature, but they never hit either and the cache would only grow. `BCLSTrainer` therefore **bypasses** the cache
(with a warning) when its collator has an `image_transform`; augmenting inside a custom dataset transform is safe
for the same reason (misses, never wrong values).

Memory: one row of `vision_embed_dim` values per distinct image on the training device (30,000 images of width
1280 in float32: 150 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..distributed import gather_no_grad, is_distributed, process_sizes
from ..fingerprint import weights_fingerprint
from .tower_freezing import is_tower_locked

logger = logging.getLogger(__name__)

DIGEST_BYTES = 16


def image_digests(pixel_values: torch.Tensor) -> list[bytes]:
    """Content digest of every row of `pixel_values` (dtype, shape and bytes)."""
    rows = pixel_values.detach()
    if rows.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        rows = rows.view(torch.int16)
    array = rows.cpu().contiguous().numpy()
    header = hashlib.sha256(f"{pixel_values.dtype}{tuple(pixel_values.shape[1:])}".encode())
    digests = []
    for row in array:
        digest = header.copy()
        digest.update(memoryview(row).cast("B"))  # no copy of the row
        digests.append(digest.digest()[:DIGEST_BYTES])
    return digests


def _state_versions(module: nn.Module) -> tuple:
    """Cheap change detector of a module's tensors: storage address and in-place version counter of each."""
    return tuple(
        (tensor.data_ptr(), tensor._version) for tensor in (*module.parameters(), *module.buffers())
    )


def _digests_to_tensor(digests: list[bytes], device: torch.device) -> torch.Tensor:
    array = np.frombuffer(b"".join(digests), dtype=np.int64).reshape(len(digests), DIGEST_BYTES // 8)
    return torch.from_numpy(array.copy()).to(device)


def _tensor_to_digests(tensor: torch.Tensor) -> list[bytes]:
    return [row.tobytes() for row in tensor.cpu().numpy()]


class LockedImageFeatureCache:
    """Pooled outputs of a locked vision tower, keyed by weights fingerprint and image content (module docstring).

    Counters: `tower_calls` (forward passes of the tower), `hits` and `misses` (rows), over the cache's life.
    """

    def __init__(self) -> None:
        self._rows: dict[bytes, torch.Tensor] = {}
        self._versions: tuple | None = None
        self._fingerprint: str | None = None
        self._context: tuple | None = None
        self.tower_calls = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def _check_context(self, model: nn.Module, device: torch.device) -> None:
        tower = model.vision_model
        versions = _state_versions(tower)
        if versions != self._versions:
            self._fingerprint = weights_fingerprint(tower)
            self._versions = versions
        autocast = (
            (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
            if device.type in ("cpu", "cuda")
            else (False, None)
        )
        context = (self._fingerprint, model.config.vision_pooling, autocast, str(device))
        if context != self._context:
            if self._rows:
                logger.info("locked image cache: the tower, its pooling or the precision changed; emptying it")
            self._rows.clear()
            self._context = context

    def pooled_features(
        self,
        model: nn.Module,
        pixel_values: torch.Tensor,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> torch.Tensor:
        """`model._pool_image(pixel_values)` ([B, vision_embed_dim], no graph), from the cache where possible.

        Args:
            model: the unwrapped [`BCLSModel`]; its vision tower must be locked (`is_tower_locked`).
            pixel_values: the batch's images, [B, C, H, W].
            autocast: factory of the precision context the model's forward runs in (e.g. `accelerator.autocast`),
                so that cached features equal those of the uncached forward.

        Entries are kept in float32 (an exact upcast of the tower's output) and returned in the projection's dtype,
        which is what the projection computes with in the uncached forward too. With several processes this is a
        collective: every process must call it at the same step.
        """
        if not is_tower_locked(model.vision_model):
            raise ValueError(
                "The locked-image cache needs a locked vision tower (no trainable parameter, every module in eval "
                "mode): use trainer_bcls.training.tower_freezing.freeze_tower(model.vision_model)."
            )
        device = pixel_values.device
        with autocast():
            self._check_context(model, device)
            digests = image_digests(pixel_values)
            missing: dict[bytes, int] = {}  # digest -> first row with it
            for row, digest in enumerate(digests):
                if digest not in self._rows and digest not in missing:
                    missing[digest] = row
            new_features = pixel_values.new_zeros((0, model.vision_embed_dim), dtype=torch.float32)
            if missing:
                with torch.no_grad():
                    new_features = model._pool_image(pixel_values[list(missing.values())]).detach().float()
                self.tower_calls += 1
        num_missed = sum(1 for digest in digests if digest in missing)
        self.misses += num_missed
        self.hits += len(digests) - num_missed
        self._rows.update(zip(missing, new_features))
        if is_distributed():
            self._share(list(missing), new_features, device)
        return torch.stack([self._rows[digest] for digest in digests])  # float32; the model casts to its projection

    def _share(self, digests: list[bytes], features: torch.Tensor, device: torch.device) -> None:
        """All-gather every process's new entries (float32 [n, width]) into this process's cache."""
        sizes = process_sizes(len(digests), device)
        if max(sizes) == 0:
            return
        keys = gather_no_grad(_digests_to_tensor(digests, device), sizes)
        values = gather_no_grad(features.contiguous(), sizes)
        self._rows.update(zip(_tensor_to_digests(keys), values))


__all__ = ["LockedImageFeatureCache", "image_digests"]
