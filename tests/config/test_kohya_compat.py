"""kohya-ss/sd-scripts habits that must keep working: `--config_file` without `.toml`,
`*_arguments` sections, keys outside their home section, kohya's value spellings, and the
resolved config written by `--output_config` loading back unchanged."""
from __future__ import annotations

from dataclasses import fields

import pytest

from library.config import schema
from library.config.output import config_to_toml
from tests.config.helpers import load, only_problem


def test_config_file_without_toml_suffix(write):
    f = write("my_config.toml", "[lora]\nnetwork_dim = 12\n")
    loaded = load(["--config_file", f.with_suffix("")])
    assert loaded.config.lora.network_dim == 12
    assert loaded.config_file == str(f)


def test_config_file_exact_name_wins_over_added_suffix(write):
    exact = write("cfg", "[lora]\nnetwork_dim = 1\n")
    write("cfg.toml", "[lora]\nnetwork_dim = 2\n")
    assert load(["--config_file", exact]).config.lora.network_dim == 1


# One key of each canonical section, to write under every alias of that section.
SAMPLE_KEY = {
    "model": ("clip_skip", "2", 2),
    "dataset": ("train_batch_size", "3", 3),
    "training": ("gradient_accumulation_steps", "2", 2),
    "lora": ("network_dim", "16", 16),
    "optimizer": ("max_grad_norm", "0.5", 0.5),
    "sample": ("num_validation_images", "2", 2),
    "saving": ("output_name", '"x"', "x"),
    "logging": ("log_prefix", '"p"', "p"),
}


def test_every_section_has_a_sample_key():
    assert set(SAMPLE_KEY) == set(schema.SECTIONS)


@pytest.mark.parametrize("alias, canon", sorted(schema.SECTION_ALIASES.items()))
def test_kohya_section_aliases(write, alias, canon):
    key, toml_value, expected = SAMPLE_KEY[canon]
    f = write("c.toml", f"[{alias}]\n{key} = {toml_value}\n")
    loaded = load(["--config_file", f])
    assert getattr(getattr(loaded.config, canon), key) == expected
    assert loaded.warnings == ()  # an alias of the home section is home


def test_known_key_outside_its_home_gives_one_summary_line(write):
    f = write("c.toml", """
        [dataset_arguments]
        learning_rate = 2e-4
        resolution = 512
    """)
    loaded = load(["--config_file", f])
    assert loaded.config.optimizer.learning_rate == 2e-4
    assert loaded.warnings == (
        f"{f}: read 2 keys from 1 table as sd-scripts does (by name, whatever the table) "
        '(docs/CONFIG.md, "Coming from sd-scripts")',)


def test_key_in_two_tables_later_wins_with_a_warning_naming_both(write):
    # sd-scripts merges the tables in file order, so the later one wins whatever the
    # section names; differing values are worth a warning.
    f = write("c.toml", """
        [optimizer_arguments]
        learning_rate = 3e-4
        [dataset_arguments]
        learning_rate = 1e-4
    """)
    loaded = load(["--config_file", f])
    assert loaded.config.optimizer.learning_rate == 1e-4
    assert loaded.warnings[0] == (
        f"{f}: learning_rate is given twice: [optimizer_arguments] learning_rate = 0.0003 and "
        "[dataset_arguments] learning_rate = 0.0001; the later one is used, as in sd-scripts "
        "(remove one)")
    assert len(loaded.warnings) == 2  # and the summary line


def test_same_value_in_two_tables_is_no_warning(write):
    f = write("c.toml", """
        [dataset_arguments]
        learning_rate = 1e-4
        [optimizer_arguments]
        learning_rate = 0.0001
    """)
    loaded = load(["--config_file", f])
    assert loaded.config.optimizer.learning_rate == 1e-4
    assert not any("given twice" in w for w in loaded.warnings)


def test_top_level_keys_need_no_section(write):
    f = write("c.toml", "network_dim = 8\nlearning_rate = 1e-3\n")
    loaded = load(["--config_file", f])
    assert (loaded.config.lora.network_dim, loaded.config.optimizer.learning_rate) == (8, 1e-3)
    assert loaded.warnings == ()


@pytest.mark.parametrize("toml_value, expected", [
    ("1024", (1024, 1024)),
    ('"1024"', (1024, 1024)),
    ('"1024,768"', (1024, 768)),
    ('"1024, 768"', (1024, 768)),
    ("[1024, 768]", (1024, 768)),
    ("[768]", (768, 768)),
])
def test_resolution_spellings(write, toml_value, expected):
    f = write("c.toml", f"[dataset]\nresolution = {toml_value}\n")
    assert load(["--config_file", f]).config.dataset.resolution == expected


@pytest.mark.parametrize("arg, expected", [("1024", (1024, 1024)), ("1024,768", (1024, 768))])
def test_resolution_on_the_command_line(arg, expected):
    assert load(["--resolution", arg]).config.dataset.resolution == expected


def test_batch_size_is_train_batch_size(write):
    f = write("c.toml", "[dataset_arguments]\nbatch_size = 2\n")
    loaded = load(["--config_file", f])
    assert loaded.config.dataset.train_batch_size == 2
    assert loaded.warnings == ()
    assert load(["--batch_size", "5"]).config.dataset.train_batch_size == 5


def test_args_as_list_of_key_value_strings_are_typed(write):
    f = write("c.toml", """
        [network_arguments]
        network_args = ["conv_dim=4", "conv_alpha=0.5", "dropout=False", "algo=locon",
                        "preset = full"]
        [optimizer_arguments]
        optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.99)", "amsgrad=True",
                          "eps=1e-8"]
    """)
    cfg = load(["--config_file", f]).config
    assert cfg.lora.network_args == {"conv_dim": 4, "conv_alpha": 0.5, "dropout": False,
                                     "algo": "locon", "preset": "full"}
    assert type(cfg.lora.network_args["conv_dim"]) is int
    assert cfg.optimizer.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99],
                                            "amsgrad": True, "eps": 1e-8}


def test_args_as_tables(write):
    f = write("c.toml", """
        [lora]
        network_args = { conv_dim = 4, conv_alpha = 1.5, algo = "lora", dropout = true }
        [optimizer.optimizer_args]
        weight_decay = 0.01
        betas = [0.9, 0.999]
    """)
    cfg = load(["--config_file", f]).config
    assert cfg.lora.network_args == {"conv_dim": 4, "conv_alpha": 1.5, "algo": "lora",
                                     "dropout": True}
    assert cfg.optimizer.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.999]}


def test_args_on_the_command_line():
    cfg = load(["--network_args", "conv_dim=4", "conv_alpha=1",
                "--optimizer_args", "weight_decay=0.1", "--network_dim", "8"]).config
    assert cfg.lora.network_args == {"conv_dim": 4, "conv_alpha": 1}
    assert cfg.optimizer.optimizer_args == {"weight_decay": 0.1}
    assert cfg.lora.network_dim == 8


def test_bad_arg_on_the_command_line():
    msg = only_problem(["--network_args", "conv_dim"])
    assert msg.startswith("command line: [lora] network_args: expected \"key=value\" strings")


def test_bool_flags_bare_or_with_a_value():
    assert load(["--gradient_checkpointing"]).config.training.gradient_checkpointing is True
    assert load(["--gradient_checkpointing", "false"]).config.training.\
        gradient_checkpointing is False
    assert load(["--sdpa=no"]).config.model.sdpa is False


def test_kohya_command_line_overrides_file(write):
    f = write("config.toml", '[training_arguments]\noutput_dir = "./output"\n')
    cfg = load(["--config_file", f.with_suffix(""), "--output_dir", "elsewhere",
                "--logging_dir", "./logs", "--log_with", "tensorboard"]).config
    assert cfg.saving.output_dir == "elsewhere"
    assert cfg.logging.logging_dir == "./logs"


# ---- --output_config round trip -----------------------------------------------------------

ROUND_TRIP = """
    base = "base.toml"
    [model_arguments]
    pretrained_model_name_or_path = "models/sd15"
    clip_skip = 2
    [dataset_arguments]
    resolution = "768,512"
    batch_size = 2
    enable_bucket = true
    learning_rate = 2e-4
    caption_prefix = 'say "hi", '
    [training]
    mixed_precision = "bf16"
    seed = 7
    [lora]
    network_dim = 16
    network_alpha = 8.0
    network_args = ["conv_dim=4", "conv_alpha=1", "algo=lora"]
    [optimizer]
    optimizer_type = "adamw8bit"
    optimizer_args = { weight_decay = 0.01, betas = [0.9, 0.99] }
    lr_scheduler = "cosine_with_restarts"
    lr_warmup_steps = 0.1
    [saving]
    save_every_n_steps = 100
    output_name = "ünïcode name"
"""


def write_resolved(cfg, path):
    """What train_network.py writes for --output_config: write_config_toml is this text,
    written atomically (networks.kohya_file, which imports torch, so not used here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg), encoding="utf-8")


def test_output_config_round_trip(write, tmp_path):
    write("base.toml", "[dataset]\nflip_aug = true\n")
    f = write("c.toml", ROUND_TRIP)
    out = tmp_path / "out" / "resolved.toml"
    loaded = load(["--config_file", f, "--output_config", out, "--network_dim", "32"])
    assert loaded.output_config == str(out)
    write_resolved(loaded.config, out)
    again = load(["--config_file", out])
    assert again.config == loaded.config
    assert again.warnings == ()  # every key is written in its home section
    assert again.config.lora.network_dim == 32
    assert again.config.dataset.flip_aug is True
    assert again.config.dataset.resolution == (768, 512)
    assert again.config.optimizer.optimizer_type == "AdamW8bit"
    # and it is stable: writing the reloaded config gives the same text
    assert config_to_toml(again.config) == out.read_text(encoding="utf-8")


def test_default_config_round_trip(tmp_path):
    out = tmp_path / "defaults.toml"
    cfg = load([]).config
    write_resolved(cfg, out)
    assert load(["--config_file", out]).config == cfg


def test_written_config_lists_every_set_key_in_its_home(tmp_path):
    out = tmp_path / "c.toml"
    write_resolved(load(["--seed", "3"]).config, out)
    import tomllib
    data = tomllib.loads(out.read_text(encoding="utf-8"))
    assert data["config_version"] == schema.CONFIG_VERSION
    for sec, cls in schema.SECTIONS.items():
        names = {f.name for f in fields(cls)}
        assert set(data[sec]) <= names
    assert data["training"]["seed"] == 3
    assert "vae" not in data["model"]  # unset keys are left out (TOML has no null)
