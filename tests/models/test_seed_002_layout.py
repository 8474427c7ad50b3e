"""Seed 002 (the Paperspace SDXL guide): its config.toml verbatim, its command line, and its
model paths -- `./models/stable-diffusion-xl-base-1.0` plus the fp16-fix VAE weights file --
holding tiny stand-ins. Only steps and resolution are lowered,
for CPU time."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

import train_network
from library.config import load_config
from library.models.loading import check_model
from library.models.vae import resolve_vae_path
from tests.models.test_sources import hf_cache_layout

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
COMMAND = ('--config_file config.toml --train_data_dir "./training_data" '
           '--logging_dir "./logs" --log_with tensorboard')
VAE_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def guide_dir(tmp_path, monkeypatch, folder_components):
    """The guide's working directory: config.toml, sample_prompts.txt, training_data/."""
    shutil.copy(EXAMPLES / "seed_002_sdxl.toml", tmp_path / "config.toml")
    shutil.copy(EXAMPLES / "seed_002_sample_prompts.txt", tmp_path / "sample_prompts.txt")
    data = tmp_path / "training_data" / "10_mysubject person"
    data.mkdir(parents=True)
    for i, color in enumerate([(200, 40, 40), (40, 40, 200)]):
        Image.new("RGB", (96, 80), color).save(data / f"image{i}.jpg")
        (data / f"image{i}.txt").write_text("mysubject person, portrait")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def save_vae(folder_components, folder: Path, config: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(folder_components["sdxl"].vae.state_dict(), str(folder / VAE_FILE))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


def test_seed_002_layout_trains(guide_dir, tiny_sdxl_dir, folder_components):
    shutil.copytree(tiny_sdxl_dir, guide_dir / "models" / "stable-diffusion-xl-base-1.0")
    # the VAE weights file alone, as the guide's config names it (no config.json beside)
    save_vae(folder_components, guide_dir / "models" / "sdxl-vae-fp16-fix")
    rc = train_network.main(shlex.split(COMMAND) + [
        "--max_train_steps", "2", "--resolution", "64"])  # CPU time only: the seed's
    # AdamW8bit, cosine_with_restarts, accumulation 4 and gradient checkpointing stay on
    assert rc == 0
    assert (guide_dir / "output" / "my_lora.safetensors").is_file()


def test_seed_002_download_layout_resolves(guide_dir, tiny_sdxl_dir, folder_components):
    """What the guide's snapshot_download(cache_dir="./models") calls really write."""
    models = guide_dir / "models"
    hf_cache_layout(tiny_sdxl_dir, models, "stabilityai/stable-diffusion-xl-base-1.0")
    vae_repo = models / "models--madebyollin--sdxl-vae-fp16-fix"
    save_vae(folder_components, vae_repo / "snapshots" / "f00d",
             {"_class_name": "AutoencoderKL", "force_upcast": False,
              **{k: v for k, v in folder_components["sdxl"].vae.config.items()
                 if not k.startswith("_") and k != "force_upcast"}})
    (vae_repo / "refs").mkdir()
    (vae_repo / "refs" / "main").write_text("f00d")
    cfg = load_config(shlex.split(COMMAND)).config
    path, family = check_model(cfg.model)
    assert family.name == "sdxl" and path.parent.parent.name.startswith("models--stability")
    assert resolve_vae_path(cfg.model.vae).resolve() == vae_repo / "snapshots" / "f00d" / VAE_FILE
