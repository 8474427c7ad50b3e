"""Element-wise diffusion losses and the Huber threshold schedule (pure functions).

`loss_type` follows kohya (train_util.conditional_loss), where "huber" and "smooth_l1" are
the pseudo-Huber forms of Khrapov & Popov, "Improving Diffusion Models's Data-Corruption
Resistance using Scheduled Pseudo-Huber Loss" (arXiv:2403.16728), with d = pred - target:

    l2         d^2
    l1         |d|
    huber      2 c (sqrt(d^2 + c^2) - c)      ~ d^2 near 0, ~ 2 c |d| far out
    smooth_l1  2 (sqrt(d^2 + c^2) - c)        the same divided by c

The threshold c depends on the timestep through `huber_schedule` (kohya's
get_huber_threshold): constant c * scale; exponential scale * exp(ln(c) * t / T), from
`scale` at t = 0 to c * scale at t = T; snr (1 - c) / (1 + sigma_t)^2 + c with
sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t), near 1 for clean timesteps
and c for noisy ones (huber_scale does not enter, as in kohya).
"""
from __future__ import annotations

import math

import torch

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def huber_threshold(schedule: str, c: float, scale: float, timesteps: torch.Tensor,
                    num_train_timesteps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample threshold c_t, shape (batch,), float32 on the timesteps' device."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, c * scale)
    if schedule == "exponential":
        return torch.exp(math.log(c) * t / num_train_timesteps) * scale
    if schedule == "snr":
        a = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = torch.sqrt((1.0 - a) / a)
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    raise ValueError(f"huber_schedule {schedule!r} is unknown; valid: "
                     f"{', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per element in fp32, same shape as pred; huber_c has one value per sample."""
    d = pred.float() - target.float()
    if loss_type == "l2":
        return d * d
    if loss_type == "l1":
        return d.abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs a threshold (huber_c)")
        c = huber_c.float().view(-1, *([1] * (d.dim() - 1)))
        # sqrt(d^2 + c^2) - c, written so float32 keeps its precision for small d
        soft = d * d / (torch.sqrt(d * d + c * c) + c)
        return 2.0 * c * soft if loss_type == "huber" else 2.0 * soft
    raise ValueError(f"loss_type {loss_type!r} is unknown; valid: {', '.join(LOSS_TYPES)}")


def reduce_per_sample(loss: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return loss.mean(dim=list(range(1, loss.dim())))
