"""Family detection from files and every loading error: each names the key, what was found
and what to do."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.config.schema import ModelConfig
from library.models.errors import ModelLoadError
from library.models.loading import check_model, detect_family, load_components, \
    resolve_model_path
from tests.models.conftest import configs_only

U = "model.diffusion_model."


def fake_checkpoint(path: Path, keys: list[str], in_channels: int = 4) -> Path:
    """A tiny-tensor file with the given key names: enough for key-based detection."""
    state = {k: torch.zeros(1) for k in keys}
    state[U + "input_blocks.0.0.weight"] = torch.zeros(8, in_channels, 3, 3)
    save_file(state, str(path))
    return path


SD15_KEYS = [U + "input_blocks.1.1.proj_in.weight",
             "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
SDXL_KEYS = [U + "input_blocks.4.1.proj_in.weight",
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "conditioner.embedders.1.model.ln_final.weight"]


@pytest.mark.parametrize("keys, family", [(SD15_KEYS, "sd15"), (SDXL_KEYS, "sdxl")])
def test_family_from_keys(keys, family, tmp_path):
    assert detect_family(fake_checkpoint(tmp_path / "m.safetensors", keys)).name == family


def test_model_family_override_wins(tmp_path):
    f = fake_checkpoint(tmp_path / "m.safetensors", SD15_KEYS)
    assert detect_family(f, "sdxl").name == "sdxl"


@pytest.mark.parametrize("keys, in_channels, expected", [
    ([U + "input_blocks.1.1.proj_in.weight", "cond_stage_model.model.token_embedding.weight"],
     4, "Stable Diffusion 2.x"),
    ([U + "input_blocks.1.1.proj_in.weight", "conditioner.embedders.0.model.ln_final.weight"],
     4, "SDXL refiner"),
    (SD15_KEYS, 9, "9 input channels"),
    ([U + "input_blocks.1.1.proj_in.weight"], 4, "no text encoder"),
])
def test_unsupported_sd_variants(keys, in_channels, expected, tmp_path):
    f = fake_checkpoint(tmp_path / "m.safetensors", keys, in_channels)
    with pytest.raises(ModelLoadError, match=expected) as e:
        detect_family(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("keys, expected", [
    (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"],
     "Stable Diffusion 3"),
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA file"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "a VAE"),
    (["down_blocks.0.resnets.0.conv1.weight", "mid_block.resnets.0.conv1.weight"],
     "diffusers-format UNet"),
    (["something.else"], "unknown layout .first keys: something.else"),
])
def test_other_architectures_are_named(keys, expected, tmp_path):
    f = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(f))
    with pytest.raises(ModelLoadError, match=expected) as e:
        detect_family(f)
    assert "SD1.5 and SDXL" in str(e.value)


def test_missing_path():
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_path("./no/such/model.safetensors")


def test_folder_without_model_index_names_checkpoints_in_it(tmp_path):
    fake_checkpoint(tmp_path / "sd_xl_base_1.0.safetensors", SDXL_KEYS)
    with pytest.raises(ModelLoadError, match="point at the file .sd_xl_base_1.0.safetensors"):
        resolve_model_path(str(tmp_path))


def test_hub_id_not_cached_says_how_to_download(empty_hub_cache):
    with pytest.raises(ModelLoadError) as e:
        resolve_model_path("stabilityai/stable-diffusion-xl-base-1.0")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg
    assert "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0" in msg


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_needs_allow_pickle(suffix, tmp_path):
    f = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {U + "input_blocks.0.0.weight": torch.zeros(1)}}, f)
    with pytest.raises(ModelLoadError, match="allow_pickle = true") as e:
        resolve_model_path(str(f))
    assert "pretrained_model_name_or_path" in str(e.value)


def test_pickle_with_python_objects_is_refused_even_when_allowed(tmp_path):
    f = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "callback": Path("x")}, f)  # not a plain container
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        resolve_model_path(str(f), allow_pickle=True)


def test_damaged_safetensors(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("<html>rate limited</html>")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        resolve_model_path(str(f))


def test_single_file_without_tokenizer(single_files, model_dirs, tmp_path, empty_hub_cache):
    config_dir = configs_only(model_dirs["sdxl"], tmp_path / "cfg", tokenizers=False)
    m = ModelConfig(pretrained_model_name_or_path=str(single_files["sdxl"]),
                    model_config_dir=str(config_dir))
    with pytest.raises(ModelLoadError) as e:
        check_model(m)  # before any data or weights load
    msg = str(e.value)
    assert "holds no tokenizer" in msg and "Set tokenizer_dir to the tokenizer folder" in msg
    assert "huggingface-cli download openai/clip-vit-large-patch14" in msg


def test_bad_tokenizer_dir(single_files, model_dirs, tmp_path):
    m = ModelConfig(pretrained_model_name_or_path=str(single_files["sd15"]),
                    model_config_dir=str(model_dirs["sd15"]), tokenizer_dir=str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"tokenizer_dir: {tmp_path} has no CLIP"):
        check_model(m)


def test_model_config_dir_missing_configs(single_files, tmp_path):
    m = ModelConfig(pretrained_model_name_or_path=str(single_files["sd15"]),
                    model_config_dir=str(tmp_path))
    with pytest.raises(ModelLoadError, match="model_config_dir: .* lacks unet/config.json"):
        check_model(m)


def test_config_that_does_not_fit_the_file(single_files, model_dirs):
    # The tiny model against the real SD1.5 configs (bundled): shapes differ.
    with pytest.raises(ModelLoadError, match="do not match the config in .*configs/models/sd15"
                       ) as e:
        load_components(str(single_files["sd15"]),
                        tokenizer_dir=str(model_dirs["sd15"] / "tokenizer"))
    assert "set model_config_dir" in str(e.value)


def test_folder_without_weights(model_dirs, tmp_path):
    # snapshot_download(..., ignore_patterns=["*.safetensors"]) as in seed 002
    folder = configs_only(model_dirs["sdxl"], tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"no weights in unet/, vae/, text_encoder/"):
        check_model(ModelConfig(pretrained_model_name_or_path=str(folder)))


def test_missing_vae(model_dirs, tmp_path):
    m = ModelConfig(pretrained_model_name_or_path=str(model_dirs["sd15"]),
                    vae=str(tmp_path / "vae.safetensors"))
    with pytest.raises(ModelLoadError, match="vae: .* not found"):
        check_model(m)
