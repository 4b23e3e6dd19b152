"""Train-time image augmentation with PIL only (no torchvision): random resized crop + optional horizontal flip.

Off by default in :class:`~trainer_bcls.training.collator.BCLSDataCollator`. Careful with captions that describe
positions: a horizontal flip turns "a red circle on the left" into a wrong caption (the synthetic data says left/
right everywhere, hence ``flip_prob=0.0`` by default), and a tight crop can cut out a shape a caption mentions.
Randomness comes from torch's global RNG, which DataLoader seeds differently in every worker.
"""

from __future__ import annotations

import math

import PIL.Image
import torch


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


class RandomResizedCropFlip:
    """Crop a random box covering ``scale`` of the area with aspect ratio in ``ratio``, resize it to ``size``
    (default: the input size), then flip left-right with probability ``flip_prob``. Picklable."""

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.0,
    ):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size = (size, size) if isinstance(size, int) else size
        self.scale, self.ratio, self.flip_prob = tuple(scale), tuple(ratio), flip_prob

    def _box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x = int(torch.randint(0, width - w + 1, ()).item())
                y = int(torch.randint(0, height - h + 1, ()).item())
                return x, y, x + w, y + h
        return 0, 0, width, height

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        size = self.size or image.size
        image = image.resize(size, resample=PIL.Image.Resampling.BICUBIC, box=self._box(*image.size))
        if self.flip_prob > 0 and torch.rand(()).item() < self.flip_prob:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_prob={self.flip_prob})"
