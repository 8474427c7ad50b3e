"""Checks across keys, run after typing; each message names where the key was set.

A key whose own value was already refused (``layers.failed``) is left out of these checks,
so one mistake gives one message. ``check_paths=False`` skips only the checks that need the
run's files: required paths and the existence of folders and files.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

from library.config.loader import Layers, locate
from library.config.schema import Config
from library.config.validate_training import check_training_keys


def validate(cfg: Config, layers: Layers, *, check_paths: bool = True) -> None:
    p = layers.problems

    def ok(*keys: str) -> bool:
        return not any(k in layers.failed for k in keys)

    d, lo = cfg.dataset, cfg.lora
    if check_paths:
        check_path_keys(cfg, layers, ok)
    check_training_keys(cfg, layers, ok, check_env=check_paths)
    if d.dataset_config and d.subsets:
        p.append(f"{locate(layers, 'subsets')}: the config has both subsets and "
                 "dataset_config; keep one of them")
    if lo.dim_from_weights and not lo.network_weights:
        p.append(f"{locate(layers, 'dim_from_weights')}: needs network_weights (the LoRA "
                 "file to take the modules, ranks and alphas from)")
    if lo.network_train_unet_only and lo.network_train_text_encoder_only:
        p.append(f"{locate(layers, 'network_train_text_encoder_only')}: contradicts "
                 "network_train_unet_only = true; set at most one of them")
    if d.cache_text_encoder_outputs or d.cache_text_encoder_outputs_to_disk:
        te_key = "cache_text_encoder_outputs" if d.cache_text_encoder_outputs else \
            "cache_text_encoder_outputs_to_disk"  # to_disk implies caching
        if not lo.network_train_unet_only and ok("network_train_unet_only"):
            p.append(f"{locate(layers, te_key)}: needs frozen text encoders; also set "
                     "network_train_unet_only = true")
        for key in VARYING_CAPTION_KEYS:
            if getattr(d, key):
                p.append(f"{locate(layers, te_key)}: cannot cache captions that change "
                         f"every epoch ({key} is set); turn one off")
    if d.resolution is not None and min(d.resolution) <= 0:
        p.append(f"{locate(layers, 'resolution')}: {min(d.resolution)} is not a positive "
                 "size; use e.g. 512 (SD1.5) or 1024 (SDXL)")
    if d.min_bucket_reso and d.max_bucket_reso and d.min_bucket_reso > d.max_bucket_reso:
        p.append(f"{locate(layers, 'min_bucket_reso')}: {d.min_bucket_reso} is larger than "
                 f"max_bucket_reso {d.max_bucket_reso}")
    if d.caption_dropout_rate > 1 or d.caption_tag_dropout_rate > 1:
        key = "caption_dropout_rate" if d.caption_dropout_rate > 1 else \
            "caption_tag_dropout_rate"
        p.append(f"{locate(layers, key)}: a probability must be between 0 and 1")
    if check_paths and cfg.logging.log_with in ("wandb", "all") and \
            importlib.util.find_spec("wandb") is None:
        p.append(f"{locate(layers, 'log_with')}: {cfg.logging.log_with!r} needs the wandb "
                 "package: pip install wandb (or use log_with = \"tensorboard\")")
    name = cfg.saving.output_name
    if "/" in name or "\\" in name or name in ("", ".", "..") or ".." in name:
        p.append(f"{locate(layers, 'output_name')}: {name!r} is a file name stem, not a path "
                 "(no '/', '\\' or '..'); put the folder in output_dir")
    w = cfg.optimizer.lr_warmup_steps
    if w >= 1 and not float(w).is_integer():
        p.append(f"{locate(layers, 'lr_warmup_steps')}: {w} is neither a whole number of "
                 "steps nor a fraction below 1")


def round_resolution(cfg: Config, layers: Layers) -> Config:
    """A resolution that is not a multiple of bucket_reso_steps (with buckets) or of 8 is
    rounded down to one, with a warning: sd-scripts runs such a config, its largest bucket
    being the multiple of the step within the resolution's area."""
    d = cfg.dataset
    if d.resolution is None or min(d.resolution) <= 0 or \
            not all(k not in layers.failed for k in ("resolution", "bucket_reso_steps")):
        return cfg
    step = d.bucket_reso_steps if d.enable_bucket else 8
    rounded = tuple(max(step, side // step * step) for side in d.resolution)
    if rounded == tuple(d.resolution):
        return cfg
    why = "bucket_reso_steps" if d.enable_bucket else "sizes are multiples of 8 for the VAE"
    layers.warnings.append(
        f"{locate(layers, 'resolution')}: {d.resolution[0]}x{d.resolution[1]} is not a "
        f"multiple of {step} ({why}); training at {rounded[0]}x{rounded[1]}")
    return replace(cfg, dataset=replace(d, resolution=rounded))


# sd-scripts refuses bucket sides that its UNet cannot halve down to its innermost block:
# bucket_reso_steps must divide by 64 for SD1.5 (train_network.py) and by 32 for SDXL
# (sdxl_train_network.py), when buckets are on.
BUCKET_STEP_OF_FAMILY = {"sd15": 64, "sdxl": 32}


def bucket_step(family: str, config_dir: Path | None = None) -> int | None:
    """The multiple bucket sides must be: the VAE's downscale times the UNet's (8 x 8 = 64
    for SD1.5, 8 x 4 = 32 for SDXL, sd-scripts' numbers), read from the model's config files
    when `config_dir` (a diffusers layout) has them, so smaller test models get theirs."""
    try:
        vae = json.loads((config_dir / "vae" / "config.json").read_text())
        unet = json.loads((config_dir / "unet" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1) * \
            2 ** (len(unet["down_block_types"]) - 1)
    except (TypeError, OSError, ValueError, KeyError):
        return BUCKET_STEP_OF_FAMILY.get(family)


def family_problems(cfg: Config, family: str, config_dir: Path | None = None) -> list[str]:
    """Checks that need the model family (known once the model is found, before it loads)."""
    d, step = cfg.dataset, bucket_step(family, config_dir)
    if not (d.enable_bucket and step and d.bucket_reso_steps % step):
        return []
    nearest = max(step, round(d.bucket_reso_steps / step) * step)
    return [f"[dataset] bucket_reso_steps: {d.bucket_reso_steps} is not a multiple of {step}, "
            f"which {family} buckets need (sd-scripts refuses it too); use {nearest}"]


# [dataset] keys under which a caption changes from step to step: its text-encoder output
# cannot be cached (checked here for `true`, read by library/data/auto_cache.py when unset).
VARYING_CAPTION_KEYS = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                        "token_warmup_step")


def check_path_keys(cfg: Config, layers: Layers, ok) -> None:
    """Required paths and paths that must exist (relative to the working directory)."""
    p = layers.problems
    m, d, s = cfg.model, cfg.dataset, cfg.saving
    required = not layers.incomplete
    if not m.pretrained_model_name_or_path and required and ok("pretrained_model_name_or_path"):
        p.append(f"{locate(layers, 'pretrained_model_name_or_path')}: required; set it to a "
                 "diffusers model folder")
    if d.subsets:
        pass  # their folders are checked by the dataset reader (library/data)
    elif d.dataset_config:
        if not Path(d.dataset_config).is_file():
            p.append(f"{locate(layers, 'dataset_config')}: file {d.dataset_config!r} not "
                     "found")
    elif not d.train_data_dir:
        if required and ok("train_data_dir"):
            p.append(f"{locate(layers, 'train_data_dir')}: required; set it to your image "
                     "folder (N_name class subfolders, or images with metadata.csv)")
    elif not Path(d.train_data_dir).is_dir():
        p.append(f"{locate(layers, 'train_data_dir')}: folder {d.train_data_dir!r} does not "
                 "exist")
    if d.reg_data_dir and not Path(d.reg_data_dir).is_dir():
        p.append(f"{locate(layers, 'reg_data_dir')}: folder {d.reg_data_dir!r} does not exist")
    if cfg.sample.sample_prompts and not Path(cfg.sample.sample_prompts).is_file():
        p.append(f"{locate(layers, 'sample_prompts')}: file {cfg.sample.sample_prompts!r} not "
                 "found")
    if cfg.lora.network_weights and not Path(cfg.lora.network_weights).is_file():
        p.append(f"{locate(layers, 'network_weights')}: LoRA file "
                 f"{cfg.lora.network_weights!r} not found")
    if s.resume and s.resume != "latest" and not Path(s.resume).is_dir():
        p.append(f"{locate(layers, 'resume')}: state folder {s.resume!r} not found")
