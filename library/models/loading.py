"""Loading SD1.5 / SDXL components from what users have on disk, without a hub at run time.

Supported here: a diffusers pipeline folder, a hub id already in the local Hugging Face cache,
and a `models--org--name` cache folder (as `snapshot_download(cache_dir=...)` writes). The VAE
may be replaced by a diffusers VAE folder or a diffusers-format weights file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from library.models.family import Components, ModelFamily
from library.models.sd15 import SD15
from library.models.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {"sd15": SD15(), "sdxl": SDXL()}
_PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


class ModelLoadError(Exception):
    """The model could not be found or is not a supported architecture."""


def resolve_model_dir(name_or_path: str) -> Path:
    """A local diffusers folder for `pretrained_model_name_or_path`."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return p
        snapshots = sorted((p / "snapshots").glob("*/model_index.json")) if \
            (p / "snapshots").is_dir() else []
        if not snapshots:  # a cache_dir holding one models--org--name folder
            snapshots = sorted(p.glob("models--*/snapshots/*/model_index.json"))
        if snapshots:
            return snapshots[-1].parent
        raise ModelLoadError(
            f"pretrained_model_name_or_path: {p} has no model_index.json; point it at a "
            "diffusers model folder (with unet/, vae/, text_encoder/ ...)")
    if p.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise ModelLoadError(
            f"pretrained_model_name_or_path: {p} does not exist (single-file checkpoints "
            "are not supported by this version; use a diffusers folder)")
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:
            raise ModelLoadError(
                f"pretrained_model_name_or_path: hub id {name_or_path!r} is not in the local "
                "Hugging Face cache and tomlora never downloads during training. Download it "
                f"first: `huggingface-cli download {name_or_path}` (or snapshot_download), "
                "then run again or pass the folder path.") from None
    raise ModelLoadError(f"pretrained_model_name_or_path: {name_or_path!r} not found")


def detect_family(model_dir: Path, override: str = "auto") -> ModelFamily:
    if override != "auto":
        return FAMILIES[override]
    index = json.loads((model_dir / "model_index.json").read_text())
    cls = index.get("_class_name", "?")
    fam = _PIPELINE_FAMILY.get(cls)
    if fam is None and "text_encoder_2" in index and "unet" in index:
        fam = "sdxl"
    if fam is None:
        raise ModelLoadError(
            f"{model_dir}: found a {cls} model; tomlora trains SD1.5 and SDXL LoRAs only "
            "(set model_family if the folder is an SD1.5/SDXL variant)")
    return FAMILIES[fam]


def load_vae(vae: str, fallback_config_dir: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    p = Path(vae).expanduser()
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() else p
        return AutoencoderKL.from_pretrained(sub, torch_dtype=dtype)
    if not p.is_file():
        raise ModelLoadError(f"vae: {p} not found (give a VAE folder or weights file)")
    config_dir = p.parent if (p.parent / "config.json").is_file() else fallback_config_dir
    vae_model = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir))
    from safetensors.torch import load_file
    state = load_file(str(p)) if p.suffix == ".safetensors" else None
    if state is None:
        raise ModelLoadError(f"vae: {p}: only .safetensors VAE files are supported")
    missing, unexpected = vae_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"vae: {p} is not a diffusers-format VAE matching {config_dir} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return vae_model.to(dtype)


def load_components(model: str, *, family: str = "auto", vae: str | None = None,
                    weight_dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model_dir = resolve_model_dir(model)
    fam = detect_family(model_dir, family)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet",
                                                torch_dtype=weight_dtype)
    if vae:
        vae_model = load_vae(vae, model_dir / "vae", vae_dtype)
    else:
        vae_model = AutoencoderKL.from_pretrained(model_dir, subfolder="vae",
                                                  torch_dtype=vae_dtype)
    tes, toks = [], []
    te_classes = [CLIPTextModel] if fam.name == "sd15" else [CLIPTextModel,
                                                             CLIPTextModelWithProjection]
    for i, cls in enumerate(te_classes):
        suffix = "" if i == 0 else f"_{i + 1}"
        tes.append(cls.from_pretrained(model_dir, subfolder=f"text_encoder{suffix}",
                                       torch_dtype=weight_dtype))
        toks.append(CLIPTokenizer.from_pretrained(model_dir, subfolder=f"tokenizer{suffix}"))
    # Training noise always follows the DDPM schedule the model was trained with.
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return Components(family=fam, unet=unet, vae=vae_model, text_encoders=tes, tokenizers=toks,
                      noise_scheduler=scheduler, model_path=str(model_dir), vae_path=vae)
