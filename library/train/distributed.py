"""Data-parallel helpers (accelerate launch --num_processes N): each process trains a slice
of every global batch and the LoRA gradients are averaged explicitly at each optimizer step.

The LoRA modules are called through the base modules' forward, not through a DDP wrapper,
so gradients are averaged here instead of by DDP hooks. Only LoRA gradients travel (a few MB).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """Contiguous, as-even-as-possible slice of one global batch for this process."""
    n = len(batch)
    lo = rank * n // world
    hi = (rank + 1) * n // world
    return batch[lo:hi]


def loss_share(n_local: int, n_global: int, world: int) -> float:
    """Factor that makes the average of per-process mean losses equal the global mean."""
    return n_local * world / n_global if n_global else 0.0


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    if world <= 1 or not dist.is_available() or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
