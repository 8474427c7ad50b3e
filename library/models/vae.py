"""The VAE: from a folder, a diffusers-format weights file or an LDM file; and its dtype.

The rule for half precision (docs/MODELS.md): the original SDXL VAE overflows in fp16 (NaN
latents), so under mixed precision an SDXL VAE runs in fp32 unless it is known to be
fp16-safe: its own config.json says `force_upcast: false` (as madebyollin's
sdxl-vae-fp16-fix does), or its file or folder name says "fp16-fix" / "fp16_fix" (the
seed guides download that file without its config). SD1.5 VAEs run in the training dtype.
`no_half_vae = true` keeps any VAE in fp32.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from library.models.checkpoint_file import read_state_dict
from library.models.errors import ModelLoadError
from library.models.hub import sibling_cache_path
from library.models.strict import cast, load_strict

log = logging.getLogger("tomlora")
_FP16_FIX_NAME = re.compile(r"fp16[-_ ]?fix", re.IGNORECASE)


@dataclass
class LoadedVAE:
    model: object       # diffusers AutoencoderKL, fp32
    fp16_safe: bool
    source: str


def is_ldm_vae(keys) -> bool:
    """LDM VAE names (`encoder.down.0.block.0...`), alone or inside a full checkpoint."""
    return any(k.startswith(("encoder.down.", "first_stage_model.encoder.down.",
                             "vae.encoder.down.")) for k in keys)


def is_diffusers_vae(keys) -> bool:
    return any(k.startswith("encoder.down_blocks.") for k in keys)


def _name_says_fp16_fix(path: Path) -> bool:
    # The whole path: a cache snapshot keeps the name in `models--madebyollin--sdxl-vae-fp16-fix`.
    return bool(_FP16_FIX_NAME.search(str(path)))


def _config_safe(config: dict) -> bool:
    return config.get("force_upcast", True) is False


def vae_from_state(state: dict, config: dict, source: str, config_dir: Path):
    """An fp32 AutoencoderKL from LDM or diffusers-format weights and a diffusers config."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    if is_ldm_vae(state):
        state = convert_ldm_vae_checkpoint(state, config)
    elif not is_diffusers_vae(state):
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        raise ModelLoadError(f"{source}: holds no VAE weights (first keys: {sample})")
    return cast(load_strict(lambda: AutoencoderKL.from_config(config), state, what="VAE",
                            source=source, config_dir=config_dir), torch.float32)


def resolve_vae_path(vae: str) -> Path:
    """The `vae` path, or where snapshot_download(cache_dir=...) put it (library/models/hub)."""
    p = Path(vae).expanduser()
    if p.exists():
        return p
    cached = sibling_cache_path(p)
    if cached is None:
        raise ModelLoadError(f"vae: {p} not found (give a diffusers VAE folder or a "
                             ".safetensors VAE file)")
    log.warning(f"vae: {p} does not exist; using {cached}, where "
                "snapshot_download(cache_dir=...) put that file")
    return cached


def load_vae(vae: str, fallback_config_dir: Path, *, allow_pickle: bool = False) -> LoadedVAE:
    """The `vae` key: a diffusers VAE folder (or a model folder with vae/), or a weights file
    in diffusers or LDM layout. A file without config.json beside it takes the base model's
    VAE config (`fallback_config_dir`), which carries the family's scaling factor."""
    from diffusers import AutoencoderKL
    p = resolve_vae_path(vae)
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (sub / "config.json").is_file():
            raise ModelLoadError(f"vae: {p} has no config.json (give a diffusers VAE folder "
                                 "or a .safetensors VAE file)")
        model = AutoencoderKL.from_pretrained(sub, torch_dtype=torch.float32)
        safe = _config_safe(dict(model.config)) or _name_says_fp16_fix(p)
        return LoadedVAE(model, safe, str(p))
    own = p.parent / "config.json"
    config_dir = p.parent if own.is_file() else fallback_config_dir
    config = AutoencoderKL.load_config(config_dir)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        config_dir, config = fallback_config_dir, AutoencoderKL.load_config(fallback_config_dir)
        own = None
    state = read_state_dict(p, allow_pickle, key="vae")
    model = vae_from_state(state, config, f"vae: {p}", config_dir)
    safe = _name_says_fp16_fix(p) or (own is not None and own.is_file() and
                                      _config_safe(config))
    return LoadedVAE(model, safe, str(p))


def vae_dtype(family: str, weight_dtype: torch.dtype, *, fp16_safe: bool,
              no_half_vae: bool = False) -> torch.dtype:
    """The dtype the VAE runs in (rule in the module docstring)."""
    if no_half_vae or weight_dtype == torch.float32:
        return torch.float32
    if family == "sdxl" and not fp16_safe:
        return torch.float32
    return weight_dtype
