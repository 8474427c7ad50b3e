"""library/lora_tools/model_files.py on full-size SD1.5 / SDXL key layouts (from the bundled
configs on the meta device, nothing allocated): the UNet layout read back from LDM key names,
and every module a LoRA trains maps to exactly one model tensor."""
from __future__ import annotations

from pathlib import Path

import pytest

from library.lora_tools.model_files import BaseModel, add_ldm_slots, unet_config_from_ldm
from networks import formats

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def meta_parts(family: str):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models import export
    cfg = UNet2DConditionModel.load_config(CONFIGS / family / "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
        tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / family / "text_encoder"))]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(CONFIGS / family / "text_encoder_2")))
    keys = {export.UNET + k: tuple(v.shape)
            for k, v in export.unet_to_ldm(unet.state_dict(), unet.config).items()}
    te1 = export.TE_SD15 if family == "sd15" else export.TE1_SDXL
    keys.update({te1 + k: tuple(v.shape) for k, v in export.clip_to_ldm(
        tes[0].state_dict(), 77).items()})
    if family == "sdxl":
        keys.update({export.TE2_SDXL + k: tuple(v.shape)
                     for k, v in export.open_clip_to_ldm(tes[1].state_dict()).items()})
    return unet, tes, keys


@pytest.mark.parametrize("family,unet_targets,te_targets", [("sd15", 192, 72),
                                                             ("sdxl", 722, 72 + 192)])
def test_full_size_layout_maps_every_lora_target(family, unet_targets, te_targets):
    from networks.targets import RankSpec, find_targets
    unet, tes, keys = meta_parts(family)
    config = unet_config_from_ldm(keys)
    for field in ("down_block_types", "up_block_types", "mid_block_type", "layers_per_block",
                  "use_linear_projection"):
        assert list(config[field]) == list(unet.config[field]) \
            if isinstance(config[field], list) else config[field] == unet.config[field], field
    depths = unet.config.transformer_layers_per_block
    assert config["transformer_layers_per_block"] == (
        list(depths) if isinstance(depths, (list, tuple)) else [1] * 4)
    model = BaseModel(Path("model.safetensors"), "single_file", family, config, [])
    add_ldm_slots(model, keys)
    prefixes = ("lora_te",) if family == "sd15" else ("lora_te1", "lora_te2")
    plain = find_targets(unet, tes, prefixes, family, RankSpec(4, 4.0), train_unet=True,
                         train_text_encoder=True)
    assert sum(t.name.startswith("lora_te") for t in plain) == te_targets
    assert sum(t.name.startswith("lora_unet") for t in plain) == unet_targets
    locon = find_targets(unet, tes, prefixes, family, RankSpec(4, 4.0, 4, 4.0),
                         train_unet=True, train_text_encoder=False)
    for t in plain + locon:  # each has one tensor of the weight's shape
        slots = model.slots.get(t.name)
        assert slots and len(slots) == 1, t.name
        assert tuple(slots[0].shape) == tuple(t.module.weight.shape), t.name
