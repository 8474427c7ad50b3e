"""Training timesteps drawn from a chosen distribution (`timestep_sampling`, docs/TRAINING.md).

Every distribution first draws a fraction u in [0, 1) per sample, then maps it onto the integer
timesteps of the window [min_timestep, max_timestep) (defaults 0 and T = 1000):

    t = min_timestep + floor(u * (max_timestep - min_timestep))

so the shape of the distribution is kept and squeezed into the window, as sd-scripts' SD3
script does (sd3_train_utils.get_noisy_model_input_and_timesteps). A larger u is a noisier
timestep. The distributions:

- uniform: integer timesteps drawn uniformly in the window (the default, unchanged).
- logit_normal: u = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al., "Scaling
  Rectified Flow Transformers", arXiv:2403.03206, SD3; diffusers'
  compute_density_for_timestep_sampling). Favours the middle timesteps.
- mode: u = 1 - r - mode_scale * (cos^2(pi r / 2) - 1 + r), r ~ U(0, 1) (same paper, "mode
  sampling with heavy tails"; diffusers' function again).
- sigmoid: u = sigmoid(sigmoid_scale * n), n ~ N(0, 1) (sd-scripts' FLUX `timestep_sampling =
  "sigmoid"`, from x-flux). sigmoid_scale 1 equals logit_normal(0, 1).
- shift: the sigmoid draw, then u' = s u / (1 + (s - 1) u) with s = discrete_flow_shift
  (sd-scripts' `"shift"`): s > 1 moves the draws towards the noisy end, s < 1 towards the
  clean end.
- cosmap: u = 1 - 1 / (tan(pi r / 2) + 1), r ~ U(0, 1): the SD3 paper's "CosMap", whose
  density 2 / (pi (1 - 2u + 2u^2)) is the weight diffusers' compute_loss_weighting_for_sd3
  puts on uniform draws for "cosmap"; here the timesteps are drawn from it instead.

These come from flow-matching models, where u is the noise level itself. On the DDPM
schedule of SD1.5 / SDXL u is the timestep's position in the window, not its noise level:
the shapes carry over, the meaning of a given u does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from library.train import noise as N

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "sigmoid", "shift", "cosmap")


@dataclass(frozen=True)
class TimestepSampling:
    """The distribution and its parameters (the [training] keys of the same names)."""
    name: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    shift: float = 3.0

    @classmethod
    def from_config(cls, training) -> "TimestepSampling":
        """From the [training] keys (`discrete_flow_shift` is the shift)."""
        return cls(training.timestep_sampling, training.logit_mean, training.logit_std,
                   training.mode_scale, training.sigmoid_scale, training.discrete_flow_shift)


def sample_fraction(n: int, s: TimestepSampling, device="cpu",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """n fractions u in [0, 1] drawn from the distribution `s.name` (float32)."""
    if s.name in ("logit_normal", "mode"):
        from diffusers.training_utils import compute_density_for_timestep_sampling
        return compute_density_for_timestep_sampling(
            s.name, n, logit_mean=s.logit_mean, logit_std=s.logit_std,
            mode_scale=s.mode_scale, device=device, generator=generator).float()
    if s.name in ("sigmoid", "shift"):
        u = torch.sigmoid(s.sigmoid_scale * torch.randn(n, generator=generator,
                                                         device=device))
        return u if s.name == "sigmoid" else u * s.shift / (1 + (s.shift - 1) * u)
    r = torch.rand(n, generator=generator, device=device)
    if s.name == "cosmap":
        return 1 - 1 / (torch.tan(math.pi / 2 * r) + 1)
    if s.name == "uniform":
        return r
    raise ValueError(f"timestep_sampling {s.name!r} is unknown; valid: "
                     f"{', '.join(TIMESTEP_SAMPLINGS)}")


def sample_timesteps(batch: int, num_train_timesteps: int, device,
                     generator: torch.Generator | None = None, *,
                     sampling: TimestepSampling = TimestepSampling(),
                     min_timestep: int | None = None,
                     max_timestep: int | None = None) -> torch.Tensor:
    """Integer timesteps (long) in [min_timestep, max_timestep); see the module docstring."""
    if sampling.name == "uniform":  # the exact draws of earlier versions
        return N.sample_timesteps(batch, num_train_timesteps, device, generator,
                                  min_timestep=min_timestep, max_timestep=max_timestep)
    lo = 0 if min_timestep is None else min_timestep
    hi = num_train_timesteps if max_timestep is None else max_timestep
    if lo >= hi:
        return torch.full((batch,), min(lo, num_train_timesteps - 1), device=device,
                          dtype=torch.long)
    u = sample_fraction(batch, sampling, device, generator)
    return torch.clamp(lo + (u * (hi - lo)).long(), min=lo, max=hi - 1)
