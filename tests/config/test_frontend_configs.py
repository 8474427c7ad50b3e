"""Configs in the style of each front-end run `--dry_run` unchanged (model and data paths
aside) on the tiny models: the kohya_ss GUI's flat file, LoRA_Easy_Training_Scripts' nested
tables with [[subsets]], lora-scripts' sections, sd-scripts' documented *_arguments tables and
free table names. The files are written here from the documented key names."""
from __future__ import annotations

import textwrap
import tomllib

import pytest

import train_network
from library.config.output import config_to_toml
from tests.config.helpers import load
from tests.data.conftest import write_folder

# The kohya_ss GUI writes every key at the top level, sorted, with "" / false / 0 / [] for
# the fields left empty.
GUI = """
adaptive_noise_scale = 0
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
cache_latents_to_disk = false
caption_dropout_every_n_epochs = 0
caption_dropout_rate = 0
caption_extension = ".txt"
clip_skip = 1
color_aug = false
dataset_config = ""
dynamo_backend = "no"
enable_bucket = true
epoch = 2
flip_aug = false
full_fp16 = false
gradient_accumulation_steps = 1
gradient_checkpointing = false
huber_c = 0.1
huber_schedule = "snr"
huggingface_path_in_repo = ""
huggingface_repo_id = ""
huggingface_repo_type = ""
huggingface_repo_visibility = ""
huggingface_token = ""
ip_noise_gamma = 0
keep_tokens = 0
learning_rate = 0.0001
log_tracker_config = ""
log_tracker_name = ""
logging_dir = "{logs}"
loss_type = "l2"
lowram = false
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
lr_scheduler_type = ""
lr_warmup_steps = 0
masked_loss = false
max_bucket_reso = 256
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_epochs = 2
mem_eff_attn = false
metadata_author = ""
metadata_description = ""
metadata_license = ""
metadata_tags = ""
metadata_title = ""
min_bucket_reso = 64
min_snr_gamma = 0
min_timestep = 0
mixed_precision = "fp16"
multires_noise_discount = 0.3
multires_noise_iterations = 0
network_alpha = "4"
network_args = []
network_dim = 8
network_dropout = 0
network_module = "networks.lora"
network_train_text_encoder_only = false
network_train_unet_only = false
network_weights = ""
no_half_vae = false
noise_offset = 0
noise_offset_random_strength = false
noise_offset_type = "Original"
optimizer_args = []
optimizer_type = "AdamW"
output_dir = "{out}"
output_name = "gui_lora"
persistent_data_loader_workers = true
pretrained_model_name_or_path = "{model}"
prior_loss_weight = 1
random_crop = false
reg_data_dir = ""
resolution = "128,128"
resume = ""
sample_prompts = ""
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
save_state = false
save_state_on_train_end = false
scale_v_pred_loss_like_noise_pred = false
scale_weight_norms = 0
sdpa = true
seed = 1234
shuffle_caption = false
text_encoder_lr = 0.00005
train_batch_size = 1
train_data_dir = "{data}"
training_comment = ""
unet_lr = 0.0001
v2 = false
v_parameterization = false
v_pred_like_loss = 0
vae = ""
wandb_api_key = ""
wandb_run_name = ""
weighted_captions = false
xformers = false
"""

# LoRA_Easy_Training_Scripts: [[subsets]], [train_mode] and "<group>.args" /
# "<group>.dataset_args" tables.
LORA_EASY = """
[[subsets]]
name = "alice"
image_dir = "{data}/5_alice woman"
num_repeats = 5
keep_tokens = 1
caption_extension = ".txt"
shuffle_caption = false
flip_aug = true
is_reg = false
color_aug = false
random_crop = false

[[subsets]]
name = "bob"
image_dir = "{data}/2_bob man"
num_repeats = 2
caption_extension = ".txt"

[train_mode]
train_mode = "lora"

[general_args.args]
pretrained_model_name_or_path = "{model}"
sdxl = true
mixed_precision = "bf16"
seed = 23
clip_skip = 2
max_train_epochs = 1
max_data_loader_n_workers = 1
persistent_data_loader_workers = true
max_token_length = 225
prior_loss_weight = 1.0
gradient_checkpointing = true
cache_latents = true
sdpa = true

[general_args.dataset_args]
resolution = 128
batch_size = 1

[network_args.args]
network_dim = 16
network_alpha = 8.0

[optimizer_args.args]
optimizer_type = "AdamW"
lr_scheduler = "cosine"
learning_rate = 0.0001
max_grad_norm = 1.0
warmup_ratio = 0.05

[optimizer_args.args.optimizer_args]
weight_decay = "0.1"
betas = "0.9,0.99"

[saving_args.args]
output_dir = "{out}"
output_name = "easy_lora"
save_precision = "fp16"
save_model_as = "safetensors"
save_every_n_epochs = 1
save_toml = true
save_toml_location = "{out}"

[bucket_args.dataset_args]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 64

[noise_args.args]
noise_offset = 0.03

[logging_args.args]
log_with = "tensorboard"
logging_dir = "{logs}"
"""

# lora-scripts: its own section names, with keys in other sections than ours.
LORA_SCRIPTS = """
[model]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "{model}"

[dataset]
train_data_dir = "{data}"
reg_data_dir = ""
prior_loss_weight = 1
cache_latents = true
shuffle_caption = true
enable_bucket = true

[additional_network]
network_dim = 32
network_alpha = 32
network_train_unet_only = false
network_train_text_encoder_only = false
network_module = "networks.lora"
network_args = []

[optimizer]
unet_lr = 1e-4
text_encoder_lr = 1e-5
optimizer_type = "AdamW"
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_restart_cycles = 1

[training]
resolution = "128,128"
train_batch_size = 1
max_train_epochs = 10
noise_offset = 0.0
keep_tokens = 0
xformers = false
lowram = false
clip_skip = 2
mixed_precision = "fp16"
save_precision = "fp16"

[sample_prompt]
sample_sampler = "euler_a"
sample_every_n_epochs = 5

[saving]
output_name = "ls_lora"
save_every_n_epochs = 2
save_n_epoch_ratio = 0
save_last_n_epochs = 499
save_state = false
save_model_as = "safetensors"
output_dir = "{out}"
logging_dir = "{logs}"
log_prefix = ""

[others]
min_bucket_reso = 64
max_bucket_reso = 256
caption_extension = ".txt"
max_token_length = 225
seed = 1337
"""

# sd-scripts' documented tables (docs/config_README, train_network examples), for SDXL.
SD_SCRIPTS = """
[model_arguments]
pretrained_model_name_or_path = "{model}"
v2 = false

[sdxl_arguments]
cache_text_encoder_outputs = true
no_half_vae = true

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4
network_train_unet_only = true
no_metadata = false

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-4
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 10
max_grad_norm = 1.0

[dataset_arguments]
train_data_dir = "{data}"
resolution = "128,128"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 32
caption_extension = ".txt"
debug_dataset = false

[dreambooth_arguments]
prior_loss_weight = 1.0

[training_arguments]
output_dir = "{out}"
output_name = "sdxl_lora"
train_batch_size = 1
max_train_steps = 20
mixed_precision = "bf16"
gradient_checkpointing = true
persistent_data_loader_workers = true
max_data_loader_n_workers = 2
xformers = false
sdpa = true
lowram = false
seed = 42

[sample_prompt_arguments]
sample_sampler = "euler_a"

[saving_arguments]
save_model_as = "safetensors"
save_precision = "fp16"
save_every_n_steps = 10

[logging_arguments]
logging_dir = "{logs}"
log_with = "tensorboard"
"""

# Free table names, as hand-written configs use them.
CUSTOM = """
[Basics]
pretrained_model_name_or_path = "{model}"
train_data_dir = "{data}"
resolution = 128
seed = 7
max_train_steps = 30

[Save]
output_dir = "{out}"
output_name = "custom_lora"
save_every_n_steps = 10
save_model_as = "safetensors"
logging_dir = "{logs}"

[Network_setup]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2

[Optimizer]
optimizer_type = "AdamW"
learning_rate = 2e-4
lr_scheduler = "cosine"
lr_warmup_steps = 0.1
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.999"]
console_log_simple = true
"""

STYLES = {
    "kohya_ss_gui": ("sd15", GUI),
    "lora_easy_training_scripts": ("sdxl", LORA_EASY),
    "lora_scripts": ("sd15", LORA_SCRIPTS),
    "sd_scripts_arguments": ("sdxl", SD_SCRIPTS),
    "custom_tables": ("sd15", CUSTOM),
}


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_folder(root / "5_alice woman", 2, size=(128, 128), caption="alice woman, smiling")
    write_folder(root / "2_bob man", 1, size=(128, 192), caption="bob man")
    return root


def write_style(tmp_path, data, model, text) -> str:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text).format(model=model, data=data, out=tmp_path / "out",
                                                 logs=tmp_path / "logs"), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("style", STYLES)
def test_front_end_config_runs_dry_run_unchanged(style, tmp_path, data, tiny_sd15_dir,
                                                 tiny_sdxl_dir, capsys):
    family, text = STYLES[style]
    model = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    path = write_style(tmp_path, data, model, text)
    assert train_network.main(["--config_file", path, "--dry_run"]) == 0, \
        capsys.readouterr().err
    assert "Data plan" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # --dry_run writes nothing
    # and the resolved config, written in canonical sections, loads back the same
    loaded = load(["--config_file", path])
    again = tmp_path / "resolved.toml"
    again.write_text(config_to_toml(loaded.config), encoding="utf-8")
    assert load(["--config_file", again]).config == loaded.config


def test_gui_config_values(tmp_path, data, tiny_sd15_dir):
    loaded = load(["--config_file", write_style(tmp_path, data, tiny_sd15_dir, GUI)])
    cfg = loaded.config
    assert (cfg.lora.network_dim, cfg.lora.network_alpha) == (8, 4.0)
    assert cfg.saving.resume is None and cfg.model.vae is None  # "" is unset
    assert cfg.training.min_snr_gamma is None  # 0 is off
    assert cfg.optimizer.optimizer_args == {} and cfg.lora.network_args == {}
    (line,) = loaded.warnings
    assert line.startswith(f"{tmp_path / 'config.toml'}: read 106 keys as sd-scripts does")
    assert "3 have no effect here: epoch (a kohya_ss GUI field" in line
    assert "persistent_data_loader_workers (there are no data-loader worker processes" in line
    assert "read as unset: " in line and "v2" in line
    assert not cfg.optimizer.lr_scheduler_type  # "" is unset


def test_lora_easy_config_values(tmp_path, data, tiny_sdxl_dir, capsys):
    path = write_style(tmp_path, data, tiny_sdxl_dir, LORA_EASY)
    cfg = load(["--config_file", path]).config
    assert cfg.model.model_family == "sdxl"
    assert [s["name"] for s in cfg.dataset.subsets] == ["alice", "bob"]
    assert cfg.optimizer.lr_warmup_steps == 0.05
    assert cfg.optimizer.optimizer_args == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert train_network.main(["--config_file", path, "--dry_run"]) == 0
    out = capsys.readouterr().out
    # 2 images x 5 repeats + 1 image x 2 repeats, as the subsets say
    assert "x   5 repeats" in out and "x   2 repeats" in out


def test_lora_easy_subset_with_a_missing_folder_is_exit_2(tmp_path, data, tiny_sdxl_dir,
                                                          capsys):
    text = LORA_EASY.replace('image_dir = "{data}/2_bob man"', 'image_dir = "{data}/nope"')
    path = write_style(tmp_path, data, tiny_sdxl_dir, text)
    assert train_network.main(["--config_file", path, "--dry_run"]) == 2
    assert "[[subsets]] #2 (bob) image_dir: folder" in capsys.readouterr().err


@pytest.mark.parametrize("family, steps, rc", [("sd15", 32, 2), ("sd15", 128, 0),
                                               ("sdxl", 32, 0), ("sdxl", 48, 2)])
def test_bucket_reso_steps_as_sd_scripts_requires_per_family(tmp_path, data, tiny_sd15_dir,
                                                             tiny_sdxl_dir, capsys, family,
                                                             steps, rc):
    model = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    path = write_style(tmp_path, data, model, CUSTOM)
    argv = ["--config_file", path, "--dry_run", "--enable_bucket", "--bucket_reso_steps",
            str(steps), "--resolution", "128", "--min_bucket_reso", "64",
            "--max_bucket_reso", "256"]
    assert train_network.main(argv) == rc
    if rc:
        need = 64 if family == "sd15" else 32
        assert f"[dataset] bucket_reso_steps: {steps} is not a multiple of {need}" in \
            capsys.readouterr().err


def test_styles_are_valid_toml():
    for _, text in STYLES.values():
        tomllib.loads(textwrap.dedent(text).format(model="m", data="d", out="o", logs="l"))
