"""Where inference runs: the default device (CUDA, else Apple MPS, else CPU) and an optional bf16 cast.

`evaluation.encode_images` / `encode_texts` move every batch to `model.device` and cast pixel values to
`model.dtype`, so placing the model is all a script has to do.
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """`cuda` when available, else `mps` when available, else `cpu`."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a `torch.device` (`None` or `"auto"`: [`default_device`]); an unavailable backend is an error."""
    if device is None or device == "auto":
        return default_device()
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    if resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available (use --device cpu)")
    return resolved


def prepare_for_inference(model: torch.nn.Module, device: str | torch.device | None = None, bf16: bool = False):
    """Move `model` to `device` (default: [`default_device`]), cast its weights to bfloat16 when `bf16`, eval mode.

    Under bf16 the towers and projections run in bfloat16; the model's embeddings are still L2-normalised and
    returned in float32.
    """
    resolved = resolve_device(device)
    if bf16 and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 requested but {torch.cuda.get_device_name(resolved)} does not support bfloat16")
    model = model.to(resolved)
    if bf16:
        model = model.to(torch.bfloat16)
    return model.eval()
