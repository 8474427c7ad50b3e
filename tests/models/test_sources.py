"""Every form of `pretrained_model_name_or_path` loads offline and gives the same UNet,
VAE and text-encoder outputs as the diffusers folder it came from."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.models.loading import check_model, detect_family, load_components, \
    resolve_model_path
from tests.models.conftest import assert_same, assert_same_weights, configs_only, outputs

FAMILIES = ["sd15", "sdxl"]


def hf_cache_layout(model_dir: Path, cache: Path, repo: str, rev: str = "0123abcd") -> Path:
    """What snapshot_download(repo, cache_dir=cache) leaves: models--org--name with refs/main
    pointing at snapshots/<rev>/ (plain copies instead of blob symlinks)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model_dir, repo_dir / "snapshots" / rev)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(rev)
    return repo_dir


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder(family, model_dirs, folder_components):
    # folder_components (conftest) is load_components(folder): the reference of every test
    assert resolve_model_path(str(model_dirs[family])) == model_dirs[family]
    assert detect_family(model_dirs[family]).name == family
    assert folder_components[family].family.name == family


def test_hf_cache_folder_and_its_cache_dir(model_dirs, reference, tmp_path):
    family = "sdxl"
    repo_dir = hf_cache_layout(model_dirs[family], tmp_path / "models", f"org/tiny-{family}")
    # an older snapshot without refs/main pointing at it must not win
    shutil.copytree(model_dirs[family], repo_dir / "snapshots" / "old")
    (repo_dir / "snapshots" / "old" / "model_index.json").write_text("{}")
    snap = repo_dir / "snapshots" / "0123abcd"
    assert resolve_model_path(str(repo_dir)) == snap
    assert resolve_model_path(str(tmp_path / "models")) == snap  # the cache_dir itself
    assert_same(outputs(load_components(str(repo_dir))), reference[family])


def test_hub_id_from_the_local_cache(model_dirs, reference, tmp_path, monkeypatch):
    hf_cache_layout(model_dirs["sdxl"], tmp_path / "hub", "tomlora-test/tiny-sdxl")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("tomlora-test/tiny-sdxl").parent.parent.name == \
        "models--tomlora-test--tiny-sdxl"
    assert_same(outputs(load_components("tomlora-test/tiny-sdxl")), reference["sdxl"])


def test_guide_paths_find_the_snapshot_download_cache(model_dirs, tmp_path, monkeypatch,
                                                      caplog):
    # seed 002: snapshot_download(cache_dir="./models") but the config says
    # ./models/stable-diffusion-xl-base-1.0
    hf_cache_layout(model_dirs["sdxl"], tmp_path / "models",
                    "stabilityai/stable-diffusion-xl-base-1.0")
    monkeypatch.chdir(tmp_path)
    path = resolve_model_path("./models/stable-diffusion-xl-base-1.0")
    assert path.name == "0123abcd" and (path / "model_index.json").is_file()
    assert "snapshot_download(cache_dir=...)" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_is_exact(family, model_dirs, single_files, folder_components,
                                         reference, tmp_path, empty_hub_cache):
    """diffusers folder -> our LDM writer -> diffusers' converter: identical weights."""
    config_dir = configs_only(model_dirs[family], tmp_path / "cfg")
    assert not list(config_dir.rglob("*.safetensors"))
    assert detect_family(single_files[family]).name == family
    c = load_components(str(single_files[family]), model_config_dir=str(config_dir))
    assert c.family.name == family
    ref = folder_components[family]
    for mine, theirs in [(c.unet, ref.unet), (c.vae, ref.vae),
                         *zip(c.text_encoders, ref.text_encoders)]:
        assert_same_weights(mine, theirs)
    assert_same(outputs(c), reference[family])


def test_single_file_with_tokenizer_dir(model_dirs, single_files, reference, tmp_path,
                                        empty_hub_cache):
    family = "sdxl"
    # Configs without tokenizers; one bare tokenizer folder serves both SDXL encoders
    # (the second pads with "!", as SDXL's tokenizer_2 does).
    config_dir = configs_only(model_dirs[family], tmp_path / "cfg", tokenizers=False)
    c = load_components(str(single_files[family]), model_config_dir=str(config_dir),
                        tokenizer_dir=str(model_dirs[family] / "tokenizer"))
    assert_same(outputs(c), reference[family])


def test_ckpt_with_allow_pickle(model_dirs, single_files, reference, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    # LDM .ckpt files nest the weights under "state_dict", next to training bookkeeping
    torch.save({"state_dict": load_file(str(single_files["sd15"])), "global_step": 7}, ckpt)
    c = load_components(str(ckpt), allow_pickle=True,
                        model_config_dir=str(model_dirs["sd15"]))
    assert_same(outputs(c), reference["sd15"])


def test_check_model_reads_the_config_section(model_dirs, single_files):
    from library.config.schema import ModelConfig
    m = ModelConfig(pretrained_model_name_or_path=str(single_files["sdxl"]),
                    model_config_dir=str(model_dirs["sdxl"]))
    path, family = check_model(m)
    assert (path, family.name) == (single_files["sdxl"], "sdxl")
