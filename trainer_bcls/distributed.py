"""Cross-process gathers for the global-batch BCLS loss (open_clip's ``gather_features`` pattern).

With ``W`` processes, process ``r`` holds ``B_r`` pairs. Each process scores its *local* queries against the
*global* candidates (``local_loss`` in open_clip), with candidates gathered **with gradients**
(``torch.distributed.nn.functional.all_gather``, whose backward sums the candidate gradients of every process
back to their owner). A direction's loss is normalised by the global number of terms and multiplied by ``W``::

    L_r = W · Σ_{terms of r's queries} φ / N_global

so that DDP's gradient average ``(1/W) Σ_r ∇L_r`` equals the gradient of the single-process loss on the
concatenated batch, and so does the mean of the logged ``L_r``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _pad_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    if tensor.shape[0] == length:
        return tensor
    pad = tensor.new_zeros((length - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def process_sizes(local_size: int, device: torch.device | None = None) -> list[int]:
    """The number of rows of every process (one small all-gather; compute it once per step and pass it on)."""
    if not is_distributed():
        return [local_size]
    size = torch.tensor([local_size], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` (first dim may differ per process) from all processes, keeping gradients.

    The backward of the gather sums, for every process's slice, the gradients computed on all processes, so
    candidates receive the gradient of the queries of every process.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    sizes = sizes or process_sizes(tensor.shape[0], tensor.device)
    padded = _pad_to(tensor, max(sizes))
    gathered = all_gather(padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)


def gather_no_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes, without gradients (ids, labels)."""
    if not is_distributed():
        return tensor
    sizes = sizes or process_sizes(tensor.shape[0], tensor.device)
    padded = _pad_to(tensor.contiguous(), max(sizes))
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)


def local_offset(sizes: list[int]) -> int:
    """Index of this process's first row in the gathered (concatenated) batch, from `process_sizes`."""
    return sum(sizes[: dist.get_rank()]) if is_distributed() else 0


def global_count(count: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) term count over all processes."""
    if not is_distributed():
        return count
    count = count.detach().clone().to(torch.float64)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return count
