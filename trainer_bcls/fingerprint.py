"""A content fingerprint of a module's weights: what a cache or an index was computed with."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(module: torch.nn.Module) -> str:
    """`sha256:<hex>` of every state-dict tensor (name, dtype, shape, bytes), in name order.

    Any change of a weight, a persistent buffer (BatchNorm statistics), a dtype or a shape changes it. Compute it on
    the weights as loaded, before a bf16 cast, when the fingerprint must name the checkpoint.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return f"sha256:{digest.hexdigest()}"
