"""Loss types and the Huber schedule against hand computations; the options reach
diffusion_loss through LossSettings.from_config."""
from __future__ import annotations

import math
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from library.config.schema import Config, ModelConfig, TrainingConfig
from library.models.sd15 import SD15
from library.train import loss as L
from library.train.noise import apply_zero_terminal_snr
from library.train.step import LossSettings, diffusion_loss
from library.train.timesteps import TimestepSampling
from tools.make_tiny_model import SCHEDULER_COMMON, _unet_sd15

PRED = torch.tensor([[0.0, 0.5, -2.0, 3.0]])
TARGET = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
D = [0.0, 0.5, -2.0, 2.0]


def _pseudo_huber(d, c, scale_by_c):
    v = math.sqrt(d * d + c * c) - c
    return 2 * c * v if scale_by_c else 2 * v


@pytest.mark.parametrize("loss_type, by_hand", [
    ("l2", lambda d, c: d * d),
    ("l1", lambda d, c: abs(d)),
    ("huber", lambda d, c: _pseudo_huber(d, c, True)),
    ("smooth_l1", lambda d, c: _pseudo_huber(d, c, False)),
])
def test_loss_types_match_a_hand_computation(loss_type, by_hand):
    c = 0.3
    got = L.elementwise_loss(PRED, TARGET, loss_type, torch.tensor([c]))
    assert got.tolist()[0] == pytest.approx([by_hand(d, c) for d in D], rel=1e-6)


def test_huber_is_quadratic_near_zero_and_linear_far_out():
    c = torch.tensor([1.0])
    small = L.elementwise_loss(torch.tensor([[1e-3]]), torch.zeros(1, 1), "huber", c)
    big = L.elementwise_loss(torch.tensor([[1e3]]), torch.zeros(1, 1), "huber", c)
    assert float(small) == pytest.approx(1e-6, rel=1e-3)        # ~ d^2
    assert float(big) == pytest.approx(2 * 1e3, rel=1e-2)       # ~ 2 c |d|


def test_huber_needs_a_threshold_and_unknown_types_fail():
    with pytest.raises(ValueError, match="needs a threshold"):
        L.elementwise_loss(PRED, TARGET, "huber")
    with pytest.raises(ValueError, match="valid: l2, l1, huber, smooth_l1"):
        L.elementwise_loss(PRED, TARGET, "l3")


@pytest.fixture
def sched():
    return DDPMScheduler(**SCHEDULER_COMMON)


def test_huber_schedules_at_the_first_and_last_timestep(sched):
    c, scale, T = 0.1, 2.0, 1000
    ends = torch.tensor([0, T])
    a0 = float(sched.alphas_cumprod.double()[0])
    sigma0 = math.sqrt((1 - a0) / a0)
    const = L.huber_threshold("constant", c, scale, ends, T, sched.alphas_cumprod)
    expo = L.huber_threshold("exponential", c, scale, ends, T, sched.alphas_cumprod)
    assert const.tolist() == pytest.approx([c * scale, c * scale])
    assert expo.tolist() == pytest.approx([scale, c * scale])      # scale at 0, c*scale at T
    snr_first = L.huber_threshold("snr", c, scale, torch.tensor([0]), T, sched.alphas_cumprod)
    assert float(snr_first) == pytest.approx((1 - c) / (1 + sigma0) ** 2 + c, rel=1e-5)
    apply_zero_terminal_snr(sched)   # at SNR = 0 the snr schedule reaches c exactly
    snr_last = L.huber_threshold("snr", c, scale, torch.tensor([T - 1]), T, sched.alphas_cumprod)
    assert float(snr_last) == pytest.approx(c)


def test_schema_choices_match_the_loss_module():
    meta = {f.name: f.metadata for f in fields(TrainingConfig)}
    assert meta["loss_type"]["choices"] == L.LOSS_TYPES
    assert meta["huber_schedule"]["choices"] == L.HUBER_SCHEDULES


def test_loss_settings_read_every_training_key():
    tr = TrainingConfig(noise_offset=0.1, noise_offset_random_strength=True,
                        adaptive_noise_scale=0.2, multires_noise_iterations=6,
                        multires_noise_discount=0.4, ip_noise_gamma=0.1,
                        ip_noise_gamma_random_strength=True, min_timestep=10,
                        max_timestep=900, min_snr_gamma=5.0,
                        scale_v_pred_loss_like_noise_pred=True,
                        debiased_estimation_loss=True, loss_type="huber",
                        huber_schedule="exponential", huber_c=0.2, huber_scale=1.5,
                        timestep_sampling="shift", logit_mean=0.1, logit_std=0.9,
                        mode_scale=1.1, sigmoid_scale=1.2, discrete_flow_shift=2.5)
    s = LossSettings.from_config(Config(model=ModelConfig(v_parameterization=True),
                                        training=tr))
    assert s.v_prediction is True
    for f in fields(LossSettings):
        if f.name not in ("v_prediction", "sampling"):
            assert getattr(s, f.name) == getattr(tr, f.name), f.name
    assert s.sampling == TimestepSampling("shift", 0.1, 0.9, 1.1, 1.2, 2.5)


class ConvDenoiser(torch.nn.Module):
    """A one-layer stand-in for the UNet (same call signature), so every option can be run
    through diffusion_loss quickly; the real tiny UNet runs once below."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, encoder_hidden_states):
        out = self.conv(x) + encoder_hidden_states.mean() + t.view(-1, 1, 1, 1) * 1e-3
        return SimpleNamespace(sample=out)


def _inputs():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"encoder_hidden_states": torch.randn(2, 77, 32,
                                                 generator=torch.Generator().manual_seed(2))}
    return latents, cond, {"loss_weight": torch.tensor([1.0, 0.5])}


def _loss(unet, sched, s, seed=0):
    latents, cond, batch = _inputs()
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(diffusion_loss(unet, SD15(), sched, latents, cond, batch, s))


VARIANTS = [
    dict(noise_offset=0.1), dict(noise_offset=0.1, noise_offset_random_strength=True),
    dict(noise_offset=0.1, adaptive_noise_scale=0.1), dict(multires_noise_iterations=4),
    dict(ip_noise_gamma=0.1), dict(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True),
    dict(min_timestep=900, max_timestep=1000), dict(min_snr_gamma=0.001),
    dict(debiased_estimation_loss=True), dict(loss_type="l1"),
    dict(loss_type="huber", huber_schedule="snr"), dict(loss_type="huber", huber_c=0.5),
    dict(loss_type="smooth_l1", huber_schedule="exponential"),
    dict(v_prediction=True), dict(v_prediction=True, scale_v_pred_loss_like_noise_pred=True),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=[",".join(v) for v in VARIANTS])
def test_each_option_changes_the_diffusion_loss(sched, kw):
    unet = ConvDenoiser()
    plain = _loss(unet, sched, LossSettings())
    assert plain == _loss(unet, sched, LossSettings())       # seeded: repeatable
    got = _loss(unet, sched, LossSettings(**kw))
    assert math.isfinite(got) and got != plain


def test_all_options_together_train_the_tiny_unet(sched):
    torch.manual_seed(0)
    unet = _unet_sd15()
    for p in unet.parameters():
        p.requires_grad_(p.dim() == 4 and p.shape[0] == 4)   # the output conv only
    s = LossSettings(noise_offset=0.05, noise_offset_random_strength=True,
                     multires_noise_iterations=3, ip_noise_gamma=0.1, min_timestep=100,
                     max_timestep=900, min_snr_gamma=5.0, v_prediction=True,
                     scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True,
                     loss_type="huber", huber_schedule="snr")
    latents, cond, batch = _inputs()
    loss = diffusion_loss(unet, SD15(), sched, latents, cond, batch, s)
    loss.backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert math.isfinite(float(loss.detach())) and grads and all(g.abs().sum() > 0 for g in grads)
