"""tools/pretrain_tiny.py through `make_tiny_model --pretrain`, shortened to a few steps."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from safetensors import safe_open

from tools import pretrain_tiny as P
from tools.make_tiny_model import build_tiny_model, folder_size, main

SHORT = dataclasses.replace(P.PretrainSettings(), vae_steps=2, vae_batch=4, scenes=24,
                            unet_steps=2, unet_batch=4, warmup=1)


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    return build_tiny_model("sd15", tmp_path_factory.mktemp("pre") / "m", seed=0,
                            pretrain=True, pretrain_settings=SHORT)


def test_layout_dtypes_and_size(short_model):
    assert (short_model / "model_index.json").is_file()
    with safe_open(short_model / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    with safe_open(short_model / "vae" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert folder_size(short_model) < 8_000_000


def test_loads_in_fp32_and_draws_32px(short_model):
    from library.models.loading import load_components
    from tools.learning_report import load, render
    c = load_components(str(short_model))
    assert c.unet.dtype == torch.float32
    # 3 VAE levels: 32 pixels -> 8x8 latents, the UNet's sample_size
    assert 2 ** (len(c.vae.config.block_out_channels) - 1) * c.unet.config.sample_size == 32
    assert c.vae.config.scaling_factor != 1.0  # measured from the latents
    images = render(load(short_model), str(short_model), ["a red circle on a blue background"],
                    [0])
    assert images[0].shape == (32, 32, 3)


def test_vae_training_lowers_the_loss():
    torch.manual_seed(0)
    vae = P.make_vae()
    s = dataclasses.replace(SHORT, vae_steps=1, vae_batch=8)
    first = P.train_vae(vae, dataclasses.replace(s, vae_lr=0.0), random.Random(0))
    P.train_vae(vae, dataclasses.replace(s, vae_steps=40), random.Random(1))
    last = P.train_vae(vae, dataclasses.replace(s, vae_lr=0.0), random.Random(0))
    assert last < 0.7 * first  # the same pictures, reconstructed better


def test_pretrain_is_sd15_only(tmp_path, capsys):
    assert main(["--family", "sdxl", "--pretrain", "--out", str(tmp_path / "x")]) == 1
    assert "--family sd15" in capsys.readouterr().err


def test_vae_from_keeps_the_vae_and_trains_the_rest(short_model, tmp_path):
    out = build_tiny_model("sd15", tmp_path / "m2", seed=1, pretrain=True,
                           pretrain_settings=SHORT, vae_from=short_model)
    vae = "vae/diffusion_pytorch_model.safetensors"
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert _same_tensors(out / vae, short_model / vae)
    assert not _same_tensors(out / unet, short_model / unet)


def test_vae_from_needs_a_model_folder(tmp_path, capsys):
    assert main(["--family", "sd15", "--pretrain", "--vae_from", str(tmp_path),
                 "--out", str(tmp_path / "x")]) == 1
    assert "vae/config.json" in capsys.readouterr().err


def _same_tensors(a, b) -> bool:
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return set(fa.keys()) == set(fb.keys()) and all(
            torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
