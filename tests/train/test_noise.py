"""Noise, timesteps and SNR weights against their formulas and statistics."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from library.train import noise as N
from library.train.step import LossSettings, noisy_latents
from tools.make_tiny_model import SCHEDULER_COMMON


@pytest.fixture
def sched():
    """The SD1.5 / SDXL training noise schedule."""
    return DDPMScheduler(**SCHEDULER_COMMON)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _channel_mean_var(noise):
    return float(noise.mean(dim=(2, 3)).var())


# ---- SNR weights ----------------------------------------------------------------------------
TS = [0, 1, 100, 400, 700, 999]


def _snr64(sched, t):
    a = float(sched.alphas_cumprod.double()[t])
    return a / (1 - a)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_weight_matches_the_formula(sched, gamma, v_prediction):
    got = N.min_snr_weight(sched.alphas_cumprod, torch.tensor(TS), gamma, v_prediction)
    for w, t in zip(got.tolist(), TS):
        s = _snr64(sched, t)
        expected = min(s, gamma) / (s + 1 if v_prediction else s)
        assert w == pytest.approx(expected, rel=1e-4), t


def test_debiased_and_v_scale_weights_match_the_formulas(sched):
    t = torch.tensor(TS)
    debiased = N.debiased_weight(sched.alphas_cumprod, t).tolist()
    vscale = N.v_pred_scale_weight(sched.alphas_cumprod, t).tolist()
    for d, v, step in zip(debiased, vscale, TS):
        s = min(_snr64(sched, step), 1000.0)     # kohya caps the SNR at 1000
        assert d == pytest.approx(1 / math.sqrt(s), rel=1e-4)
        assert v == pytest.approx(s / (s + 1), rel=1e-4)
    assert debiased[0] == pytest.approx(1 / math.sqrt(1000))   # t = 0 hits the cap


# ---- noise ------------------------------------------------------------------------------------
def test_offset_noise_adds_offset_squared_to_the_channel_mean_variance():
    latents = torch.zeros(256, 4, 32, 32)
    plain = _channel_mean_var(N.make_noise(latents, 0.0, _gen(1)))
    offset = _channel_mean_var(N.make_noise(latents, 0.5, _gen(1)))
    assert plain == pytest.approx(1 / 1024, rel=0.15)          # mean of 32*32 normals
    assert offset - plain == pytest.approx(0.25, rel=0.15)


def test_random_strength_offset_averages_a_third_of_offset_squared():
    latents = torch.zeros(4, 4, 8, 8)
    g = _gen(2)
    extra = [_channel_mean_var(N.make_noise(latents, 1.0, g, random_strength=True))
             for _ in range(400)]
    # strength ~ U(0, 1): E[strength^2] = 1/3, plus 1/64 from the 8x8 normal draws
    assert sum(extra) / len(extra) - 1 / 64 == pytest.approx(1 / 3, rel=0.2)


@pytest.mark.parametrize("scale, expected_offset", [(0.5, 0.1 + 0.5 * 2.0), (-1.0, 0.0)])
def test_adaptive_noise_scale_follows_the_latent_channel_means(scale, expected_offset):
    latents = torch.full((256, 4, 32, 32), -2.0)      # |channel mean| = 2
    plain = _channel_mean_var(N.make_noise(latents, 0.0, _gen(3)))
    noise = N.make_noise(latents, 0.1, _gen(3), adaptive_scale=scale)
    assert _channel_mean_var(noise) - plain == pytest.approx(expected_offset ** 2, rel=0.15,
                                                             abs=1e-6)


def test_multires_noise_is_normalised_and_lower_frequency():
    latents = torch.zeros(16, 4, 64, 64)
    plain = N.make_noise(latents, 0.0, _gen(4))
    for discount in (0.3, 0.8):
        pyramid = N.make_noise(latents, 0.0, _gen(4), multires_iterations=6,
                               multires_discount=discount)
        assert pyramid.shape == latents.shape
        assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-5)
    # the coarse levels put more energy into each channel's mean than white noise has
    assert _channel_mean_var(pyramid) > 10 * _channel_mean_var(plain)


def test_ip_noise_changes_the_noisy_latents_only(sched):
    latents = torch.randn(4, 4, 8, 8, generator=_gen(5))
    torch.manual_seed(7)
    noise_a, noisy_a, t_a = noisy_latents(sched, latents, LossSettings())
    torch.manual_seed(7)
    noise_b, noisy_b, t_b = noisy_latents(sched, latents, LossSettings(ip_noise_gamma=0.1))
    assert torch.equal(noise_a, noise_b) and torch.equal(t_a, t_b)   # same target
    assert not torch.allclose(noisy_a, noisy_b)
    # the perturbation is gamma * n' scaled like the noise: sqrt(1 - alphas_cumprod_t)
    diff = (noisy_b - noisy_a) / (1 - sched.alphas_cumprod[t_b]).sqrt().view(-1, 1, 1, 1)
    assert float(diff.std()) == pytest.approx(0.1, rel=0.2)


# ---- timesteps -----------------------------------------------------------------------------
def test_timestep_bounds_are_respected():
    t = N.sample_timesteps(20000, 1000, "cpu", _gen(6), min_timestep=200, max_timestep=300)
    assert int(t.min()) == 200 and int(t.max()) == 299     # max_timestep is exclusive
    t = N.sample_timesteps(5000, 1000, "cpu", _gen(6))
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    t = N.sample_timesteps(8, 1000, "cpu", min_timestep=500, max_timestep=500)
    assert t.tolist() == [500] * 8                          # min == max: that one timestep


# ---- zero terminal SNR -----------------------------------------------------------------------
def test_zero_terminal_snr_rescales_the_schedule(sched):
    first = float(sched.alphas_cumprod[0])
    N.apply_zero_terminal_snr(sched)
    a = sched.alphas_cumprod
    assert float(a[-1]) == 0.0
    assert float(a[0]) == pytest.approx(first, rel=1e-5)
    assert bool((a[1:] <= a[:-1]).all())
    latents, noise = torch.ones(1, 4, 8, 8), torch.randn(1, 4, 8, 8, generator=_gen(8))
    last = torch.tensor([999])
    assert torch.allclose(sched.add_noise(latents, noise, last), noise)   # pure noise at T
    # the weights stay finite where SNR = 0
    for w in (N.min_snr_weight(a, last, 5.0, False), N.min_snr_weight(a, last, 5.0, True),
              N.debiased_weight(a, last), N.v_pred_scale_weight(a, last)):
        assert bool(torch.isfinite(w).all())
