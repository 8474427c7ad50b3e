"""The command line of diffusers' train_text_to_image_lora.py, as seed 000's guide runs it
under `accelerate launch --mixed_precision="fp16"`."""
from __future__ import annotations

import re
import shlex

import pytest

from tests.config.helpers import (load, only_problem, planned_keys, planned_xfail,
                                  problems_if_any)

# Seed 000, verbatim but for the $VARIABLES (filled in by seed_000_argv).
SEED_000 = """
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATA_DIR \\
  --caption_column="caption" \\
  --resolution=512 \\
  --center_crop \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --max_train_steps=4000 \\
  --learning_rate=1e-4 \\
  --rank=8 \\
  --lr_scheduler="cosine" --lr_warmup_steps=0 \\
  --output_dir=$OUTPUT_DIR \\
  --validation_prompt="cute robot and cat" \\
  --seed=1234
"""
# The seed's keys that are planned (known, not implemented yet) in the schema: the command
# line is refused on these alone; validation_prompt was one until sampling landed.
PLANNED_IN_SEED_000 = planned_keys(re.findall(r"--(\w+)", SEED_000))


@pytest.fixture
def seed_000_argv(tmp_path, monkeypatch) -> list[str]:
    """The seed's flags with its paths under tmp_path, parsed as a POSIX shell would."""
    data = tmp_path / "robotcat_dataset"
    data.mkdir()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch does this
    text = (SEED_000.replace("$MODEL_NAME", "runwayml/stable-diffusion-v1-5")
            .replace("$DATA_DIR", str(data))
            .replace("$OUTPUT_DIR", str(tmp_path / "robotcat_lora_output")))
    return shlex.split(text.replace("\\\n", " "))


def test_seed_000_only_problems_are_planned_keys(seed_000_argv):
    found = problems_if_any(seed_000_argv, check_paths=True)
    assert len(found) == len(PLANNED_IN_SEED_000), found
    for key, msg in zip(PLANNED_IN_SEED_000, found):
        assert msg.startswith(f"command line: [sample] {key}: is not supported by this "
                              "version of tomlora yet")


def test_seed_000_values_with_planned_keys_left_out(seed_000_argv, tmp_path):
    argv = seed_000_argv + [f"--set={k}=none" for k in PLANNED_IN_SEED_000]
    check_seed_000(load(argv, check_paths=True).config, tmp_path)


@planned_xfail(PLANNED_IN_SEED_000, reason="sampling lands with issue 8")
def test_seed_000_loads(seed_000_argv, tmp_path):
    cfg = load(seed_000_argv, check_paths=True).config
    check_seed_000(cfg, tmp_path)
    assert cfg.sample.validation_prompt == "cute robot and cat"


def check_seed_000(cfg, tmp_path):
    assert cfg.model.pretrained_model_name_or_path == "runwayml/stable-diffusion-v1-5"
    assert cfg.dataset.train_data_dir == str(tmp_path / "robotcat_dataset")
    assert cfg.dataset.caption_column == "caption"
    assert cfg.dataset.resolution == (512, 512)
    assert cfg.dataset.center_crop is True
    assert cfg.dataset.train_batch_size == 1
    assert cfg.training.gradient_accumulation_steps == 4
    assert cfg.training.max_train_steps == 4000
    assert cfg.optimizer.learning_rate == 1e-4
    assert cfg.lora.network_dim == 8
    assert cfg.lora.network_alpha is None  # alpha = rank, as the diffusers script does
    assert cfg.optimizer.lr_scheduler == "cosine"
    assert cfg.optimizer.lr_warmup_steps == 0
    assert cfg.saving.output_dir == str(tmp_path / "robotcat_lora_output")
    assert cfg.training.seed == 1234
    assert cfg.training.mixed_precision == "fp16"  # from accelerate launch
    # what the diffusers script writes, where the guide's load_lora_weights looks for it
    assert cfg.saving.save_model_as == "diffusers"


@pytest.mark.parametrize("flag, value", [
    ("learning_rate", "1e-4"), ("resolution", "512"), ("rank", "8"), ("lr_scheduler", "cosine"),
    ("lr_warmup_steps", "0"), ("seed", "1234"), ("caption_column", "text"),
    ("network_alpha", "4"), ("mixed_precision", "bf16"), ("report_to", "tensorboard"),
    ("checkpointing_steps", "500"), ("dataloader_num_workers", "2"), ("snr_gamma", "5.0"),
    ("num_train_epochs", "3"), ("center_crop", "false"), ("random_flip", "true"),
])
def test_equals_form_equals_space_form(flag, value):
    assert load([f"--{flag}={value}"]).config == load([f"--{flag}", value]).config


def test_equals_form_keeps_equals_signs_in_the_value():
    cfg = load(["--caption_prefix=a=b", "--network_args", "conv_dim=4"]).config
    assert cfg.dataset.caption_prefix == "a=b"
    assert cfg.lora.network_args == {"conv_dim": 4}


def test_diffusers_aliases():
    cfg = load(["--random_flip", "--checkpointing_steps=500", "--report_to=tensorboard",
                "--dataloader_num_workers=2", "--snr_gamma=5.0", "--num_train_epochs=3"]).config
    assert cfg.dataset.flip_aug is True
    assert cfg.saving.save_every_n_steps == 500
    assert cfg.logging.log_with == "tensorboard"
    assert cfg.dataset.max_data_loader_n_workers == 2
    assert cfg.training.min_snr_gamma == 5.0
    assert cfg.training.max_train_epochs == 3


def test_use_8bit_adam_is_translated():
    assert load(["--use_8bit_adam"]).config.optimizer.optimizer_type == "AdamW8bit"
    assert load(["--use_8bit_adam=false"]).config.optimizer.optimizer_type == "AdamW"


@pytest.mark.parametrize("argv, fragment", [
    (["--dataset_name=lambdalabs/naruto-blip-captions"], "download the dataset"),
    (["--push_to_hub"], "does not upload"),
])
def test_refused_flags_say_what_to_do(argv, fragment):
    msg = only_problem(argv)
    assert msg.startswith(f"command line: {argv[0].split('=')[0]}: ")
    assert fragment in msg


def test_unsupported_logger_is_an_invalid_choice():
    assert "expected one of: tensorboard, wandb, all" in only_problem(["--report_to=mlflow"])


@pytest.mark.parametrize("extra, layout", [
    ([], "diffusers"), (["--output_name", "robotcat"], "safetensors"),
    (["--save_model_as", "safetensors"], "safetensors")])
def test_diffusers_spelling_saves_the_diffusers_file(extra, layout):
    assert load(["--rank", "8", *extra]).config.saving.save_model_as == layout
    assert load(["--network_dim", "8"]).config.saving.save_model_as == "safetensors"
