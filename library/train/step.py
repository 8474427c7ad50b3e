"""The diffusion loss of one batch: noise, timesteps, UNet prediction, weighted loss.

Shared by train_network.py and the GPU benchmark, so the benchmark times the real step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from library.train import loss as L
from library.train import noise as N
from library.train import preservation as P
from library.train import timesteps as T


@dataclass(frozen=True)
class LossSettings:
    """The [training] noise and loss keys (docs/TRAINING.md), read once per run."""
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    v_prediction: bool = False
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    sampling: T.TimestepSampling = T.TimestepSampling()

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        tr = cfg.training
        return cls(tr.noise_offset, tr.min_snr_gamma, cfg.model.v_parameterization,
                   **{f.name: getattr(tr, f.name) for f in fields(cls) if f.name not in
                      ("noise_offset", "min_snr_gamma", "v_prediction", "sampling")},
                   sampling=T.TimestepSampling.from_config(tr))


def noisy_latents(scheduler, latents: torch.Tensor, s: LossSettings):
    """(noise, noisy latents, timesteps) of one batch."""
    noise = N.make_noise(latents, s.noise_offset, random_strength=s.noise_offset_random_strength,
                         adaptive_scale=s.adaptive_noise_scale,
                         multires_iterations=s.multires_noise_iterations,
                         multires_discount=s.multires_noise_discount)
    t = T.sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps,
                           latents.device, sampling=s.sampling, min_timestep=s.min_timestep,
                           max_timestep=s.max_timestep)
    seen = N.perturbed_noise(noise, s.ip_noise_gamma, s.ip_noise_gamma_random_strength) \
        if s.ip_noise_gamma else noise
    return noise, scheduler.add_noise(latents, seen, t), t


def seeded_noisy_latents(scheduler, latents: torch.Tensor, s: LossSettings, seeds):
    """`noisy_latents` with each sample's randomness drawn from its own seed (the data plan's
    `sample_seed`), leaving the global RNG untouched; plain `noisy_latents` without seeds."""
    if seeds is None:
        return noisy_latents(scheduler, latents, s)
    devices = [latents.device] if latents.device.type == "cuda" else []
    parts = []
    for i, seed in enumerate(seeds.tolist()):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            parts.append(noisy_latents(scheduler, latents[i:i + 1], s))
    return tuple(torch.cat(p) for p in zip(*parts))


def timestep_weight(scheduler, t: torch.Tensor, s: LossSettings) -> torch.Tensor | float:
    """Product of the SNR-based per-sample weights in kohya's order (min-SNR, v-scale,
    debiased); 1.0 when none is on."""
    weight: torch.Tensor | float = 1.0
    a = scheduler.alphas_cumprod
    if s.min_snr_gamma:
        weight = weight * N.min_snr_weight(a, t, s.min_snr_gamma, s.v_prediction)
    if s.scale_v_pred_loss_like_noise_pred:
        weight = weight * N.v_pred_scale_weight(a, t)
    if s.debiased_estimation_loss:
        weight = weight * N.debiased_weight(a, t)
    return weight


# Batch entries read on the host (seeds for the per-sample RNG): they stay on the CPU.
HOST_KEYS = frozenset({"sample_seed"})


def batch_to_device(batch: dict, device, pin_memory: bool = False) -> dict:
    """The batch's tensors on `device` (those in HOST_KEYS stay). On CUDA with `pin_memory`
    they are copied into page-locked memory first and sent with non_blocking copies: the
    host queues them and goes on, where a copy from ordinary memory makes the host wait
    until the GPU has finished everything queued before it (a sync per tensor and step).
    The page-locked buffers are torch's cached host allocations; torch keeps each one until
    its copy is done."""
    device = torch.device(device)
    fast = pin_memory and device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k not in HOST_KEYS and v.device != device:
            v = v.pin_memory().to(device, non_blocking=True) if fast and v.device.type == "cpu" \
                else v.to(device)
        out[k] = v
    return out


def set_batch_multiplier(network, batch: dict) -> None:
    """The LoRA multiplier of this batch's dataset (kohya's per-dataset `network_multiplier`;
    1.0 otherwise): 0 trains the batch on the base model alone, so the LoRA gets no
    gradient from it."""
    network.set_multiplier(float(batch.get("network_multiplier", 1.0)))


def diffusion_loss(unet, family, scheduler, latents: torch.Tensor, cond: dict, batch: dict,
                   s: LossSettings, *, weight_dtype: torch.dtype = torch.float32,
                   autocast=contextlib.nullcontext, preservation=None) -> torch.Tensor:
    """Mean weighted loss of one batch; `batch["loss_weight"]` holds per-sample weights and
    the optional `batch["alpha_mask"]` per-pixel weights at latent resolution. With
    `preservation` (library/train/preservation.py) the preservation loss is added."""
    latents = latents.to(weight_dtype)
    noise, noisy, t = seeded_noisy_latents(scheduler, latents, s, batch.get("sample_seed"))

    def call(x, steps, c, b):
        with autocast():
            return unet(x, steps, c["encoder_hidden_states"].to(weight_dtype),
                        **family.unet_inputs(c, b)).sample

    if preservation is None:
        pred = call(noisy, t, cond, batch)
    else:  # captions and class prompts in one forward and backward, the base without grad
        mine, base = preservation.class_cond(batch["captions"])
        base_pred = preservation.base_prediction(call, noisy, t, base, batch)
        pred, pred_class = call(torch.cat([noisy, noisy]), torch.cat([t, t]),
                                P.joined(cond, mine), P.doubled(batch, HOST_KEYS)).chunk(2)
    target = N.training_target(scheduler, latents, noise, t, s.v_prediction)
    huber_c = L.huber_threshold(s.huber_schedule, s.huber_c, s.huber_scale, t,
                                scheduler.config.num_train_timesteps, scheduler.alphas_cumprod) \
        if s.loss_type in ("huber", "smooth_l1") else None
    loss = L.elementwise_loss(pred, target, s.loss_type, huber_c)
    if batch.get("alpha_mask") is not None:
        # alpha_mask (kohya's masked loss): (B, 1, h, w) at latent size; transparent pixels
        # add zero, the mean stays over all pixels (not renormalised by the mask's area).
        loss = loss * batch["alpha_mask"].to(loss.device, loss.dtype)
    t_weight = timestep_weight(scheduler, t, s)
    weight = batch["loss_weight"].to(latents.device) * t_weight
    total = (L.reduce_per_sample(loss) * weight).mean()
    if preservation is not None:
        keep = L.elementwise_loss(pred_class, base_pred, s.loss_type, huber_c)
        total = total + preservation.weight * (L.reduce_per_sample(keep) * t_weight).mean()
    return total
