"""Cross-rank helpers of the losses and of the contrastive BatchNorm: the model computes global-batch objectives
itself, so a plain `Trainer` under DDP gets the single-process gradient of the concatenated batch."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """`(rank, world_size)`, `(0, 1)` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (its backward sums the gradients over ranks)."""
    from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

    with warnings.catch_warnings():  # deprecated for _functional_collectives, whose all_reduce has no backward
        warnings.simplefilter("ignore", FutureWarning)
        return differentiable_all_reduce(tensor)


def _pad_dim(tensor: torch.Tensor, dim: int, size: int, value) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_full(pad_shape, value)], dim=dim)


def gather_batch(tensor: torch.Tensor, with_grad: bool, pad_value=0, pad_dims: tuple[int, ...] = ()) -> tuple:
    """Concatenates `tensor` (`(local_batch, ...)`) from all ranks along dim 0, in rank order.

    Ranks may hold different batch sizes (the last batch) and, along `pad_dims`, different lengths (genes, tokens):
    both are padded with `pad_value` before gathering and the batch padding is dropped after.
    With `with_grad`, gradients flow back to every rank's local slice through
    `torch.distributed.nn.functional.all_gather` (its backward sums the gradients that all ranks computed for a slice;
    DDP's gradient averaging then divides by the world size, so each rank computing the *global* loss gives exactly
    the single-process gradient: open_clip's `gather_features(local_loss=False, gather_with_grad=True)`).

    Returns:
        `(gathered, offset)`: `gathered` of shape `(global_batch, ...)` and the local slice's start in it.
    """
    rank, world_size = world()
    if world_size == 1:
        return tensor, 0
    sizes = torch.tensor([tensor.shape[0], *(tensor.shape[d] for d in pad_dims)], device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size)]
    dist.all_gather(all_sizes, sizes)
    all_sizes = torch.stack(all_sizes).tolist()
    padded = _pad_dim(tensor, 0, max(s[0] for s in all_sizes), pad_value)
    for i, d in enumerate(pad_dims, start=1):
        padded = _pad_dim(padded, d, max(s[i] for s in all_sizes), pad_value)
    if with_grad:
        import torch.distributed.nn.functional as dist_nn

        # deprecated for _functional_collectives, whose backward needs reduce_scatter (not in gloo)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_nn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded.contiguous())
    gathered = torch.cat([part[: s[0]] for part, s in zip(parts, all_sizes)])
    return gathered, sum(s[0] for s in all_sizes[:rank])


__all__ = ["all_reduce_sum", "gather_batch", "world"]
