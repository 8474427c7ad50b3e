"""Reading configs as sd-scripts does: any table, later table wins with a warning, one
summary line, the three states of the vocabulary (value-dependent refusals included), the
off values front-ends write, type coercions of real files, and the same on the command
line."""
from __future__ import annotations

from dataclasses import fields

import pytest

from library.config import kohya_vocab as vocab
from library.config import schema
from tests.config.helpers import load, only_problem, problems

DOC = '(docs/CONFIG.md, "Coming from sd-scripts")'


# ---- the summary line ----------------------------------------------------------------------

def test_summary_line_counts_keys_and_tables_and_gives_reasons_once(write):
    f = write("c.toml", """
        [Basics]
        pretrained_model_name_or_path = "m"
        lowram = true
        highvram = true
        [Save]
        output_name = "x"
        persistent_data_loader_workers = true
        v2 = false
        huggingface_repo_id = ""
    """)
    loaded = load(["--config_file", f])
    assert loaded.warnings == (
        f"{f}: read 7 keys from 2 tables as sd-scripts does (by name, whatever the table); "
        "3 have no effect here: lowram (models are loaded the same way whatever the RAM); "
        "highvram (memory placement is automatic); persistent_data_loader_workers (there "
        "are no data-loader worker processes to keep); 2 are off or empty, read as unset: "
        f"v2, huggingface_repo_id {DOC}",)


def test_keys_sharing_a_reason_are_grouped(write):
    f = write("c.toml", "console_log_level = \"INFO\"\nconsole_log_simple = true\n")
    (line,) = load(["--config_file", f]).warnings
    assert "2 have no effect here: console_log_level, console_log_simple (console output " \
           "is Python logging at INFO level)" in line


def test_canonical_config_has_no_summary(write):
    f = write("c.toml", "[lora]\nnetwork_dim = 8\n[optimizer]\nlearning_rate = 1e-4\n")
    assert load(["--config_file", f]).warnings == ()


# ---- tables --------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ["additional_network_arguments", "sdxl_arguments",
                                   "dreambooth_arguments", "others", "advanced_training_config",
                                   "sample_prompt", "Basics", "Network_setup", "LyCORIS"])
def test_any_table_name(write, table):
    f = write("c.toml", f"[{table}]\nnetwork_dim = 12\nlearning_rate = 3e-4\n")
    cfg = load(["--config_file", f]).config
    assert (cfg.lora.network_dim, cfg.optimizer.learning_rate) == (12, 3e-4)


def test_nested_tables_as_lora_easy_writes_them(write):
    f = write("c.toml", """
        [network_args.args]
        network_dim = 16
        network_alpha = 8.0
        [network_args.args.network_args]
        conv_dim = 4
        [optimizer_args.args]
        optimizer_type = "AdamW"
        [optimizer_args.args.optimizer_args]
        weight_decay = "0.1"
        [general_args.dataset_args]
        batch_size = 2
    """)
    cfg = load(["--config_file", f]).config
    assert (cfg.lora.network_dim, cfg.lora.network_alpha) == (16, 8.0)
    assert cfg.lora.network_args == {"conv_dim": 4}
    assert cfg.optimizer.optimizer_args == {"weight_decay": 0.1}
    assert cfg.dataset.train_batch_size == 2


def test_table_named_after_a_key_is_its_value(write):
    f = write("c.toml", "[optimizer_args]\nweight_decay = 0.05\n")
    assert load(["--config_file", f]).config.optimizer.optimizer_args == {"weight_decay": 0.05}


# ---- a key given twice -----------------------------------------------------------------------

def test_alias_and_key_in_two_tables_warn_naming_both(write):
    f = write("c.toml", """
        [lora]
        network_dim = 8
        [network_arguments]
        rank = 32
    """)
    loaded = load(["--config_file", f])
    assert loaded.config.lora.network_dim == 32
    assert loaded.warnings[0] == (
        f"{f}: network_dim is given twice: [lora] network_dim = 8 and [network_arguments] "
        "rank = 32; the later one is used, as in sd-scripts (remove one)")


def test_same_key_twice_on_the_command_line_warns():
    loaded = load(["--network_dim", "8", "--rank", "16"])
    assert loaded.config.lora.network_dim == 16
    assert loaded.warnings[0] == (
        "command line: network_dim is given twice: --network_dim = '8' and --rank = '16'; the "
        "later one is used, as in sd-scripts (remove one)")
    assert load(["--network_dim", "8", "--rank", "8"]).warnings == ()


def test_file_then_command_line_is_an_override_not_a_duplicate(write):
    f = write("c.toml", "network_dim = 8\n")
    assert load(["--config_file", f, "--network_dim", "4"]).warnings == ()


def test_translation_and_key_disagreeing_warn(write):
    f = write("c.toml", 'optimizer_type = "Lion"\nuse_8bit_adam = true\n')
    loaded = load(["--config_file", f])
    assert loaded.config.optimizer.optimizer_type == "AdamW8bit"
    assert "optimizer_type is given twice: optimizer_type = 'Lion' and use_8bit_adam = " \
           "'AdamW8bit'" in loaded.warnings[0]


# ---- typos ---------------------------------------------------------------------------------

@pytest.mark.parametrize("typo, meant", [("learning_rat", "learning_rate"),
                                         ("persistent_data_loader_worker",
                                          "persistent_data_loader_workers"),
                                         ("noise_offset_typ", "noise_offset_type")])
def test_typo_is_an_error_with_did_you_mean(write, typo, meant):
    f = write("c.toml", f"[Basics]\n{typo} = 1\n")
    assert only_problem(["--config_file", f]) == (
        f"{f}: [Basics] {typo}: unknown key (did you mean {meant}?)")
    assert only_problem([f"--{typo}", "1"]).startswith(
        f"command line: --{typo}: unknown option (did you mean --{meant}?)")


# ---- value-dependent refusals --------------------------------------------------------------

@pytest.mark.parametrize("body", ["v2 = false", 'v2 = "false"', 'huggingface_repo_id = ""',
                                  "face_crop_aug_range = []", "network_multiplier = 1",
                                  "num_repeats = 1",
                                  'train_mode = "lora"', "deepspeed = false",
                                  'base_weights = ""', 't5xxl = ""'])
def test_off_values_are_accepted(write, body):
    f = write("c.toml", body + "\n")
    (line,) = load(["--config_file", f]).warnings
    assert "read as unset: " + body.split(" =")[0] in line


@pytest.mark.parametrize("body, fragment", [
    ("v2 = true", "SD 2.x models are not supported"),
    ('huggingface_repo_id = "me/my-lora"', "does not upload"),
    ("network_multiplier = 0.5", "write it in a [[datasets]] table of a dataset_config"),
    ('image_dir = "imgs"', "is a key of one image subset"),
    ("deepspeed = true", "DeepSpeed is not supported"),
    ('t5xxl = "t5.safetensors"', "tomlora trains SD1.5 and SDXL"),
    ('train_mode = "textual_inversion"', "only \"lora\""),
    ("[[datasets]]\nimage_dir = \"x\"", "belong in a dataset config file"),
])
def test_set_values_are_refused_with_what_to_do(write, body, fragment):
    f = write("c.toml", body + "\n")
    msg = only_problem(["--config_file", f])
    key = body.split("\n")[0].split(" =")[0].strip("[]")
    assert msg.startswith(f"{f}: {key}: ")
    assert fragment in msg


# ---- translations --------------------------------------------------------------------------

@pytest.mark.parametrize("body, section, key, value", [
    ("use_8bit_adam = true", "optimizer", "optimizer_type", "AdamW8bit"),
    ("use_8bit_adam = false", "optimizer", "optimizer_type", "AdamW"),
    ("use_lion_optimizer = true", "optimizer", "optimizer_type", "Lion"),
    ("debug_dataset = true", "training", "dry_run", True),
    ("fp8_base_unet = true", "model", "fp8_base", True),
    ('caption_extention = ".caption"', "dataset", "caption_extension", ".caption"),
    ("sdxl = true", "model", "model_family", "sdxl"),
    ("warmup_ratio = 0.05", "optimizer", "lr_warmup_steps", 0.05),
])
def test_translations(write, body, section, key, value):
    f = write("c.toml", body + "\n")
    assert getattr(getattr(load(["--config_file", f]).config, section), key) == value


# ---- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(vocab.NO_EFFECT))
def test_each_no_effect_key_is_accepted_as_a_flag(name):
    (line,) = load([f"--{name}"]).warnings
    assert line.startswith("command line: 1 has no effect here: ")
    assert f"--{name} ({vocab.NO_EFFECT[name]})" in line


@pytest.mark.parametrize("name", sorted(set(vocab.REFUSED) | set(vocab.PENDING_IMPLEMENTATION)))
def test_each_refused_key_is_refused_as_a_flag_when_set(name):
    assert only_problem([f"--{name}", "something"]).startswith(f"command line: --{name}: ")


def test_flags_with_several_values_and_off_values():
    loaded = load(["--v2", "false", "--lr_scheduler_args", "--use_8bit_adam",
                   "--debug_dataset"])
    assert loaded.config.optimizer.optimizer_type == "AdamW8bit"
    assert loaded.config.training.dry_run is True
    assert loaded.warnings == (f"command line: 1 is off or empty, read as unset: --v2 {DOC}",)
    assert loaded.config.optimizer.lr_scheduler_args == {}


def test_set_and_bare_output_config():
    assert "SD 2.x" in only_problem(["--set", "v2=true"])
    assert load(["--set", "model_arguments.v2=false"]).config.model.model_family == "auto"
    assert only_problem(["--output_config"]).startswith(
        "command line: --output_config: needs a PATH")


def test_v2_true_stops_the_run_with_exit_2(write, capsys):
    import train_network
    f = write("c.toml", "v2 = true\n")
    assert train_network.main(["--config_file", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: v2: SD 2.x models are not supported; train an SD1.5 or SDXL model" in err
    assert "Traceback" not in err


# ---- values as real files write them -------------------------------------------------------

ALL_FIELDS = [(sec, f) for sec, cls in schema.SECTIONS.items() for f in fields(cls)]


@pytest.mark.parametrize("sec, f", ALL_FIELDS, ids=[f.name for _, f in ALL_FIELDS])
def test_empty_string_is_unset_for_every_key(write, sec, f):
    cfg = load(["--config_file", write("c.toml", f'{f.name} = ""\n')]).config
    default = getattr(getattr(schema.Config(), sec), f.name)
    assert getattr(getattr(cfg, sec), f.name) == (None if "Optional" in f.type else default)


@pytest.mark.parametrize("key", vocab.ZERO_IS_UNSET)
def test_zero_is_unset_where_sd_scripts_tests_for_truth(write, key):
    sec = schema.key_homes()[key][0]
    cfg = load(["--config_file", write("c.toml", f"{key} = 0\n")]).config
    assert getattr(getattr(cfg, sec), key) is None


def test_type_coercions_of_real_files(write):
    f = write("c.toml", """
        train_batch_size = 2.0
        network_dim = "32"
        network_alpha = "16"
        max_token_length = 75
        resolution = "1024,1024"
        learning_rate = "1e-4"
        gradient_checkpointing = "true"
        network_args = "conv_dim=4 conv_alpha=1"
        optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
        max_train_epochs = 10.0
    """)
    cfg = load(["--config_file", f]).config
    assert cfg.dataset.train_batch_size == 2
    assert (cfg.lora.network_dim, cfg.lora.network_alpha) == (32, 16.0)
    assert cfg.model.max_token_length == 75
    assert cfg.dataset.resolution == (1024, 1024)
    assert cfg.optimizer.learning_rate == 1e-4
    assert cfg.training.gradient_checkpointing is True
    assert cfg.lora.network_args == {"conv_dim": 4, "conv_alpha": 1}
    assert cfg.optimizer.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert cfg.training.max_train_epochs == 10


def test_subsets_and_dataset_config_together_are_refused(write):
    f = write("c.toml", 'dataset_config = "d.toml"\n[[subsets]]\nimage_dir = "x"\n')
    assert any("both subsets and dataset_config" in p for p in problems(["--config_file", f]))
