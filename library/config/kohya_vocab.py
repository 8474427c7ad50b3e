"""The kohya vocabulary: every option of sd-scripts' LoRA trainers, every key of its
dataset config and the keys the common front-ends write, each in exactly one state.

  implemented   a schema key or alias (library/config/schema.py), a command-line option of
                our own, or a translation below (`use_8bit_adam = true` -> optimizer_type
                AdamW8bit);
  no effect     accepted and ignored, the reason printed once in the loader's summary line;
  refused       an error naming the key and what to do. Most refusals depend on the value:
                the off value a front-end writes for "not set" (`v2 = false`,
                `huggingface_repo_id = ""`) is accepted, as sd-scripts reads it as unset.

The loader (library/config/loader.py), the command line (cli.py) and the generated
docs/CONFIG.md ("Coming from sd-scripts") all read this module. A name in none of these
lists and not in the schema is a typo: an unknown-key error with a "did you mean".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from library.config import values

# The sd-scripts commit these lists were read from (tests/config/sd_scripts_names.py holds
# its option names as data, so a new sd-scripts option shows up as a failing test).
SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
DOC_LINK = 'docs/CONFIG.md, "Coming from sd-scripts"'

# ---- known, not implemented yet ----------------------------------------------------------
# Accepted with no effect at their off value, refused otherwise, until the branches that add
# them to the schema land; then delete each name from this tuple (a test asserts that
# no name is both here and in the schema).
PENDING_IMPLEMENTATION: tuple[str, ...] = ()
# Off values of pending keys besides the generic ones (unset, "", false, 0, empty list).
PENDING_OFF: dict[str, tuple] = {}

# ---- implemented as a translation --------------------------------------------------------


@dataclass(frozen=True)
class Translation:
    means: str                                 # for the docs: what it becomes
    apply: Callable[[Any], dict[str, Any]]     # value -> {schema key: value}; {} = nothing


def _when_true(key: str, value: Any) -> Callable[[Any], dict[str, Any]]:
    return lambda v: {key: value} if not is_off(v) and values.to_bool(v) else {}


def _warmup_ratio(v: Any) -> dict[str, Any]:
    ratio = values.to_float(v)
    if not 0 <= ratio < 1:
        raise ValueError(f"expected a fraction between 0 and 1, got {v!r}")
    return {"lr_warmup_steps": ratio} if ratio else {}


TRANSLATED: dict[str, Translation] = {
    "caption_extention": Translation("`caption_extension` (sd-scripts' old spelling)",
                                     lambda v: {"caption_extension": v}),
    "use_8bit_adam": Translation("`optimizer_type = \"AdamW8bit\"` when true",
                                 _when_true("optimizer_type", "AdamW8bit")),
    "use_lion_optimizer": Translation("`optimizer_type = \"Lion\"` when true",
                                      _when_true("optimizer_type", "Lion")),
    "debug_dataset": Translation("`dry_run = true` when true (check the data, train nothing)",
                                 _when_true("dry_run", True)),
    "fp8_base_unet": Translation("`fp8_base = true` when true (tomlora's fp8_base stores only "
                                 "the UNet in fp8)", _when_true("fp8_base", True)),
    # front-ends
    "sdxl": Translation("`model_family = \"sdxl\"` when true", _when_true("model_family",
                                                                         "sdxl")),
    "warmup_ratio": Translation("`lr_warmup_steps` as that fraction of the total steps",
                                _warmup_ratio),
}

# Our own command-line options that share sd-scripts' names; in a file they do nothing.
COMMAND_LINE = {
    "config_file": "the TOML config (`.toml` may be omitted)",
    "output_config": "tomlora's `--output_config PATH` writes the resolved config to PATH "
                     "and exits",
}

# ---- accepted with no effect -------------------------------------------------------------
_DEEPSPEED = "a DeepSpeed option, read only with deepspeed = true (refused)"
_HUB = "only used with huggingface_repo_id (refused when set)"
_MODELSPEC = "this model-spec field is not written to the LoRA's metadata"
_CONSOLE = "console output is Python logging at INFO level"
_DDP = "multi-GPU runs average gradients without DDP's wrapper, so DDP options do nothing"

NO_EFFECT: dict[str, str] = {
    "console_log_level": _CONSOLE, "console_log_file": _CONSOLE, "console_log_simple": _CONSOLE,
    "tokenizer_cache_dir": "tokenizers are read from the model (or tokenizer_dir); nothing "
                           "is downloaded",
    "metadata_usage_hint": _MODELSPEC, "metadata_thumbnail": _MODELSPEC,
    "metadata_merged_from": _MODELSPEC, "metadata_trigger_phrase": _MODELSPEC,
    "metadata_preprocessor": _MODELSPEC, "metadata_is_negative_embedding": _MODELSPEC,
    "cache_info": "image sizes are read from the images; there is no size-cache file",
    "skip_cache_check": "caches are keyed by content, so they never need re-checking",
    "resize_interpolation": "images are resized with a fixed filter (area to shrink, "
                            "Lanczos to enlarge)",
    "huggingface_repo_type": _HUB, "huggingface_path_in_repo": _HUB,
    "huggingface_repo_visibility": _HUB, "huggingface_token": _HUB, "async_upload": _HUB,
    "mem_eff_attn": "attention is PyTorch SDPA, already memory-efficient",
    "dynamo_backend": "torch.compile runs with its default backend; set compile = true to "
                      "compile",
    "persistent_data_loader_workers": "there are no data-loader worker processes to keep",
    "ddp_timeout": _DDP, "ddp_gradient_as_bucket_view": _DDP, "ddp_static_graph": _DDP,
    "log_config": "the resolved config is always written beside the LoRA and into its "
                  "metadata",
    "lowram": "models are loaded the same way whatever the RAM",
    "highvram": "memory placement is automatic",
    "zero_stage": _DEEPSPEED, "offload_optimizer_device": _DEEPSPEED,
    "offload_optimizer_nvme_path": _DEEPSPEED, "offload_param_device": _DEEPSPEED,
    "offload_param_nvme_path": _DEEPSPEED, "zero3_init_flag": _DEEPSPEED,
    "zero3_save_16bit_model": _DEEPSPEED, "fp16_master_weights_and_gradients": _DEEPSPEED,
    "fused_backward_pass": "a full fine-tuning option; sd-scripts' LoRA trainers ignore it too",
    "cpu_offload_checkpointing": "activations are not offloaded to the CPU; "
                                 "gradient_checkpointing is the memory option",
    "max_validation_steps": "the validation loss always uses the whole validation set",
    "disable_mmap_load_safetensors": "weights are loaded by safetensors/diffusers as they "
                                     "choose",
    # front-ends: keys they write that sd-scripts ignores too
    "epoch": "a kohya_ss GUI field that sd-scripts ignores too; the length is "
             "max_train_epochs / max_train_steps",
    "noise_offset_type": "a kohya_ss GUI field that sd-scripts ignores too; noise_offset and "
                         "multires_noise_iterations do the work",
    "lr_restart_cycles": "a front-end field that sd-scripts ignores too; restarts are "
                         "lr_scheduler_num_cycles",
    "use_wandb": "a kohya_ss GUI switch that sd-scripts ignores; set log_with = \"wandb\"",
    "lowvram": "a kohya_ss GUI field that sd-scripts ignores too",
    "stop_text_encoder_training": "a kohya_ss GUI DreamBooth field; sd-scripts' LoRA "
                                  "trainers ignore it too",
    "save_toml": "LoRA_Easy_Training_Scripts' own copy of the config; tomlora always writes "
                 "the resolved config beside the LoRA",
    "save_toml_location": "LoRA_Easy_Training_Scripts' own copy of the config",
    "tag_occurrence": "LoRA_Easy_Training_Scripts' tag file; tag frequencies are in the "
                      "LoRA's metadata",
    "tag_file_location": "LoRA_Easy_Training_Scripts' tag file location",
    "model_train_type": "lora-scripts' choice of script; the model family is detected from "
                        "the model",
}

# ---- refused (most only when set) --------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    fix: str                 # what is wrong and what to do
    off: tuple = ()          # values accepted as "not set" besides is_off()
    always: bool = False     # refused whatever the value


_HUB_UPLOAD = ("tomlora does not upload to the Hugging Face Hub; remove it and copy the "
               "LoRA from output_dir yourself")
_DATASET_KEY = ("is a key of one image subset: write it in a [[subsets]] table of this file "
                "(or of a dataset_config file's [[datasets.subsets]]), or use train_data_dir "
                "with N_name folders")
_OTHER_MODEL = Refusal("is an option of sd-scripts' FLUX / SD3 / other-model trainers; "
                       "tomlora trains SD1.5 and SDXL LoRAs: remove it")

REFUSED: dict[str, Refusal] = {
    "v2": Refusal("SD 2.x models are not supported; train an SD1.5 or SDXL model and remove "
                  "v2 (or set it to false)"),
    "face_crop_aug_range": Refusal("face-crop augmentation is not supported; remove it"),
    "network_multiplier": Refusal("is a dataset key of sd-scripts: write it in a [[datasets]] "
                                  "table of a dataset_config file (each dataset's LoRA "
                                  "multiplier), or remove it", off=(1,)),
    "dataset_class": Refusal("custom dataset classes are not supported; use train_data_dir "
                             "or dataset_config"),
    "huggingface_repo_id": Refusal(_HUB_UPLOAD),
    "save_state_to_huggingface": Refusal(_HUB_UPLOAD),
    "resume_from_huggingface": Refusal("states are resumed from a local folder only: "
                                       "download it and set resume to it"),
    "log_tracker_config": Refusal("tracker config files are not read; remove it (the run is "
                                  "named with log_tracker_name / log_prefix)"),
    "deepspeed": Refusal("DeepSpeed is not supported; run several GPUs with "
                         "`accelerate launch --num_processes N train_network.py ...`"),
    "lr_decay_steps": Refusal("the warmup_stable_decay schedule is not available; choose "
                              "another lr_scheduler (docs/TRAINING.md)"),
    "lr_scheduler_timescale": Refusal("the inverse_sqrt schedule is not available; choose "
                                      "another lr_scheduler (docs/TRAINING.md)"),
    "v_pred_like_loss": Refusal("the v-prediction-like loss is not supported; remove it"),
    "base_weights": Refusal("merging LoRAs into the base model before training is not "
                            "supported; merge them into the model first"),
    "base_weights_multiplier": Refusal("merging LoRAs into the base model before training "
                                       "is not supported; merge them into the model first"),
    # dataset-config keys written in the main config (sd-scripts ignores them there)
    "image_dir": Refusal(_DATASET_KEY), "num_repeats": Refusal(_DATASET_KEY, off=(1,)),
    "class_tokens": Refusal(_DATASET_KEY), "is_reg": Refusal(_DATASET_KEY),
    "metadata_file": Refusal(_DATASET_KEY), "custom_attributes": Refusal(_DATASET_KEY),
    "datasets": Refusal("[[datasets]] belong in a dataset config file: move them to their "
                        "own TOML and set dataset_config to its path", always=True),
    # front-ends
    "lora_network_weights": Refusal("an old kohya_ss GUI key that sd-scripts ignores; to "
                                    "start from a LoRA write network_weights instead"),
    "train_inpainting": Refusal("inpainting training is not supported; remove it"),
    "train_mode": Refusal("LoRA_Easy_Training_Scripts' training mode: only \"lora\" is "
                          "supported here", off=("lora",)),
    "dataset_name": Refusal("hub datasets are not read at run time; download the dataset "
                            "and pass --train_data_dir with its folder (images + "
                            "metadata.csv/jsonl)"),
    "push_to_hub": Refusal("tomlora does not upload; copy the LoRA from output_dir yourself"),
}
# Keys of sd-scripts' other trainers (FLUX.1, SD3, Lumina, HunyuanImage, Anima) that the
# kohya_ss GUI and LoRA_Easy_Training_Scripts write when such a model is chosen. (Their
# timestep-sampling keys are implemented for SD: library/train/timesteps.py.)
OTHER_MODEL_KEYS = (
    "ae", "apply_t5_attn_mask", "attn_mode", "blocks_to_swap", "byt5", "clip_g",
    "clip_g_dropout_rate", "clip_l", "clip_l_dropout_rate", "compile_backend",
    "compile_cache_size_limit", "compile_dynamic", "compile_fullgraph",
    "double_blocks_to_swap", "enable_scaled_pos_embed", "fp8_scaled", "fp8_vl", "gemma2",
    "gemma2_max_token_length", "guidance_scale", "llm_adapter_path", "mem_eff_save",
    "model_prediction_type", "model_type", "pos_emb_random_crop_rate", "qwen3",
    "qwen3_max_token_length", "qwen_image_vae_2d", "save_clip", "save_t5xxl",
    "show_timesteps", "show_timesteps_resolution", "single_blocks_to_swap", "split_attn",
    "split_mode", "system_prompt", "t5_dropout_rate", "t5_max_token_length",
    "t5_tokenizer_path", "t5xxl", "t5xxl_device", "t5xxl_dtype", "t5xxl_max_token_length",
    "text_encoder", "text_encoder_batch_size", "text_encoder_cpu",
    "unsloth_offload_checkpointing", "use_flash_attn", "use_sage_attn", "vae_chunk_size",
    "vae_disable_cache", "weighting_scheme",
)
REFUSED.update({k: _OTHER_MODEL for k in OTHER_MODEL_KEYS})

# Names that are not sd-scripts options nor dataset-config keys: which front-end writes them.
FRONT_END_KEYS: dict[str, str] = {
    **{k: "kohya_ss GUI" for k in ("epoch", "noise_offset_type", "use_wandb", "lowvram",
                                   "stop_text_encoder_training", "lora_network_weights",
                                   "train_inpainting") + OTHER_MODEL_KEYS},
    **{k: "LoRA_Easy_Training_Scripts" for k in ("sdxl", "warmup_ratio", "save_toml",
                                                 "save_toml_location", "tag_occurrence",
                                                 "tag_file_location", "train_mode")},
    **{k: "lora-scripts" for k in ("lr_restart_cycles", "model_train_type")},
    **{k: "diffusers example scripts" for k in ("dataset_name", "push_to_hub")},
    # the array of tables of a kohya dataset config ([general] is read like any table)
    "datasets": "sd-scripts dataset config",
}

# Numeric keys of the schema where sd-scripts reads 0 as "off" (a falsy test): 0 is unset.
ZERO_IS_UNSET = ("min_snr_gamma", "network_alpha", "adaptive_noise_scale",
                 "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                 "loraplus_text_encoder_lr_ratio", "save_every_n_steps", "save_every_n_epochs",
                 "save_last_n_steps", "save_last_n_epochs", "save_last_n_steps_state",
                 "save_last_n_epochs_state", "save_n_epoch_ratio", "sample_every_n_steps",
                 "sample_every_n_epochs", "initial_epoch", "ema_decay")


# sd-scripts options that take several values (nargs="*"): a bare `--lr_scheduler_args` is an
# empty list there, where a bare flag of the others means true.
MULTI_VALUE = ("lr_scheduler_args", "base_weights", "base_weights_multiplier")

# ---- reading a value ---------------------------------------------------------------------

def is_off(v: Any) -> bool:
    """The values front-ends write for "not set": none, "", false, 0, [] and {} (and their
    command-line spellings); sd-scripts tests these options for truth."""
    if v is None or v is False or v == [] or v == {}:
        return True
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v == 0
    return isinstance(v, str) and v.strip().lower() in ("", "none", "false", "0", "no", "off")


@dataclass(frozen=True)
class Verdict:
    kind: str                           # "set" | "no_effect" | "off" | "refused"
    reason: str = ""                    # no_effect: why; refused: what to do
    sets: tuple[tuple[str, Any], ...] = ()


def known(name: str) -> bool:
    return name in ALL_NAMES


def judge(name: str, value: Any, *, in_file: bool = True) -> Verdict:
    """What a vocabulary name given `value` does (`known(name)` must hold)."""
    if name in TRANSLATED:
        try:
            sets = TRANSLATED[name].apply(value)
        except ValueError as e:
            return Verdict("refused", str(e))
        return Verdict("set", sets=tuple(sets.items())) if sets else Verdict("off")
    if name in COMMAND_LINE:
        return Verdict("no_effect", "a command-line option; it does nothing in a file")
    if name in NO_EFFECT:
        # `lowram = false` asks for nothing: listed with the unset keys, not as no effect
        return Verdict("off") if is_off(value) else Verdict("no_effect", NO_EFFECT[name])
    if name in PENDING_IMPLEMENTATION:
        if is_off(value) or _matches(value, PENDING_OFF.get(name, ())):
            return Verdict("off")
        return Verdict("refused", "not supported in this build yet (it is being "
                                  "implemented); remove it")
    r = REFUSED[name]
    if not r.always and (is_off(value) or _matches(value, r.off)):
        return Verdict("off")
    return Verdict("refused", r.fix)


def _matches(v: Any, offs: tuple) -> bool:
    for off in offs:
        try:
            if isinstance(off, str) and isinstance(v, str) and v.strip().lower() == off:
                return True
            if isinstance(off, (int, float)) and values.to_float(v) == off:
                return True
        except ValueError:
            continue
    return False


def state_of(name: str) -> str:
    """implemented / no effect / refused / pending, for the docs and the tests."""
    if name in TRANSLATED or name in COMMAND_LINE:
        return "implemented"
    if name in NO_EFFECT:
        return "no effect"
    if name in PENDING_IMPLEMENTATION:
        return "pending"
    if name in REFUSED:
        return "refused"
    raise KeyError(name)


ALL_NAMES = frozenset(TRANSLATED) | frozenset(COMMAND_LINE) | frozenset(NO_EFFECT) | \
    frozenset(REFUSED) | frozenset(PENDING_IMPLEMENTATION)
