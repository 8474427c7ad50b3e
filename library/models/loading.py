"""Loading SD1.5 / SDXL components from what users have on disk, without a hub at run time.

`pretrained_model_name_or_path` may be (docs/MODELS.md):
- a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/ ...);
- a `models--org--name` Hugging Face cache folder, or a `cache_dir` holding one, as
  `snapshot_download(cache_dir=...)` writes;
- a hub id (`org/name`) already in the local Hugging Face cache;
- a single-file checkpoint (`.safetensors`; `.ckpt` with `allow_pickle`) in the A1111/civitai
  LDM layout (library/models/single_file.py).
`vae` replaces the VAE (library/models/vae.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from library.models import hub
from library.models.checkpoint_file import family_of_checkpoint, is_checkpoint_file, \
    read_shapes
from library.models.errors import ModelLoadError
from library.models.family import Components, ModelFamily
from library.models.sd15 import SD15
from library.models.sdxl import SDXL
from library.models.strict import cast
from library.models.vae import LoadedVAE, load_vae, resolve_vae_path, \
    vae_dtype as vae_dtype_rule

__all__ = ["FAMILIES", "ModelLoadError", "check_model", "detect_family", "load_components",
           "load_components_for", "resolve_model_path", "resolve_model_dir"]

log = logging.getLogger("tomlora")
FAMILIES: dict[str, ModelFamily] = {"sd15": SD15(), "sdxl": SDXL()}
_PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
KEY = "pretrained_model_name_or_path"


def resolve_model_path(name_or_path: str, *, allow_pickle: bool = False) -> Path:
    """A local diffusers folder or single-file checkpoint for `pretrained_model_name_or_path`."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return p
        snap = hub.snapshot_in_cache_folder(p)
        if snap is not None:
            return snap
        files = sorted(f.name for f in p.iterdir() if is_checkpoint_file(f))
        hint = f"; to use a single-file checkpoint, point at the file ({', '.join(files[:3])})" \
            if files else ""
        raise ModelLoadError(
            f"{KEY}: {p} has no model_index.json; point it at a diffusers model folder (with "
            f"unet/, vae/, text_encoder/ ...) or a Hugging Face cache folder{hint}")
    if p.is_file():
        if not is_checkpoint_file(p):
            raise ModelLoadError(f"{KEY}: {p} is not a model checkpoint (.safetensors, or "
                                 ".ckpt with allow_pickle = true) nor a diffusers folder")
        read_shapes(p, allow_pickle, key=KEY)  # pickle policy and readability, early
        return p
    cached = hub.sibling_cache_path(p)
    if cached is not None:
        log.warning(f"{KEY}: {p} does not exist; using {cached}, where "
                    "snapshot_download(cache_dir=...) put that model")
        return cached
    if hub.looks_like_hub_id(name_or_path):
        snap = hub.cached_snapshot(name_or_path)
        if snap is not None and (snap / "model_index.json").is_file():
            return snap
        raise ModelLoadError(
            f"{KEY}: {name_or_path!r} is not a local path, and as a hub id it is not in the "
            "local Hugging Face cache (tomlora never downloads during training); "
            + hub.download_hint(name_or_path))
    raise ModelLoadError(f"{KEY}: {name_or_path!r} not found (give a diffusers folder, a "
                         "single-file .safetensors checkpoint or a cached hub id)")


resolve_model_dir = resolve_model_path  # the name earlier callers use


def detect_family(model_path: Path, override: str = "auto", *,
                  allow_pickle: bool = False) -> ModelFamily:
    """SD1.5 or SDXL, from model_index.json or a single file's keys; `override` wins."""
    if override != "auto":
        return FAMILIES[override]
    model_path = Path(model_path)
    if model_path.is_file():
        return FAMILIES[family_of_checkpoint(read_shapes(model_path, allow_pickle, KEY),
                                             model_path)]
    index = json.loads((model_path / "model_index.json").read_text())
    cls = index.get("_class_name", "?")
    fam = _PIPELINE_FAMILY.get(cls)
    if fam is None and "text_encoder_2" in index and "unet" in index:
        fam = "sdxl"
    if fam is None:
        raise ModelLoadError(
            f"{model_path}: found a {cls} model; tomlora trains SD1.5 and SDXL LoRAs only "
            "(set model_family if the folder is an SD1.5/SDXL variant)")
    return FAMILIES[fam]


def check_weights_present(model_dir: Path, family: ModelFamily, with_vae: bool = True) -> None:
    """Each component folder has a weights file, else from_pretrained fails obscurely later."""
    from library.models.single_file import text_encoder_names
    names = ["unet"] + (["vae"] if with_vae else []) + text_encoder_names(family.name)
    empty = [n for n in names if not any((model_dir / n).glob("*.safetensors")) and
             not any((model_dir / n).glob("*.bin"))]
    if empty:
        raise ModelLoadError(
            f"{KEY}: {model_dir} has no weights in {', '.join(n + '/' for n in empty)}. A "
            "download with ignore_patterns=[\"*.safetensors\"] (as one guide shows) leaves "
            "only configs; download the model again without that pattern.")


def check_model(m) -> tuple[Path, ModelFamily]:
    """Pre-flight for the [model] section, before any data or weights load: the model and
    its family, that a single file has configs and tokenizers, the VAE path, xformers."""
    from library.models.attention import check_xformers
    from library.models.single_file import config_dir_for, text_encoder_names
    from library.models.tokenizers import find_tokenizer_folders
    path = resolve_model_path(m.pretrained_model_name_or_path, allow_pickle=m.allow_pickle)
    family = detect_family(path, m.model_family, allow_pickle=m.allow_pickle)
    if path.is_dir():
        check_weights_present(path, family, with_vae=not m.vae)
    else:
        config_dir = config_dir_for(family.name, m.model_config_dir)
        find_tokenizer_folders(len(text_encoder_names(family.name)),
                               tokenizer_dir=m.tokenizer_dir, config_dir=config_dir,
                               checkpoint=path)
    if m.vae:
        resolve_vae_path(m.vae)
    check_xformers(m)
    return path, family


def _diffusers_parts(model_dir: Path, fam: ModelFamily, weight_dtype: torch.dtype,
                     with_vae: bool) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    parts = {"unet": UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet",
                                                          torch_dtype=weight_dtype)}
    parts["vae"] = AutoencoderKL.from_pretrained(model_dir, subfolder="vae",
                                                 torch_dtype=torch.float32) if with_vae else None
    te_classes = [CLIPTextModel] if fam.name == "sd15" else [CLIPTextModel,
                                                             CLIPTextModelWithProjection]
    parts["text_encoders"], parts["tokenizers"] = [], []
    for i, cls in enumerate(te_classes):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts["text_encoders"].append(cls.from_pretrained(
            model_dir, subfolder=f"text_encoder{suffix}", torch_dtype=weight_dtype))
        parts["tokenizers"].append(CLIPTokenizer.from_pretrained(
            model_dir, subfolder=f"tokenizer{suffix}"))
    # Training noise always follows the DDPM schedule the model was trained with.
    parts["noise_scheduler"] = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    parts["config_dir"] = model_dir
    return parts


def load_components(model: str, *, family: str = "auto", vae: str | None = None,
                    weight_dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype | None = None, no_half_vae: bool = False,
                    model_config_dir: str | None = None, tokenizer_dir: str | None = None,
                    allow_pickle: bool = False) -> Components:
    """Every component of the model. `vae_dtype=None` applies the VAE precision rule
    (library/models/vae.py); a dtype forces it."""
    from library.models.single_file import load_single_file
    path = resolve_model_path(model, allow_pickle=allow_pickle)
    fam = detect_family(path, family, allow_pickle=allow_pickle)
    if path.is_file():
        parts = load_single_file(path, fam.name, model_config_dir=model_config_dir,
                                 tokenizer_dir=tokenizer_dir, allow_pickle=allow_pickle,
                                 weight_dtype=weight_dtype, with_vae=not vae)
    else:
        parts = _diffusers_parts(path, fam, weight_dtype, with_vae=not vae)
    if vae:
        loaded = load_vae(vae, parts["config_dir"] / "vae", allow_pickle=allow_pickle)
    else:
        cfg = dict(parts["vae"].config)
        loaded = LoadedVAE(parts["vae"], cfg.get("force_upcast", True) is False, str(path))
    dtype = vae_dtype or vae_dtype_rule(fam.name, weight_dtype, fp16_safe=loaded.fp16_safe,
                                        no_half_vae=no_half_vae)
    return Components(family=fam, unet=parts["unet"], vae=cast(loaded.model, dtype),
                      text_encoders=parts["text_encoders"], tokenizers=parts["tokenizers"],
                      noise_scheduler=parts["noise_scheduler"], model_path=str(path),
                      vae_path=vae, extra={"vae_fp16_safe": loaded.fp16_safe})


def load_components_for(m, model_path: Path, family: ModelFamily,
                        weight_dtype: torch.dtype) -> Components:
    """`load_components` with the [model] section of a Config."""
    return load_components(str(model_path), family=family.name, vae=m.vae,
                           weight_dtype=weight_dtype, no_half_vae=m.no_half_vae,
                           model_config_dir=m.model_config_dir, tokenizer_dir=m.tokenizer_dir,
                           allow_pickle=m.allow_pickle)
