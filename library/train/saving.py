"""What goes into a saved LoRA: tensors in the requested layout and precision, plus metadata
(kohya's ss_* keys, sai modelspec, our resolved config)."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from pathlib import Path

import torch

from library.config.output import without_secrets
from networks import formats
from networks.file_rules import uniform_alphas
from networks.kohya_file import write_lora
from networks.lora import LoRANetwork

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32,
               "fp32": torch.float32}


def config_json(cfg) -> str:
    """The resolved config as JSON, without secrets (wandb_api_key)."""
    return json.dumps(without_secrets(asdict(cfg)), default=list, sort_keys=True)


# What `no_metadata` keeps of the ss_* keys (sd-scripts' SS_METADATA_MINIMUM_KEYS: what
# UIs need to filter LoRAs by base model and shape); the modelspec.* keys always stay.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                "ss_network_alpha", "ss_network_args")
# The modelspec keys the user sets, as sd-scripts' --metadata_* flags (None: not written).
MODELSPEC_KEYS = ("author", "description", "license", "tags")


def network_identity(lo) -> tuple[str, dict]:
    """(ss_network_module, ss_network_args): a LyCORIS algorithm chosen with [lora]
    network_type is written as LyCORIS writes it (lycoris.kohya, algo=...), so loaders and
    tools that read the metadata know the file."""
    args = dict(lo.network_args)
    algo = lo.network_type
    if algo in (None, "lora", "locon") and lo.network_module == "networks.lora" and \
            not args.get("dora_wd") and not args.get("use_tucker"):
        return lo.network_module, args
    if algo is not None:
        args = {"algo": {"lora": "locon"}.get(algo, algo), **args}
    return "lycoris.kohya", args


def build_metadata(cfg, family, *, steps: int, epoch: int, num_images: int,
                   resolution: tuple[int, int], tag_frequency: dict, bucket_info: dict,
                   seed: int, title: str | None = None) -> dict[str, str]:
    """kohya's ss_* training metadata and the sai modelspec.* keys, as strings.

    modelspec.title is `title`, else metadata_title, else output_name (sd-scripts);
    `no_metadata` keeps only MINIMUM_KEYS and modelspec.*."""
    lo, opt, sv = cfg.lora, cfg.optimizer, cfg.saving
    alpha = lo.network_alpha if lo.network_alpha is not None else lo.network_dim
    module, net_args = network_identity(lo)
    meta = {
        "ss_network_module": module,
        "ss_network_dim": lo.network_dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(net_args),
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": Path(cfg.model.pretrained_model_name_or_path).name,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_num_train_images": num_images,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_learning_rate": opt.learning_rate,
        "ss_unet_lr": opt.unet_lr if opt.unet_lr is not None else opt.learning_rate,
        "ss_text_encoder_lr": opt.text_encoder_lr if opt.text_encoder_lr is not None
        else opt.learning_rate,
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_optimizer": opt.optimizer_type,
        "ss_max_train_steps": steps,
        "ss_train_batch_size": cfg.dataset.train_batch_size,
        "ss_gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
        "ss_mixed_precision": cfg.training.mixed_precision,
        "ss_clip_skip": cfg.model.clip_skip,
        "ss_noise_offset": cfg.training.noise_offset,
        "ss_min_snr_gamma": cfg.training.min_snr_gamma,
        "ss_seed": seed,
        "ss_v2": False,
        "ss_network_train_unet_only": lo.network_train_unet_only,
        "ss_network_train_text_encoder_only": lo.network_train_text_encoder_only,
        "ss_output_name": cfg.saving.output_name,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_prior_loss_weight": cfg.dataset.prior_loss_weight,
        "ss_training_comment": sv.training_comment,
        "ss_scale_weight_norms": opt.scale_weight_norms,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family.name == "sdxl" else "diffusers",
        "modelspec.title": title or sv.metadata_title or sv.output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if cfg.model.v_parameterization else "epsilon",
        "tomlora_config": config_json(cfg),
    }
    meta.update({f"modelspec.{k}": getattr(sv, f"metadata_{k}") for k in MODELSPEC_KEYS
                 if getattr(sv, f"metadata_{k}") is not None})
    if sv.no_metadata:
        meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS or
                k.startswith("modelspec.")}
    return {k: ("None" if v is None else str(v)) for k, v in meta.items()}


def save_lora(network: LoRANetwork, path: Path, *, precision: str, layout: str, family: str,
              unet_config: dict, metadata: dict[str, str]) -> Path:
    """Write the LoRA; `layout` "safetensors" = kohya keys, "diffusers" = peft keys.

    Per-module alphas (kohya's block_alphas, or alpha = rank with per-block ranks) are baked
    into lora_up in fp32 before the cast, leaving one alpha per part (LORA_FORMAT.md)."""
    tensors = uniform_alphas(network.kohya_state_dict(torch.float32))
    tensors = {k: v.to(SAVE_DTYPES[precision]).contiguous() for k, v in tensors.items()}
    if layout == "diffusers":
        tensors, _ = formats.kohya_to_peft(tensors, family, unet_config)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_lora(path, tensors, metadata)
    return path


def tag_frequency(items) -> dict:
    """kohya's ss_tag_frequency: per folder, how often each comma-separated tag occurs."""
    freq: dict[str, dict[str, int]] = {}
    for it in items:
        tags = freq.setdefault(it.folder, {})
        caption = it.caption if isinstance(it.caption, str) else " ".join(it.caption)
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    return freq


def bucket_info(dataset) -> dict:
    counts: dict[str, int] = {}
    for b, n in zip(dataset.buckets, dataset.repeats):
        counts[f"{b[0]}x{b[1]}"] = counts.get(f"{b[0]}x{b[1]}", 0) + n
    return {"buckets": counts}


def fingerprint(cfg) -> str:
    """Hash of the resolved config, stored in training states to warn on changed resumes."""
    import hashlib
    return hashlib.sha256(config_json(cfg).encode()).hexdigest()[:16]
