"""alpha_mask in the diffusion loss (library/train/step.py), on the tiny SD1.5 UNet."""
from __future__ import annotations

import pytest
import torch

from library.models.loading import FAMILIES
from library.train.step import LossSettings, diffusion_loss


@pytest.fixture(scope="module")
def parts(tiny_sd15_dir):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_sd15_dir / "scheduler")
    return unet, scheduler


def _loss(parts, mask=None) -> torch.Tensor:
    unet, scheduler = parts
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim,
                                                 generator=g)}
    batch = {"loss_weight": torch.ones(2)}
    if mask is not None:
        batch["alpha_mask"] = mask
    torch.manual_seed(1)  # the same noise and timesteps for every call
    with torch.no_grad():
        return diffusion_loss(unet, FAMILIES["sd15"], scheduler, latents, cond, batch,
                              LossSettings())


def test_mask_weights_the_per_pixel_loss(parts):
    plain = _loss(parts)
    assert plain > 0
    assert _loss(parts, torch.ones(2, 1, 8, 8)) == pytest.approx(plain.item(), rel=1e-6)
    assert _loss(parts, torch.zeros(2, 1, 8, 8)).item() == 0.0
    half = torch.ones(2, 1, 8, 8)
    half[:, :, :, :4] = 0
    assert 0 < _loss(parts, half) < plain
