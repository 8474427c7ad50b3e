"""Checks across keys, run after typing; each message names where the key was set.

A key whose own value was already refused (``layers.failed``) is left out of these checks,
so one mistake gives one message. ``check_paths=False`` skips only the checks that need the
run's files: required paths and the existence of folders and files.
"""
from __future__ import annotations

import importlib.util
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
    if d.resolution is not None and ok("enable_bucket", "bucket_reso_steps"):
        step = d.bucket_reso_steps if d.enable_bucket else 8
        for side in d.resolution:
            if side <= 0 or side % step:
                p.append(f"{locate(layers, 'resolution')}: {side} is not a positive multiple "
                         f"of {step}" + (" (bucket_reso_steps)" if d.enable_bucket else "")
                         + f"; use e.g. {max(step, round(max(side, 1) / step) * step)}")
                break
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
    if d.dataset_config:
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
