"""What the LoRA tools need to know about the base model without loading it.

The key maps (networks/formats.py) are derived from the UNet config; only its topology fields
matter (block types, layers_per_block, transformer depth), so the stock SD1.5 and SDXL values
below stand in when no model is at hand. `--model DIR` or `--unet_config JSON` give the real
ones (fine-tunes and the tiny test models may differ in depth).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

# Topology of the stock UNets (diffusers' config.json of SD1.5 / SDXL base 1.0).
STANDARD_UNET = {
    "sd15": {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 2,
        "transformer_layers_per_block": 1,
        "use_linear_projection": False,
    },
    "sdxl": {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
    },
}
_SDXL_HINTS = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_middle_block",
               "lora_unet_output_blocks", "text_encoder_2.")


def family_of(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str | None:
    """"sd15" / "sdxl" from the file's keys or kohya metadata; None when it cannot tell."""
    if any(k.startswith(_SDXL_HINTS) for k in sd):
        return "sdxl"
    version = metadata.get("ss_base_model_version", "") + \
        metadata.get("modelspec.architecture", "")
    if "xl" in version.lower():
        return "sdxl"
    if version:
        return "sd15"
    if any(k.startswith(("lora_te_", "lora_unet_down_blocks", "lora_unet_mid_block",
                         "lora_unet_up_blocks")) for k in sd):
        return "sd15"
    return None


def model_unet_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "unet" / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {model_dir}: no unet/config.json (expected a diffusers "
                         "model folder)")
    return json.loads(path.read_text())


def model_family(model_dir: str | Path) -> str:
    index = Path(model_dir) / "model_index.json"
    if index.is_file():
        cls = json.loads(index.read_text()).get("_class_name", "")
        if "XL" in cls:
            return "sdxl"
        if cls:
            return "sd15"
    return "sdxl" if (Path(model_dir) / "text_encoder_2").is_dir() else "sd15"


def resolve(sd: Mapping, metadata: Mapping, *, model: str | None = None,
            family: str | None = None, unet_config: str | None = None) -> tuple[str, dict]:
    """(family, UNet config) from the CLI options, falling back to the file and stock configs.
    ValueError says which option to give."""
    config = None
    if model:
        config = model_unet_config(model)
        family = family or model_family(model)
    if unet_config:
        path = Path(unet_config)
        if not path.is_file():
            raise ValueError(f"--unet_config {path}: file not found")
        config = json.loads(path.read_text())
    family = family or family_of(sd, metadata)
    if family not in STANDARD_UNET:
        raise ValueError("cannot tell whether this LoRA is for SD1.5 or SDXL; pass "
                         "--family sd15|sdxl or --model DIR")
    return family, dict(config if config is not None else STANDARD_UNET[family])
