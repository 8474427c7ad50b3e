"""The layer order, lowest first (docs/CONFIG.md "Layers"):

defaults < `base` files (relative to the including file, nested, later list entries win)
< the config file < ACCELERATE_MIXED_PRECISION (only when no file sets mixed_precision)
< CLI `--key value` < `--set section.key=value` (always last, whatever its argv position).
"""
from __future__ import annotations

import pytest

from library.config import Config, ConfigError
from tests.config.helpers import load


def test_defaults_without_any_layer():
    loaded = load([])
    assert loaded.config == Config()
    assert loaded.warnings == ()
    assert loaded.config_file is None and loaded.output_config is None


def test_nested_base_files_are_relative_to_the_including_file(write):
    write("presets/b2.toml", """
        [lora]
        network_dim = 2
        network_alpha = 2
        [training]
        seed = 2
        max_train_steps = 22
    """)
    write("presets/b1.toml", """
        base = "b2.toml"          # next to b1.toml, not to the main file or the cwd
        [lora]
        network_dim = 3
        [training]
        seed = 3
    """)
    main = write("run/main.toml", """
        base = ["../presets/b1.toml"]
        [training]
        seed = 4
    """)
    cfg = load(["--config_file", main]).config
    assert cfg.lora.network_dim == 3            # b1 > b2
    assert cfg.lora.network_alpha == 2          # b2 > default
    assert cfg.training.max_train_steps == 22   # b2 > default
    assert cfg.training.seed == 4               # config file > b1
    assert cfg.optimizer.learning_rate == 1e-4  # default


def test_later_base_in_the_list_wins(write):
    write("a.toml", "[lora]\nnetwork_dim = 1\nnetwork_alpha = 1\n")
    write("b.toml", "[lora]\nnetwork_dim = 2\n")
    main = write("main.toml", 'base = ["a.toml", "b.toml"]\n')
    lo = load(["--config_file", main]).config.lora
    assert (lo.network_dim, lo.network_alpha) == (2, 1)


def test_problems_in_a_base_file_name_that_file(write):
    base = write("base.toml", "[lora]\nnetwork_dim = -1\n")
    main = write("main.toml", 'base = "base.toml"\n')
    with pytest.raises(ConfigError) as info:
        load(["--config_file", main])
    assert str(info.value).startswith(f"{base}: [lora] network_dim: value -1 out of range")


def test_cli_flag_beats_config_file(write):
    f = write("c.toml", "[lora]\nnetwork_dim = 8\n")
    assert load(["--config_file", f, "--network_dim", "16"]).config.lora.network_dim == 16
    # argv position does not matter: the file is a layer, not an argument
    assert load(["--network_dim", "16", "--config_file", f]).config.lora.network_dim == 16


@pytest.mark.parametrize("argv", [
    ["--network_dim", "16", "--set", "lora.network_dim=32"],
    ["--set", "lora.network_dim=32", "--network_dim", "16"],
    ["--set", "network_dim=32", "--rank", "16"],
])
def test_set_beats_cli_flag_whatever_the_order(write, argv):
    f = write("c.toml", "[lora]\nnetwork_dim = 8\n")
    assert load(["--config_file", f, *argv]).config.lora.network_dim == 32


def test_last_set_of_a_key_wins():
    cfg = load(["--set", "lora.network_dim=4", "--set", "lora_arguments.network_dim=5"]).config
    assert cfg.lora.network_dim == 5


def test_last_cli_flag_of_a_key_wins_aliases_included():
    assert load(["--network_dim", "4", "--rank", "6"]).config.lora.network_dim == 6


def test_set_values_are_typed():
    cfg = load(["--set", "optimizer.learning_rate=5e-5", "--set", "dataset.resolution=768,512",
                "--set", "training.gradient_checkpointing=true",
                "--set", "lora.network_args=conv_dim=4"]).config
    assert cfg.optimizer.learning_rate == 5e-5
    assert cfg.dataset.resolution == (768, 512)
    assert cfg.training.gradient_checkpointing is True
    assert cfg.lora.network_args == {"conv_dim": 4}


def test_set_none_unsets_an_optional_key(write):
    f = write("c.toml", "[training]\nseed = 3\n")
    assert load(["--config_file", f, "--set", "training.seed=none"]).config.training.seed is None


# ---- accelerate launch --mixed_precision ---------------------------------------------------

def test_accelerate_env_applies_when_nothing_sets_mixed_precision(monkeypatch, write):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    f = write("c.toml", "[lora]\nnetwork_dim = 8\n")
    assert load(["--config_file", f]).config.training.mixed_precision == "fp16"
    assert load([]).config.training.mixed_precision == "fp16"


def test_config_file_beats_accelerate_env(monkeypatch, write):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    f = write("c.toml", '[training]\nmixed_precision = "bf16"\n')
    assert load(["--config_file", f]).config.training.mixed_precision == "bf16"


def test_base_file_beats_accelerate_env(monkeypatch, write):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    write("base.toml", '[training]\nmixed_precision = "no"\n')
    f = write("c.toml", 'base = "base.toml"\n')
    assert load(["--config_file", f]).config.training.mixed_precision == "no"


def test_cli_and_set_beat_accelerate_env(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert load(["--mixed_precision", "bf16"]).config.training.mixed_precision == "bf16"
    assert load(["--set", "training.mixed_precision=no"]).config.training.mixed_precision == "no"


def test_bad_accelerate_env_value_names_its_origin(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError) as info:
        load([])
    assert str(info.value).startswith("accelerate launch --mixed_precision: [training] "
                                      "mixed_precision: invalid value 'fp8'")


def test_accelerate_env_is_normalised(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")
    assert load([]).config.training.mixed_precision == "bf16"
