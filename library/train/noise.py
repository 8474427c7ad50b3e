"""Noise, timesteps, targets and loss weights of one diffusion training step (pure functions).

Formulas: offset noise (Guttenberg, "Diffusion with offset noise", 2023) adds a per-channel
constant; min-SNR weighting (Hang et al., arXiv:2303.09556) is min(SNR, gamma)/SNR for
epsilon targets and min(SNR, gamma)/(SNR + 1) for v-prediction targets.
"""
from __future__ import annotations

import torch


def make_noise(latents: torch.Tensor, noise_offset: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device,
                        dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator,
                                                   device=latents.device, dtype=latents.dtype)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator,
                         device=device).long()


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weight(alphas_cumprod, timesteps, gamma: float, v_prediction: bool) -> torch.Tensor:
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if v_prediction else clipped / s


def training_target(scheduler, latents, noise, timesteps, v_prediction: bool) -> torch.Tensor:
    return scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32."""
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none") \
        .mean(dim=list(range(1, pred.dim())))
