"""Timestep distributions (library/train/timesteps.py): each one's draws against its own
definition (a Kolmogorov-Smirnov distance to the analytic CDF, fixed seed), the window of
min_timestep / max_timestep, and the loss weightings with each distribution."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from library.train import timesteps as T
from library.train.step import LossSettings, noisy_latents, timestep_weight
from tools.make_tiny_model import SCHEDULER_COMMON

N = 20000
# The KS distance of N exact draws exceeds 1.95 / sqrt(N) with probability 0.001; with a
# fixed seed the test is deterministic, and a wrong formula lands far above it.
KS_LIMIT = 1.95 / math.sqrt(N)


def ks_distance(samples: torch.Tensor, cdf) -> float:
    x = np.sort(samples.double().numpy())
    f = cdf(x)
    i = np.arange(1, len(x) + 1)
    return float(max((i / len(x) - f).max(), (f - (i - 1) / len(x)).max()))


def normal_cdf(z):
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def logit(u):
    u = np.clip(u, 1e-12, 1 - 1e-12)
    return np.log(u / (1 - u))


def mode_cdf(scale):
    # u = f(r) decreases from 1 to 0 over r in [0, 1], so P(u <= x) = 1 - f^-1(x)
    r = np.linspace(0, 1, 200001)
    f = 1 - r - scale * (np.cos(math.pi * r / 2) ** 2 - 1 + r)
    return lambda x: 1 - np.interp(x, f[::-1], r[::-1])


def shift_cdf(scale, s):
    # u' = s u / (1 + (s - 1) u)  <=>  u = u' / (s - (s - 1) u')
    return lambda x: normal_cdf(logit(x / (s - (s - 1) * x)) / scale)


CASES = {
    "uniform": (T.TimestepSampling("uniform"), lambda x: x),
    "logit_normal": (T.TimestepSampling("logit_normal", logit_mean=0.5, logit_std=0.8),
                     lambda x: normal_cdf((logit(x) - 0.5) / 0.8)),
    "mode": (T.TimestepSampling("mode", mode_scale=1.29), mode_cdf(1.29)),
    "sigmoid": (T.TimestepSampling("sigmoid", sigmoid_scale=2.0),
                lambda x: normal_cdf(logit(x) / 2.0)),
    "shift": (T.TimestepSampling("shift", sigmoid_scale=1.0, shift=3.0), shift_cdf(1.0, 3.0)),
    "cosmap": (T.TimestepSampling("cosmap"),
               lambda x: 2 / math.pi * np.arctan(x / np.clip(1 - x, 1e-12, None))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fractions_follow_their_definition(name):
    sampling, cdf = CASES[name]
    u = T.sample_fraction(N, sampling, generator=torch.Generator().manual_seed(0))
    assert u.shape == (N,) and float(u.min()) >= 0 and float(u.max()) <= 1
    assert ks_distance(u, cdf) < KS_LIMIT, name


@pytest.mark.parametrize("name", ["logit_normal", "sigmoid"])
def test_a_wrong_definition_is_caught(name):
    # The test above can fail: logit_normal(0.5, 0.8) is far from logit_normal(0, 1), and
    # sigmoid at scale 2 from scale 1.
    sampling, _ = CASES[name]
    u = T.sample_fraction(N, sampling, generator=torch.Generator().manual_seed(0))
    assert ks_distance(u, lambda x: normal_cdf(logit(x))) > 5 * KS_LIMIT


def test_shift_moves_towards_noisy_timesteps():
    g = torch.Generator().manual_seed(1)
    plain = T.sample_fraction(N, T.TimestepSampling("sigmoid"), generator=g).mean()
    shifted = T.sample_fraction(N, T.TimestepSampling("shift", shift=3.0), generator=g).mean()
    clean = T.sample_fraction(N, T.TimestepSampling("shift", shift=0.5), generator=g).mean()
    assert float(clean) < float(plain) - 0.05 < float(shifted) - 0.15


@pytest.mark.parametrize("name", list(CASES))
def test_timesteps_fill_the_window_with_the_same_shape(name):
    sampling, cdf = CASES[name]
    g = torch.Generator().manual_seed(2)
    t = T.sample_timesteps(N, 1000, "cpu", g, sampling=sampling, min_timestep=200,
                           max_timestep=600)
    assert t.dtype == torch.long and int(t.min()) >= 200 and int(t.max()) <= 599
    # t = 200 + floor(400 u): P(t < 200 + k) = P(u < k / 400) for integer k
    k = np.arange(1, 400)
    emp = np.searchsorted(np.sort(t.numpy()), 200 + k, side="left") / N
    assert np.abs(emp - cdf(k / 400)).max() < KS_LIMIT + 1e-3, name


def test_uniform_keeps_the_earlier_draws():
    a = T.sample_timesteps(64, 1000, "cpu", torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_min_equal_max_trains_one_timestep():
    t = T.sample_timesteps(8, 1000, "cpu", sampling=T.TimestepSampling("cosmap"),
                           min_timestep=500, max_timestep=500)
    assert t.tolist() == [500] * 8


@pytest.mark.parametrize("name", list(CASES))
def test_loss_weightings_work_with_each_distribution(name):
    sched = DDPMScheduler(**SCHEDULER_COMMON)
    s = LossSettings(sampling=T.TimestepSampling(name), min_snr_gamma=5.0, debiased_estimation_loss=True,
                     min_timestep=10, max_timestep=900)
    torch.manual_seed(4)
    noise, noisy, t = noisy_latents(sched, torch.randn(16, 4, 8, 8), s)
    assert int(t.min()) >= 10 and int(t.max()) < 900
    w = timestep_weight(sched, t, s)
    assert w.shape == (16,) and bool(torch.isfinite(w).all()) and float(w.min()) > 0


def test_config_accepts_the_distributions_and_refuses_others(tmp_path):
    from library.config import ConfigError, load_config
    base = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)]
    cfg = load_config([*base, "--timestep_sampling", "logit_normal", "--logit_std", "0.5"],
                      check_paths=False).config
    s = LossSettings.from_config(cfg).sampling
    assert (s.name, s.logit_std) == ("logit_normal", 0.5)
    with pytest.raises(ConfigError) as e:
        load_config([*base, "--timestep_sampling", "lognormal"], check_paths=False)
    assert "timestep_sampling" in str(e.value.problems)
