"""Fixtures for model-loading tests: single-file versions of the tiny models, a config-only
copy of a model folder (what model_config_dir needs), and reference outputs to compare."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from library.models.export import save_single_file
from library.models.loading import load_components

CAPTIONS = ["a photo of a red cat", "blue circle on white background, simple"]


def configs_only(model_dir: Path, dest: Path, tokenizers: bool = True) -> Path:
    """The json configs (and tokenizers) of a diffusers folder, no weights."""
    for f in model_dir.rglob("*"):
        if f.is_file() and (f.suffix in (".json", ".txt") and
                            (tokenizers or "tokenizer" not in f.parent.name)):
            target = dest / f.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    return dest


@torch.no_grad()
def outputs(c) -> dict[str, torch.Tensor]:
    """UNet output on a fixed input and the text conditioning of CAPTIONS."""
    cond = c.family.encode_prompts(c, CAPTIONS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    batch = {"original_size": [[64, 64]] * 2, "crop_top_left": [[0, 0]] * 2,
             "target_size": [[64, 64]] * 2}
    unet = c.unet(x, 10, cond["encoder_hidden_states"],
                  **c.family.unet_inputs(cond, batch)).sample
    latents = c.vae.encode(torch.rand(1, 3, 32, 32, generator=g) * 2 - 1).latent_dist.mean
    return {"unet": unet, "latents": latents, **{k: v for k, v in cond.items() if v is not None}}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_weights(m1, m2) -> None:
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1), [k for k in s1
                                                         if not torch.equal(s1[k], s2[k])][:3]


@pytest.fixture(scope="session")
def model_dirs(tiny_sd15_dir, tiny_sdxl_dir) -> dict[str, Path]:
    return {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}


@pytest.fixture(scope="session")
def folder_components(model_dirs) -> dict:
    """Each tiny model loaded from its diffusers folder (shared: treat as read-only)."""
    return {fam: load_components(str(d)) for fam, d in model_dirs.items()}


@pytest.fixture(scope="session")
def single_files(tmp_path_factory, folder_components) -> dict[str, Path]:
    """The tiny models as A1111/LDM single files (written by our exporter)."""
    out = tmp_path_factory.mktemp("single")
    return {fam: save_single_file(c, out / f"tiny-{fam}.safetensors")
            for fam, c in folder_components.items()}


@pytest.fixture(scope="session")
def reference(folder_components) -> dict[str, dict]:
    """Outputs of each tiny model loaded from its diffusers folder."""
    return {fam: outputs(c) for fam, c in folder_components.items()}


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, so nothing cached on this machine is found."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache
