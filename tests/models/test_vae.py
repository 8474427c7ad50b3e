"""The `vae` key: folders, diffusers-format files (with or without config.json), LDM files,
and the rule for when the VAE runs in half precision."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.models.errors import ModelLoadError
from library.models.export import vae_to_ldm
from library.models.loading import load_components
from library.models.vae import load_vae, vae_dtype
from tests.models.conftest import assert_same_weights

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("family, weight, safe, no_half, expected", [
    ("sd15", F16, False, False, F16),    # SD1.5 VAEs run in the training dtype
    ("sd15", F16, False, True, F32),     # no_half_vae
    ("sdxl", F16, False, False, F32),    # SDXL's original VAE overflows in fp16
    ("sdxl", BF16, False, False, F32),
    ("sdxl", F16, True, False, F16),     # an fp16-safe VAE (sdxl-vae-fp16-fix)
    ("sdxl", F16, True, True, F32),
    ("sdxl", F32, True, False, F32),     # fp32 training: fp32 everywhere
])
def test_vae_dtype_rule(family, weight, safe, no_half, expected):
    assert vae_dtype(family, weight, fp16_safe=safe, no_half_vae=no_half) == expected


def diffusers_vae_file(folder_components, path: Path, config: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(folder_components["sdxl"].vae.state_dict(), str(path))
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps(config))
    return path


def test_seed_file_without_config_uses_the_model_config(folder_components, model_dirs,
                                                        tmp_path):
    # seed 002: ./models/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors, no config.json
    f = diffusers_vae_file(folder_components, tmp_path / "sdxl-vae-fp16-fix" /
                           "diffusion_pytorch_model.safetensors")
    loaded = load_vae(str(f), model_dirs["sdxl"] / "vae")
    assert_same_weights(loaded.model, folder_components["sdxl"].vae)
    assert loaded.model.config.scaling_factor == pytest.approx(0.13025)  # the family's
    assert loaded.fp16_safe  # by its name


@pytest.mark.parametrize("force_upcast, safe", [(False, True), (True, False)])
def test_config_beside_the_file_decides(force_upcast, safe, folder_components, model_dirs,
                                        tmp_path):
    config = dict(folder_components["sdxl"].vae.config)
    config["force_upcast"] = force_upcast
    f = diffusers_vae_file(folder_components, tmp_path / "my-vae" /
                           "diffusion_pytorch_model.safetensors",
                           {"_class_name": "AutoencoderKL",
                            **{k: v for k, v in config.items() if not k.startswith("_")}})
    loaded = load_vae(str(f), model_dirs["sd15"] / "vae")  # fallback not used
    assert loaded.fp16_safe is safe
    assert loaded.model.config.scaling_factor == pytest.approx(0.13025)


def test_ldm_vae_file(folder_components, model_dirs, tmp_path):
    vae = folder_components["sd15"].vae
    f = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(),
                                                        vae.config).items()}, str(f))
    loaded = load_vae(str(f), model_dirs["sd15"] / "vae")
    assert_same_weights(loaded.model, vae)
    assert not loaded.fp16_safe


def test_vae_out_of_a_full_checkpoint(folder_components, single_files, model_dirs):
    loaded = load_vae(str(single_files["sdxl"]), model_dirs["sdxl"] / "vae")
    assert_same_weights(loaded.model, folder_components["sdxl"].vae)


@pytest.mark.parametrize("sub", ["", "vae"])
def test_vae_folders(sub, folder_components, model_dirs):
    # a VAE folder, or a whole model folder whose vae/ is taken
    folder = model_dirs["sd15"] / "vae" if sub else model_dirs["sd15"]
    loaded = load_vae(str(folder), Path("unused"))
    assert_same_weights(loaded.model, folder_components["sd15"].vae)
    assert loaded.fp16_safe  # the tiny SD1.5 VAE config says force_upcast: false


def test_not_a_vae(tmp_path, model_dirs):
    f = tmp_path / "x.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(f))
    with pytest.raises(ModelLoadError, match="holds no VAE weights"):
        load_vae(str(f), model_dirs["sd15"] / "vae")


def test_load_components_applies_the_rule(folder_components, model_dirs, tmp_path):
    f = diffusers_vae_file(folder_components, tmp_path / "sdxl-vae-fp16-fix" /
                           "diffusion_pytorch_model.safetensors")
    c = load_components(str(model_dirs["sdxl"]), vae=str(f), weight_dtype=BF16)
    assert c.vae.dtype == BF16 and c.unet.dtype == BF16
    assert c.extra["vae_fp16_safe"]
    # the model's own SDXL VAE (force_upcast: true) stays fp32
    assert folder_components["sdxl"].extra["vae_fp16_safe"] is False
