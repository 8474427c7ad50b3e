"""Noise, timesteps, targets and loss weights of one diffusion training step (pure functions).

Everything here stays on the latents' device and never reads a value back to the host, so
the step keeps the GPU queue full. Formulas and references:

- offset noise (Guttenberg, "Diffusion with offset noise", 2023): noise + o * n_bc, with one
  normal draw n_bc per sample and channel; kohya's `adaptive_noise_scale` adds
  s * |mean_c(latents)| to o, and `noise_offset_random_strength` draws o ~ U(0, o).
- multires (pyramid) noise (J. Whitaker, "Multi-Resolution Noise for Diffusion Model
  Training", 2023): noise + sum over i < iterations of discount^i * upsample(normal noise
  at 1/r^i the size), r ~ U(2, 4) per level, then divided by its std.
- input perturbation (Ning et al., arXiv:2301.11706): the UNet sees x_t built from
  noise + gamma * n' while the target keeps `noise`.
- min-SNR weighting (Hang et al., arXiv:2303.09556): min(SNR, gamma) / SNR for epsilon
  targets, min(SNR, gamma) / (SNR + 1) for v targets.
- debiased estimation (Yu et al., arXiv:2310.08442): weight 1 / sqrt(SNR).
- zero terminal SNR (Lin et al., arXiv:2305.08891): rescaled betas so alphas_cumprod[-1] = 0;
  meant for v-prediction (with epsilon targets the last timestep carries no signal).
"""
from __future__ import annotations

import torch

# kohya caps the SNR at 1000 in its v-scale and debiased weights (t = 0 is nearly noise-free).
SNR_CAP = 1000.0
# A floor for the debiased weight: with zero terminal SNR, 1/sqrt(0) would be infinite.
SNR_FLOOR = 1e-3


def _cpu_generator(generator):
    return generator if generator is not None and generator.device.type == "cpu" else None


def _randn(shape, like: torch.Tensor, generator=None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def offset_noise(latents: torch.Tensor, noise: torch.Tensor, offset: float, *,
                 random_strength: bool = False, adaptive_scale: float | None = None,
                 generator=None) -> torch.Tensor:
    b, c = latents.shape[:2]
    strength: torch.Tensor | float = offset
    if random_strength:
        strength = torch.rand(1, generator=generator, device=latents.device,
                              dtype=latents.dtype) * offset
    if adaptive_scale is not None:
        mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * mean, min=0.0)
    return noise + strength * _randn((b, c, 1, 1), latents, generator)


def multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                   generator=None) -> torch.Tensor:
    b, c, h, w = noise.shape
    out = noise.clone()
    scale_gen = _cpu_generator(generator)
    for i in range(iterations):  # i = 0 adds a second full-size draw, as kohya does
        # The scale factor is drawn on the CPU: a host-side float, no device sync.
        r = 2.0 + 2.0 * float(torch.rand((), generator=scale_gen))
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        low = _randn((b, c, hn, wn), noise, generator)
        out = out + torch.nn.functional.interpolate(
            low.float(), size=(h, w), mode="bilinear").to(noise.dtype) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def make_noise(latents: torch.Tensor, noise_offset: float = 0.0,
               generator: torch.Generator | None = None, *, random_strength: bool = False,
               adaptive_scale: float | None = None, multires_iterations: int = 0,
               multires_discount: float = 0.3) -> torch.Tensor:
    """Training noise: normal, then offset noise, then multires noise (kohya's order)."""
    noise = _randn(latents.shape, latents, generator)
    if noise_offset:
        noise = offset_noise(latents, noise, noise_offset, random_strength=random_strength,
                             adaptive_scale=adaptive_scale, generator=generator)
    if multires_iterations:
        noise = multires_noise(noise, multires_iterations, multires_discount, generator)
    return noise


def perturbed_noise(noise: torch.Tensor, gamma: float, random_strength: bool = False,
                    generator=None) -> torch.Tensor:
    """The noise that builds x_t under input perturbation; the target keeps `noise`."""
    strength: torch.Tensor | float = gamma
    if random_strength:
        strength = torch.rand(1, generator=generator, device=noise.device,
                              dtype=noise.dtype) * gamma
    return noise + strength * _randn(noise.shape, noise, generator)


def sample_timesteps(batch: int, num_train_timesteps: int, device,
                     generator: torch.Generator | None = None, *,
                     min_timestep: int | None = None,
                     max_timestep: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep) (defaults 0 and T);
    min == max trains that one timestep (kohya)."""
    lo = 0 if min_timestep is None else min_timestep
    hi = num_train_timesteps if max_timestep is None else max_timestep
    if lo >= hi:
        return torch.full((batch,), min(lo, num_train_timesteps - 1), device=device,
                          dtype=torch.long)
    return torch.randint(lo, hi, (batch,), generator=generator, device=device).long()


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weight(alphas_cumprod, timesteps, gamma: float, v_prediction: bool) -> torch.Tensor:
    s = snr(alphas_cumprod, timesteps)
    if v_prediction:
        return torch.clamp(s, max=gamma) / (s + 1.0)
    # min(SNR, gamma) / SNR written as min(1, gamma / SNR): finite at SNR = 0 (zero terminal SNR)
    return torch.clamp(gamma / s, max=1.0)


def v_pred_scale_weight(alphas_cumprod, timesteps) -> torch.Tensor:
    """SNR / (SNR + 1): a v-prediction loss scaled like an epsilon-prediction loss."""
    s = torch.clamp(snr(alphas_cumprod, timesteps), max=SNR_CAP)
    return s / (s + 1.0)


def debiased_weight(alphas_cumprod, timesteps) -> torch.Tensor:
    s = torch.clamp(snr(alphas_cumprod, timesteps), min=SNR_FLOOR, max=SNR_CAP)
    return 1.0 / torch.sqrt(s)


def apply_zero_terminal_snr(scheduler) -> None:
    """Rescale the noise scheduler's betas in place so the last timestep is pure noise."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    betas = rescale_zero_terminal_snr(scheduler.betas.double()).to(scheduler.betas.dtype)
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


def training_target(scheduler, latents, noise, timesteps, v_prediction: bool) -> torch.Tensor:
    return scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32."""
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none") \
        .mean(dim=list(range(1, pred.dim())))
