"""The diffusion loss of one batch: noise, timesteps, UNet prediction, weighted loss.

Shared by train_network.py and the GPU benchmark, so the benchmark times the real step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from library.train import noise as N


@dataclass(frozen=True)
class LossSettings:
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    v_prediction: bool = False

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        return cls(cfg.training.noise_offset, cfg.training.min_snr_gamma,
                   cfg.model.v_parameterization)


def diffusion_loss(unet, family, scheduler, latents: torch.Tensor, cond: dict, batch: dict,
                   s: LossSettings, *, weight_dtype: torch.dtype = torch.float32,
                   autocast=contextlib.nullcontext) -> torch.Tensor:
    """Mean weighted loss of one batch; `batch["loss_weight"]` holds per-sample weights."""
    latents = latents.to(weight_dtype)
    noise = N.make_noise(latents, s.noise_offset)
    t = N.sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps,
                           latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    with autocast():
        pred = unet(noisy, t, cond["encoder_hidden_states"].to(weight_dtype),
                    **family.unet_inputs(cond, batch)).sample
    target = N.training_target(scheduler, latents, noise, t, s.v_prediction)
    weight = batch["loss_weight"].to(latents.device)
    if s.min_snr_gamma:
        weight = weight * N.min_snr_weight(scheduler.alphas_cumprod, t, s.min_snr_gamma,
                                           s.v_prediction)
    return (N.per_sample_loss(pred, target) * weight).mean()
