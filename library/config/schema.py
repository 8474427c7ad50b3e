"""The one typed schema of a training run.

One frozen dataclass per section ([training], the largest, in schema_training.py); every
field has a type, a default and a docstring (the ``doc`` metadata, written with `opt()` of
fields.py). Defaults live here and nowhere else. Derived values are functions in
``library.config.derived``; the Config is never mutated.

Field metadata keys:
  doc      what the key means, with its unit
  aliases  other names accepted for the key (kohya dataset-config or diffusers-script names)
  choices  the closed set of valid values (checked case-insensitively for strings)
  planned  the key is known but not implemented yet: setting it to a non-default value is a
           config error that says so, instead of being silently ignored
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from library.config.fields import opt
from library.config.schema_training import TrainingConfig
from library.train.optimizers import OPTIMIZER_NAMES
from library.train.samplers import SAMPLER_NAMES
from library.train.schedulers import SCHEDULES

CONFIG_VERSION = 1

# A float, or a list of floats (one per text encoder): text_encoder_lr. The name is the key
# of its converter in library/config/values.py.
FloatOrPair = Any


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str = opt(
        "", "Base model: a diffusers folder, a Hugging Face cache folder, a hub id already in "
        "the local cache, or a single-file `.safetensors` checkpoint (docs/MODELS.md). "
        "Required.")
    vae: Optional[str] = opt(None, "Replacement VAE: a diffusers VAE folder, a diffusers-format "
                             "weights file or an LDM VAE file (docs/MODELS.md).")
    model_family: str = opt("auto", "Model family; `auto` detects it from the model files.",
                            choices=("auto", "sd15", "sdxl"))
    model_config_dir: Optional[str] = opt(
        None, "Diffusers-layout folder whose configs and tokenizers describe a single-file "
        "checkpoint (default: the SD1.5/SDXL configs in configs/models/).")
    tokenizer_dir: Optional[str] = opt(None, "CLIP tokenizer folder (or a diffusers model "
                                       "folder) for single-file checkpoints.")
    allow_pickle: bool = opt(False, "Allow `.ckpt` (pickle) checkpoints; read with "
                             "torch.load(weights_only=True).")
    v_parameterization: bool = opt(False, "Train with v-prediction targets (SD2.x-v style).")
    clip_skip: int = opt(1, "Use the output of the N-th text-encoder layer from the end "
                         "(1 = last layer). SDXL always uses the penultimate layer.", minimum=1)
    max_token_length: int = opt(75, "Caption length in tokens; 150 and 225 encode 75-token "
                                "chunks (kohya).", choices=("75", "150", "225"))
    no_half_vae: bool = opt(False, "Keep the VAE in fp32 under mixed precision (SDXL's "
                            "original VAE always is; docs/MODELS.md).")
    xformers: bool = opt(False, "Use xformers memory-efficient attention (GPU extra).",
                         aliases=("enable_xformers_memory_efficient_attention",))
    sdpa: bool = opt(True, "Use torch scaled-dot-product attention (the default).")
    sdpa_backend: str = opt("auto", "Which SDPA kernel to prefer on CUDA: `auto` (cuDNN "
                            "first on compute capability 9.0 and newer, else torch's order), "
                            "`torch` (torch's order: flash, then memory-efficient), `cudnn`, "
                            "`flash`, `efficient` or `math`; a shape the preferred kernel "
                            "cannot run falls back to the next. Ignored on CPU.",
                            choices=("auto", "torch", "cudnn", "flash", "efficient", "math"))
    fp8_base: bool = opt(False, "Store the frozen UNet weights as float8_e4m3fn, computed "
                         "in the mixed_precision dtype (CUDA only; skipped on CPU).")


@dataclass(frozen=True)
class DatasetConfig:
    train_data_dir: Optional[str] = opt(
        None, "Training images: a folder of `N_name class` subfolders (N = repeats), or a "
        "folder with images and `metadata.csv`/`metadata.jsonl`.")
    reg_data_dir: Optional[str] = opt(None, "Regularization images, same layout as "
                                      "train_data_dir.")
    dataset_config: Optional[str] = opt(
        None, "kohya dataset TOML ([general] / [[datasets]] / [[datasets.subsets]]); replaces "
        "train_data_dir and reg_data_dir. See docs/DATASETS.md.")
    subsets: list = opt([], "Image subsets written in the config itself, as "
                        "LoRA_Easy_Training_Scripts writes them: `[[subsets]]` tables with the "
                        "keys of a dataset_config subset (image_dir, num_repeats, class_tokens, "
                        "is_reg, caption options; `name` is a label). Replaces train_data_dir "
                        "and reg_data_dir, like dataset_config.")
    resolution: Optional[tuple] = opt(
        None, "Training resolution as `512`, `\"768,512\"` or `[768, 512]` (width, height); "
        "default is the model family's native size (512 SD1.5, 1024 SDXL).")
    train_batch_size: int = opt(1, "Images per step per process.", aliases=("batch_size",),
                                minimum=1)
    caption_extension: str = opt(".txt", "Caption file extension beside each image.")
    caption_column: str = opt("caption", "Caption column of metadata.csv/jsonl.")
    image_column: str = opt("file_name", "Image file column of metadata.csv/jsonl.")
    enable_bucket: bool = opt(False, "Aspect-ratio buckets instead of one fixed size.")
    min_bucket_reso: Optional[int] = opt(None, "Smallest bucket side in pixels (default "
                                         "resolution/2).", minimum=64)
    max_bucket_reso: Optional[int] = opt(None, "Largest bucket side in pixels (default "
                                         "2 x resolution).", minimum=64)
    bucket_reso_steps: int = opt(64, "Bucket sides are multiples of this (pixels).",
                                 minimum=8)
    bucket_no_upscale: bool = opt(False, "Never upscale small images to a bigger bucket.")
    center_crop: bool = opt(True, "Crop the centre (diffusers `--center_crop`); false "
                            "crops at random, like random_crop.")
    random_crop: bool = opt(False, "Crop at a random position instead of the centre.")
    flip_aug: bool = opt(False, "Random horizontal flips.", aliases=("random_flip",))
    shuffle_caption: bool = opt(False, "Shuffle the comma-separated tags of each caption.")
    keep_tokens: int = opt(0, "Number of leading tags kept in place when shuffling.",
                           minimum=0)
    caption_separator: str = opt(",", "Tag separator for shuffling and dropout.")
    caption_prefix: str = opt("", "Text put before every caption.")
    caption_suffix: str = opt("", "Text put after every caption.")
    caption_dropout_rate: float = opt(0.0, "Probability of training a step with an empty "
                                      "caption.", minimum=0.0)
    caption_tag_dropout_rate: float = opt(0.0, "Probability of dropping each tag.",
                                          minimum=0.0)
    caption_dropout_every_n_epochs: int = opt(0, "Train every N-th epoch with empty "
                                              "captions (0 = never).", minimum=0)
    keep_tokens_separator: str = opt("", "Tags before this separator stay in front (and "
                                     "after a second one, at the end) when shuffling.")
    secondary_separator: str = opt("", "Joins tags that shuffle and drop as one; replaced by "
                                   "caption_separator afterwards.")
    enable_wildcard: bool = opt(False, "Use every line of a caption file (one picked per "
                                "sample) and expand {a|b|c} choices.")
    token_warmup_min: int = opt(1, "Tags used at step 0 of token warmup.", minimum=0)
    token_warmup_step: float = opt(0.0, "Token warmup length in steps (below 1: a fraction "
                                   "of the total steps; 0 = off).", minimum=0.0)
    alpha_mask: bool = opt(False, "Use each image's alpha channel as a loss mask "
                           "(transparent pixels do not train).")
    masked_loss: bool = opt(False, "Weight the loss by a mask image per training image: the "
                            "image of the same name in conditioning_data_dir, its red channel "
                            "(white trains, black does not). See docs/DATASETS.md, Masks.")
    conditioning_data_dir: Optional[str] = opt(
        None, "Folder of mask images for masked_loss (also a subset key of a kohya "
        "dataset_config); each training image needs one with the same file stem.")
    weighted_captions: bool = opt(False, "Parse A1111 attention weights in captions and "
                                  "sample prompts: `(word:1.2)`, `(word)` = x1.1, `[word]` = "
                                  "/1.1; the text-encoder states of those tokens are scaled.")
    in_json: Optional[str] = opt(None, "kohya fine-tuning metadata JSON (image key -> "
                                 "{caption, tags}); its images are in train_data_dir.")
    dataset_repeats: int = opt(1, "Repeats of every image of in_json.", minimum=1)
    color_aug: bool = opt(False, "kohya's colour augmentation.", planned=True)
    prior_loss_weight: float = opt(1.0, "Loss weight of regularization images.", minimum=0.0)
    cache_latents: Optional[bool] = opt(None, "Encode every image with the VAE once, "
                                        "before training (centre crop: random_crop is "
                                        "ignored; flip_aug caches both mirror images). "
                                        "Unset: on unless random_crop is used "
                                        "(docs/DATASETS.md, Caches).")
    cache_latents_to_disk: bool = opt(False, "Also keep cached latents on disk (beside each "
                                      "image, or in cache_dir), keyed by image content, "
                                      "crop, flip, VAE and dtype; implies cache_latents.")
    cache_dir: Optional[str] = opt(None, "Folder for the disk caches (default: latents "
                                   "beside each image, text-encoder outputs in "
                                   "train_data_dir/.tomlora_te_cache).")
    cache_text_encoder_outputs: Optional[bool] = opt(
        None, "Encode every caption once (frozen text encoders, static captions only). "
        "Unset: on when the text encoders are frozen and every caption is static "
        "(docs/DATASETS.md, Caches).")
    cache_text_encoder_outputs_to_disk: bool = opt(
        False, "Also keep cached text-encoder outputs on disk, one te_*.npz file per "
        "caption (in cache_dir, else in train_data_dir/.tomlora_te_cache) keyed by caption, "
        "clip_skip, max_token_length, text encoders and dtype; implies "
        "cache_text_encoder_outputs.")
    vae_batch_size: int = opt(1, "Images per VAE call when caching latents.", minimum=1)
    max_data_loader_n_workers: int = opt(0, "Accepted for kohya compatibility; tomlora "
                                         "loads data in the main process (latents are "
                                         "cached), so it has no effect.",
                                         aliases=("dataloader_num_workers",), minimum=0)
    skip_bad_images: bool = opt(False, "Skip unreadable or too-small images with a warning "
                                "instead of stopping.")


@dataclass(frozen=True)
class LoraConfig:
    network_module: str = opt("networks.lora", "Network implementation: networks.lora "
                              "(kohya's LoRA/LoCon targets) or lycoris.kohya (LyCORIS's "
                              "algo= and preset= network_args; docs/FORMATS.md).",
                              choices=("networks.lora", "lycoris.kohya"))
    network_type: Optional[str] = opt(None, "Adapter algorithm: lora (= locon), loha, lokr, "
                                      "full, ia3; unset: lora, or network_args algo= with "
                                      "lycoris.kohya. DoRA: network_args dora_wd = true.",
                                      choices=("lora", "locon", "loha", "lokr", "full",
                                               "ia3"))
    network_dim: int = opt(4, "LoRA rank.", aliases=("rank",), minimum=1)
    network_alpha: Optional[float] = opt(
        None, "LoRA alpha; the update is scaled by alpha/rank. Unset means alpha = rank "
        "(scale 1, as the diffusers scripts do; kohya's default is 1).", minimum=0.0,
        exclusive_min=True)
    network_args: dict = opt({}, "Extra network options, as a table or a list of "
                             "\"key=value\" strings: conv_dim, conv_alpha, rank_dropout, "
                             "module_dropout, block_dims, block_alphas, conv_block_dims, "
                             "conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight, "
                             "block_lr_zero_threshold, loraplus_lr_ratio, "
                             "loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio "
                             "(kohya's meaning; docs/FORMATS.md).")
    loraplus_lr_ratio: Optional[float] = opt(None, "LoRA+: lora_up learns at learning rate x "
                                             "this ratio (kohya's top-level flag; overrides "
                                             "the network_args key).", minimum=0.0,
                                             exclusive_min=True)
    loraplus_unet_lr_ratio: Optional[float] = opt(None, "LoRA+ ratio for the UNet only.",
                                                  minimum=0.0, exclusive_min=True)
    loraplus_text_encoder_lr_ratio: Optional[float] = opt(None, "LoRA+ ratio for the text "
                                                          "encoders only.", minimum=0.0,
                                                          exclusive_min=True)
    network_dropout: Optional[float] = opt(None, "Dropout on the LoRA down-projection "
                                           "output.", minimum=0.0)
    network_weights: Optional[str] = opt(
        None, "Start from this LoRA file (kohya or diffusers layout); its modules and shapes "
        "must match this run's exactly.")
    dim_from_weights: bool = opt(False, "Take the LoRA modules, ranks and alphas from "
                                 "network_weights instead of network_dim / network_args.")
    network_train_unet_only: bool = opt(False, "Train LoRA on the UNet only.")
    network_train_text_encoder_only: bool = opt(False, "Train LoRA on the text encoder(s) "
                                                "only.")


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str = opt("AdamW", "Optimizer: a registry name (kohya's names, any case: "
                              + ", ".join(OPTIMIZER_NAMES) + ") or, as in sd-scripts, an "
                              "importable class path (`torch.optim.RAdam`, "
                              "`LoraEasyCustomOptimizer.came.CAME`; a bare name is looked up "
                              "in torch.optim) called with `optimizer_args` as keyword "
                              "arguments; see docs/TRAINING.md.")
    optimizer_args: dict = opt({}, "Extra optimizer arguments, as a table or a list of "
                               "\"key=value\" strings; each optimizer accepts its own "
                               "(docs/TRAINING.md).")
    learning_rate: float = opt(1e-4, "Base learning rate.", minimum=0.0, exclusive_min=True)
    unet_lr: Optional[float] = opt(None, "UNet LoRA learning rate (default learning_rate); "
                                   "0 freezes the UNet LoRA.", minimum=0.0)
    text_encoder_lr: Optional[FloatOrPair] = opt(
        None, "Text-encoder LoRA learning rate (default learning_rate); for SDXL one value "
        "for both encoders or a list of two (TE1, TE2). 0 freezes them.", minimum=0.0)
    lr_scheduler: str = opt("constant", "Learning-rate schedule (with warmup, constant "
                            "means warmup then constant).", choices=SCHEDULES)
    lr_warmup_steps: float = opt(0, "Warmup steps; a value below 1 is a fraction of the "
                                 "total steps.", minimum=0.0)
    lr_scheduler_num_cycles: int = opt(1, "Restarts of cosine_with_restarts.", minimum=1)
    lr_scheduler_power: float = opt(1.0, "Power of the polynomial schedule.")
    lr_scheduler_min_lr_ratio: Optional[float] = opt(
        None, "Final learning rate of cosine_with_min_lr, as a fraction of the base rate "
        "(0.1 typical; required by that schedule).", minimum=0.0)
    lr_scheduler_type: Optional[str] = opt(
        None, "A scheduler class instead of lr_scheduler (sd-scripts): an importable class path "
        "(`transformers.optimization.X`) or a bare name of torch.optim.lr_scheduler "
        "(`StepLR`), called as Class(optimizer, **lr_scheduler_args); it takes no "
        "lr_warmup_steps.")
    lr_scheduler_args: dict = opt({}, "Keyword arguments of lr_scheduler_type, or of the "
                                  "built-in schedule where it takes any (cosine: num_cycles, "
                                  "the number of cosine waves, 0.5 = half a wave; polynomial: "
                                  "lr_end, the final learning rate); a table or a list of "
                                  "\"key=value\" strings.")
    max_grad_norm: float = opt(1.0, "Clip the LoRA gradient norm to this (0 disables).",
                               minimum=0.0)
    scale_weight_norms: Optional[float] = opt(
        None, "Max-norm regularisation (sd-scripts): after each optimizer step, every LoRA "
        "module whose weight update up·down·alpha/rank has a Frobenius norm above this is "
        "scaled down to it; logged as max_norm/keys_scaled, max_norm/max_key_norm and "
        "norm/avg_key_norm. 1 is a usual start; unset or 0 disables.", minimum=0.0)


@dataclass(frozen=True)
class SampleConfig:
    sample_every_n_steps: Optional[int] = opt(None, "Write sample images every N steps "
                                              "(ignored when sample_every_n_epochs is set, "
                                              "as in kohya).", minimum=1)
    sample_every_n_epochs: Optional[int] = opt(None, "Write sample images every N epochs.",
                                               minimum=1)
    sample_at_first: bool = opt(False, "Also sample before training.")
    sample_prompts: Optional[str] = opt(None, "Prompt file (.txt with kohya options, .toml "
                                        "or .json); see docs/SAMPLING.md.")
    sample_sampler: str = opt("ddim", "Sampler for sample images (kohya names accepted).",
                              choices=SAMPLER_NAMES)
    validation_prompt: Optional[str] = opt(None, "One prompt to sample at the end of epochs "
                                           "(diffusers-script flag).")
    num_validation_images: int = opt(4, "Images per validation prompt (seeds seed .. "
                                     "seed+N-1).", minimum=1)
    validation_epochs: Optional[int] = opt(None, "Sample the validation prompt every N "
                                           "epochs (default 1).", minimum=1)


@dataclass(frozen=True)
class SavingConfig:
    output_dir: str = opt("./output", "Folder for the LoRA, states and samples.")
    output_name: str = opt("last", "File name stem of the LoRA.")
    save_model_as: str = opt("safetensors", "`safetensors` (kohya format) or `diffusers` "
                             "(pytorch_lora_weights.safetensors, peft layout).",
                             choices=("safetensors", "diffusers"))
    save_precision: str = opt("fp16", "dtype of the saved LoRA tensors.",
                              choices=("fp16", "bf16", "float", "fp32"))
    save_every_n_steps: Optional[int] = opt(None, "Save an intermediate LoRA every N steps.",
                                            aliases=("checkpointing_steps",), minimum=1)
    save_every_n_epochs: Optional[int] = opt(None, "Save an intermediate LoRA every N "
                                             "epochs.", minimum=1)
    save_last_n_steps: Optional[int] = opt(None, "Keep only the step saves of the last N "
                                           "steps.", minimum=1)
    save_last_n_epochs: Optional[int] = opt(None, "Keep only the last N epoch saves.",
                                            minimum=1)
    save_state: bool = opt(False, "Also write a `-state` folder (LoRA fp32 weights, optimizer, "
                           "scheduler, RNG, position) beside each save, for exact resume.")
    save_state_on_train_end: bool = opt(False, "Write the final `<output_name>-state` folder "
                                        "at the end of training (and on Ctrl-C), even "
                                        "without save_state.")
    save_last_n_steps_state: Optional[int] = opt(None, "Keep only the step state folders of "
                                                 "the last N steps (default: "
                                                 "save_last_n_steps).", minimum=1)
    save_last_n_epochs_state: Optional[int] = opt(None, "Keep only the state folders of the "
                                                  "last N epoch saves (default: "
                                                  "save_last_n_epochs).", minimum=1)
    save_n_epoch_ratio: Optional[int] = opt(None, "Save about N times over the run: every "
                                            "floor(epochs / N) epochs, at least every epoch; "
                                            "overrides save_every_n_epochs.", minimum=1)
    resume: Optional[str] = opt(None, "Resume exactly from this state folder (written with "
                                "save_state), or `latest`: the newest complete state folder "
                                "in output_dir (none: a new run starts, with a warning).",
                                aliases=("resume_from_checkpoint",))
    overwrite: bool = opt(False, "Allow replacing existing outputs of the same name.")
    training_comment: Optional[str] = opt(None, "Free text stored in the LoRA's metadata as "
                                          "ss_training_comment.")
    metadata_title: Optional[str] = opt(None, "modelspec.title of the saved LoRA (default "
                                        "output_name).")
    metadata_author: Optional[str] = opt(None, "modelspec.author of the saved LoRA.")
    metadata_description: Optional[str] = opt(None, "modelspec.description of the saved "
                                              "LoRA.")
    metadata_license: Optional[str] = opt(None, "modelspec.license of the saved LoRA.")
    metadata_tags: Optional[str] = opt(None, "modelspec.tags of the saved LoRA, "
                                       "comma-separated.")
    no_metadata: bool = opt(False, "Save without the training metadata: only the ss_* keys "
                            "sd-scripts keeps for filtering (network module, dim, alpha, args, "
                            "base model version, v2) and the modelspec.* keys.")


@dataclass(frozen=True)
class LoggingConfig:
    logging_dir: Optional[str] = opt(None, "TensorBoard log folder (default "
                                     "<output_dir>/logs).")
    log_with: str = opt("tensorboard", "Logger: tensorboard, wandb (needs `pip install "
                        "wandb`) or all.", aliases=("report_to",),
                        choices=("tensorboard", "wandb", "all"))
    log_prefix: Optional[str] = opt(None, "Prefix of the TensorBoard run name.")
    log_tracker_name: Optional[str] = opt(None, "Run name (default output_name + time).")
    wandb_run_name: Optional[str] = opt(None, "Name of the Weights & Biases run (default the "
                                        "TensorBoard run name); log_with = wandb or all.")
    wandb_api_key: Optional[str] = opt(None, "Log in to Weights & Biases with this key before "
                                       "the run starts (default: the key of `wandb login` or "
                                       "WANDB_API_KEY). Never written to the saved config, "
                                       "the LoRA metadata or TensorBoard.")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    config_version: int = CONFIG_VERSION


# Section name -> dataclass, in the order the docs list them.
SECTIONS: dict[str, type] = {"model": ModelConfig, "dataset": DatasetConfig, "training": TrainingConfig,
            "lora": LoraConfig, "optimizer": OptimizerConfig, "sample": SampleConfig,
            "saving": SavingConfig, "logging": LoggingConfig}

# kohya's section names (and a few from other trainers) accepted as aliases.
SECTION_ALIASES = {
    "model_arguments": "model", "dataset_arguments": "dataset",
    "training_arguments": "training", "lora_arguments": "lora",
    "network_arguments": "lora", "optimizer_arguments": "optimizer",
    "sample_arguments": "sample", "saving_arguments": "saving",
    "logging_arguments": "logging", "sample_prompt_arguments": "sample",
}


def key_homes() -> dict[str, tuple[str, Any]]:
    """Every key (and alias) -> (home section, dataclass field)."""
    homes: dict[str, tuple[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            homes[f.name] = (section, f)
            for alias in f.metadata.get("aliases", ()):
                homes[alias] = (section, f)
    return homes
