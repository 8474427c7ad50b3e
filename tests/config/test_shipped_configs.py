"""Every TOML file under configs/ loads, and seed 002's kohya config (the Paperspace SDXL
guide) loads as the guide runs it."""
from __future__ import annotations

import shlex
import shutil
import tomllib
from pathlib import Path

import pytest

from library.config import schema
from tests.config.helpers import REPO, load, planned_keys, planned_xfail, problems_if_any

CONFIGS = REPO / "configs"
SEED_002 = CONFIGS / "examples" / "seed_002_sdxl.toml"
SEED_002_PROMPTS = CONFIGS / "examples" / "seed_002_sample_prompts.txt"

# Every shipped config, relative to configs/. Adding a config: add it here and bump the count.
SHIPPED = [
    "examples/sd15_character_ema.toml",
    "examples/sdxl_lokr_character.toml",
    "examples/seed_002_sdxl.toml",
    "examples/tiny_demo.toml",
    "presets/fast.toml",
    "presets/fast_compile.toml",
    "presets/lowmem.toml",
]
SHIPPED_COUNT = 7
PLANNED_REASON = "sampling lands with issue 8"


def shipped_files() -> list[str]:
    return sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.toml"))


def file_keys(path) -> list[str]:
    """Every key of a TOML config, at the top level or in a section."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    keys = []
    for name, value in data.items():
        if name in ("base", "config_version"):
            continue
        is_section = isinstance(value, dict) and name not in schema.key_homes()
        keys.extend(value if is_section else [name])
    return keys


def planned_in(name: str) -> tuple[str, ...]:
    """The keys of a shipped config that the schema marks as planned (not implemented yet):
    such a config is expected to be refused on these keys alone until they land."""
    return planned_keys(file_keys(CONFIGS / name))


def test_every_shipped_config_is_listed():
    assert shipped_files() == sorted(SHIPPED)
    assert len(shipped_files()) == SHIPPED_COUNT


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=planned_xfail(planned_in(name), PLANNED_REASON))
    for name in SHIPPED])
def test_shipped_config_loads(name):
    # check_paths=False: their paths are relative to where they are run from.
    load(["--config_file", CONFIGS / name])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_fails_only_on_its_planned_keys(name):
    found = problems_if_any(["--config_file", CONFIGS / name])
    planned = planned_in(name)
    assert len(found) == len(planned), found
    for key, msg in zip(planned, found):
        assert f"] {key}: is not supported by this version of tomlora yet" in msg


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_without_its_planned_keys(name):
    load(["--config_file", CONFIGS / name, *[f"--set={k}=none" for k in planned_in(name)]])


# ---- seed 002 --------------------------------------------------------------------------------

# The guide's config.toml as parsed TOML; only the two model paths may be changed.
SEED_002_DATA = {
    "model_arguments": {
        "pretrained_model_name_or_path": "./models/stable-diffusion-xl-base-1.0",
        "vae": "./models/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors",
    },
    "dataset_arguments": {
        "resolution": 1024, "batch_size": 1, "max_train_steps": 1500, "learning_rate": 1e-4,
        "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 100,
    },
    "training_arguments": {
        "output_dir": "./output", "output_name": "my_lora", "save_precision": "fp16",
        "mixed_precision": "fp16", "gradient_checkpointing": True,
        "gradient_accumulation_steps": 4,
    },
    "lora_arguments": {
        "network_module": "networks.lora", "network_dim": 64, "network_alpha": 32,
        "network_train_unet_only": False, "network_train_text_encoder_only": False,
    },
    "optimizer_arguments": {
        "optimizer_type": "AdamW8bit", "learning_rate": 1e-4, "max_grad_norm": 1.0,
    },
    "sample_arguments": {
        "sample_every_n_steps": 250, "sample_prompts": "./sample_prompts.txt",
    },
}
SEED_002_PROMPT_LINES = [
    "mysubject person, portrait, high quality",
    "mysubject person walking in a park",
    "mysubject person, professional headshot",
    "close-up of mysubject person smiling",
]
SEED_002_COMMAND = ('--config_file config.toml --train_data_dir "./training_data" '
                    '--logging_dir "./logs" --log_with tensorboard')
SEED_002_PLANNED = planned_in("examples/seed_002_sdxl.toml")


def test_seed_002_is_the_guides_config():
    data = tomllib.loads(SEED_002.read_text(encoding="utf-8"))
    model_paths = ("pretrained_model_name_or_path", "vae")
    for key in model_paths:
        assert isinstance(data["model_arguments"].get(key), str)
    strip = lambda d: {s: {k: v for k, v in keys.items()  # noqa: E731
                           if not (s == "model_arguments" and k in model_paths)}
                       for s, keys in d.items()}
    assert strip(data) == strip(SEED_002_DATA)
    assert list(data) == list(SEED_002_DATA)  # section order too


def test_seed_002_prompts():
    lines = [ln for ln in SEED_002_PROMPTS.read_text(encoding="utf-8").splitlines() if ln]
    assert lines == SEED_002_PROMPT_LINES


@pytest.fixture
def seed_002_run(tmp_path, monkeypatch):
    """The guide's working directory: config.toml, sample_prompts.txt, training_data/."""
    shutil.copy(SEED_002, tmp_path / "config.toml")
    shutil.copy(SEED_002_PROMPTS, tmp_path / "sample_prompts.txt")
    (tmp_path / "training_data" / "10_mysubject person").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return shlex.split(SEED_002_COMMAND)


def test_seed_002_command_line_fails_only_on_planned_keys(seed_002_run):
    for check_paths in (False, True):
        found = problems_if_any(seed_002_run, check_paths=check_paths)
        assert len(found) == len(SEED_002_PLANNED), found
        for key, msg in zip(SEED_002_PLANNED, found):
            assert msg.startswith(f"{Path('config.toml').resolve()}: [sample_arguments] {key}: "
                                  "is not supported")


def test_seed_002_everything_else_loads(seed_002_run):
    argv = seed_002_run + [f"--set={k}=none" for k in SEED_002_PLANNED]
    loaded = load(argv, check_paths=True)
    check_seed_002(loaded.config)
    # seven keys sit outside their canonical section (max_train_steps under
    # [dataset_arguments], output_dir under [training_arguments], ...): one summary line,
    # and learning_rate, given twice with the same value, warns nothing.
    assert loaded.warnings == (
        f"{Path('config.toml').resolve()}: read 24 keys from 6 tables as sd-scripts does (by "
        'name, whatever the table) (docs/CONFIG.md, "Coming from sd-scripts")',)


@planned_xfail(SEED_002_PLANNED, PLANNED_REASON)
def test_seed_002_loads(seed_002_run):
    cfg = load(seed_002_run, check_paths=True).config
    check_seed_002(cfg)
    assert cfg.sample.sample_every_n_steps == 250


def check_seed_002(cfg):
    assert cfg.model.pretrained_model_name_or_path.endswith("stable-diffusion-xl-base-1.0")
    assert cfg.model.vae.endswith("diffusion_pytorch_model.safetensors")
    assert cfg.dataset.resolution == (1024, 1024)
    assert cfg.dataset.train_batch_size == 1  # batch_size
    assert cfg.dataset.train_data_dir == "./training_data"
    assert cfg.training.max_train_steps == 1500
    assert cfg.training.mixed_precision == "fp16"
    assert cfg.training.gradient_checkpointing is True
    assert cfg.training.gradient_accumulation_steps == 4
    assert cfg.optimizer.learning_rate == 1e-4
    assert cfg.optimizer.lr_scheduler == "cosine_with_restarts"
    assert cfg.optimizer.lr_warmup_steps == 100
    assert cfg.optimizer.optimizer_type == "AdamW8bit"
    assert cfg.optimizer.max_grad_norm == 1.0
    assert cfg.saving.output_dir == "./output"
    assert cfg.saving.output_name == "my_lora"
    assert cfg.saving.save_precision == "fp16"
    assert (cfg.lora.network_dim, cfg.lora.network_alpha) == (64, 32.0)
    assert not cfg.lora.network_train_unet_only
    assert not cfg.lora.network_train_text_encoder_only
    assert cfg.sample.sample_prompts == "./sample_prompts.txt"
    assert cfg.logging.logging_dir == "./logs"
    assert cfg.logging.log_with == "tensorboard"
