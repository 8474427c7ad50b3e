"""Every class of config error: the message names the file, the section and the key (where
there is one), says what is wrong and what to do; all problems come out at once."""
from __future__ import annotations

from dataclasses import fields

import pytest

from library.config import schema, values
from tests.config.helpers import load, only_problem, problems


def test_unknown_key_suggests_the_closest_key(write):
    f = write("c.toml", """
        [optimizer]
        learning_rat = 1e-4
    """)
    assert only_problem(["--config_file", f]) == (
        f"{f}: [optimizer] learning_rat: unknown key (did you mean learning_rate?)")


def test_unknown_top_level_key(write):
    f = write("c.toml", "netwrok_dim = 8\n")
    assert only_problem(["--config_file", f]) == (
        f"{f}: netwrok_dim: unknown key (did you mean network_dim?)")


def test_unknown_key_in_kohya_section_names_the_section_as_written(write):
    f = write("c.toml", """
        [lora_arguments]
        network_rank = 8
    """)
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [lora_arguments] network_rank: unknown key")


def test_any_table_name_is_read_but_its_keys_are_checked(write):
    # sd-scripts ignores table names, so a misspelt one is read; a misspelt key is not.
    f = write("c.toml", """
        [optimiser]
        learning_rate = 2e-4
        [Basics]
        learning_rat = 1e-4
    """)
    assert only_problem(["--config_file", f]) == (
        f"{f}: [Basics] learning_rat: unknown key (did you mean learning_rate?)")
    g = write("g.toml", "[optimiser]\nlearning_rate = 2e-4\n")
    assert load(["--config_file", g]).config.optimizer.learning_rate == 2e-4


@pytest.mark.parametrize("section, key, toml_value, expected", [
    ("lora", "network_dim", '"abc"', "expected an integer, got 'abc'"),
    ("lora", "network_dim", "4.5", "expected an integer, got 4.5"),
    ("training", "gradient_checkpointing", '"maybe"', "expected true or false, got 'maybe'"),
    ("optimizer", "learning_rate", '"fast"', "expected a number, got 'fast'"),
    ("optimizer", "learning_rate", "true", "expected a number, got True"),
    ("saving", "output_name", "3", "expected a string, got 3"),
    ("dataset", "resolution", "true", "expected a size like 512"),
    ("dataset", "resolution", "[512, 512, 512]", "expected a size like 512"),
    ("lora", "network_args", "3", "expected a table or a list of \"key=value\" strings"),
    ("lora", "network_args", '["conv_dim"]', "expected \"key=value\" strings, got 'conv_dim'"),
])
def test_wrong_type_says_expected_and_got(write, section, key, toml_value, expected):
    f = write("c.toml", f"[{section}]\n{key} = {toml_value}\n")
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [{section}] {key}: ")
    assert expected in msg


@pytest.mark.parametrize("section, key, toml_value, rule", [
    ("optimizer", "learning_rate", "0", "> 0"),
    ("optimizer", "learning_rate", "-1e-4", "> 0"),
    ("lora", "network_dim", "0", ">= 1"),
    ("lora", "network_alpha", "-1", "> 0"),  # 0 is unset, as in sd-scripts (alpha = dim)
    ("training", "max_train_steps", "-5", ">= 1"),
    ("training", "max_train_epochs", "0", ">= 1"),
    ("saving", "save_every_n_steps", "-1", ">= 1"),
    ("optimizer", "lr_warmup_steps", "-10", ">= 0"),
    ("dataset", "keep_tokens", "-1", ">= 0"),
    ("dataset", "bucket_reso_steps", "4", ">= 8"),
])
def test_out_of_range(write, section, key, toml_value, rule):
    f = write("c.toml", f"[{section}]\n{key} = {toml_value}\n")
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [{section}] {key}: value ")
    assert f"out of range; it must be {rule}" in msg


@pytest.mark.parametrize("body, expected, fragment", [
    # sd-scripts runs these (its largest bucket is the multiple within the area): rounded
    # down, with a warning
    ("resolution = 1020", (1016, 1016), "1020x1020 is not a multiple of 8 (sizes are "
     "multiples of 8 for the VAE); training at 1016x1016"),
    ("resolution = [512, 500]", (512, 496), "not a multiple of 8"),
    ("resolution = 1000\nenable_bucket = true", (960, 960),
     "1000x1000 is not a multiple of 64 (bucket_reso_steps); training at 960x960"),
    ("resolution = 1000\nenable_bucket = true\nbucket_reso_steps = 32", (992, 992),
     "not a multiple of 32 (bucket_reso_steps)"),
])
def test_resolution_off_the_grid_is_rounded_down_with_a_warning(write, body, expected,
                                                                 fragment):
    f = write("c.toml", f"[dataset]\n{body}\n")
    loaded = load(["--config_file", f])
    assert loaded.config.dataset.resolution == expected
    assert len(loaded.warnings) == 1
    assert loaded.warnings[0].startswith(f"{f}: [dataset] resolution: ")
    assert fragment in loaded.warnings[0]


def test_resolution_must_be_positive(write):
    f = write("c.toml", "[dataset]\nresolution = \"1024,0\"\n")
    assert only_problem(["--config_file", f]) == (
        f"{f}: [dataset] resolution: 0 is not a positive size; use e.g. 512 (SD1.5) or 1024 "
        "(SDXL)")


def test_resolution_multiple_of_bucket_steps_is_fine(write):
    f = write("c.toml", "[dataset]\nresolution = 1000\nenable_bucket = true\n"
                        "bucket_reso_steps = 8\n")
    assert load(["--config_file", f]).config.dataset.resolution == (1000, 1000)


@pytest.mark.parametrize("section, key, value, fragment", [
    ("training", "mixed_precision", '"fp8"',
     "invalid value 'fp8'; expected one of: no, fp16, bf16"),
    ("optimizer", "lr_scheduler", '"cosine_restarts"',
     "expected one of: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
     "polynomial, cosine_with_min_lr, adafactor (did you mean cosine_with_restarts?)"),
    ("optimizer", "optimizer_type", '"Lion4bit"',
     "expected one of: AdamW, AdamW8bit, PagedAdamW8bit, Lion8bit, Lion,"),
    ("logging", "log_with", '"mlflow"', "expected one of: tensorboard, wandb, all"),
    ("saving", "save_precision", '"fp8"', "invalid value 'fp8'"),
])
def test_invalid_choice_lists_the_valid_ones(write, section, key, value, fragment):
    f = write("c.toml", f"[{section}]\n{key} = {value}\n")
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [{section}] {key}: ")
    assert fragment in msg


def test_choices_are_case_insensitive_and_normalised(write):
    f = write("c.toml", '[optimizer]\noptimizer_type = "adamw8bit"\nlr_scheduler = "COSINE"\n')
    o = load(["--config_file", f]).config.optimizer
    assert (o.optimizer_type, o.lr_scheduler) == ("AdamW8bit", "cosine")


def test_contradiction_unet_only_and_text_encoder_only(write):
    f = write("c.toml", """
        [lora]
        network_train_unet_only = true
        network_train_text_encoder_only = true
    """)
    msg = only_problem(["--config_file", f])
    assert msg == (f"{f}: [lora] network_train_text_encoder_only: contradicts "
                   "network_train_unet_only = true; set at most one of them")


TE_CACHE_KEYS = ["cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"]


@pytest.mark.parametrize("cache_key", TE_CACHE_KEYS)
def test_cache_text_encoder_outputs_needs_frozen_text_encoders(write, cache_key):
    f = write("c.toml", f"""
        [dataset]
        {cache_key} = true
    """)
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [dataset] {cache_key}: needs frozen text encoders")
    assert "network_train_unet_only = true" in msg


def test_cache_text_encoder_outputs_to_disk_flag_needs_frozen_text_encoders(write):
    msg = only_problem(["--config_file", write("c.toml", ""),
                        "--cache_text_encoder_outputs_to_disk"])
    assert "cache_text_encoder_outputs_to_disk: needs frozen text encoders" in msg


@pytest.mark.parametrize("cache_key", TE_CACHE_KEYS)
@pytest.mark.parametrize("key, value", [
    ("shuffle_caption", "true"),
    ("caption_dropout_rate", "0.1"),
    ("caption_tag_dropout_rate", "0.1"),
    ("token_warmup_step", "10"),
])
def test_cache_text_encoder_outputs_with_changing_captions(write, key, value, cache_key):
    f = write("c.toml", f"""
        [dataset]
        {cache_key} = true
        {key} = {value}
        [lora]
        network_train_unet_only = true
    """)
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [dataset] {cache_key}: cannot cache captions")
    assert f"({key} is set)" in msg


def test_cache_text_encoder_outputs_with_unet_only_loads(write):
    f = write("c.toml", "[dataset]\ncache_text_encoder_outputs = true\n"
                        "[lora]\nnetwork_train_unet_only = true\n")
    assert load(["--config_file", f]).config.dataset.cache_text_encoder_outputs


def test_cache_text_encoder_outputs_to_disk_from_file_and_flag(write):
    f = write("c.toml", "[dataset]\ncache_text_encoder_outputs_to_disk = true\n"
                        "[lora]\nnetwork_train_unet_only = true\n")
    assert load(["--config_file", f]).config.dataset.cache_text_encoder_outputs_to_disk
    g = write("g.toml", "[lora]\nnetwork_train_unet_only = true\n")
    d = load(["--config_file", g, "--cache_text_encoder_outputs_to_disk"]).config.dataset
    assert d.cache_text_encoder_outputs_to_disk and not d.cache_text_encoder_outputs


def _runnable(tmp_path, write, extra: str = ""):
    """A config whose paths exist, so that check_paths=True reports only `extra`'s problems."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return write("run.toml", f"""
        [model]
        pretrained_model_name_or_path = "{tmp_path / 'model'}"
        [dataset]
        train_data_dir = "{data}"
    """ + extra)


def test_runnable_config_has_no_problems(tmp_path, write):
    f = _runnable(tmp_path, write)
    assert load(["--config_file", f], check_paths=True).config.dataset.train_data_dir


def test_missing_sample_prompts_file(tmp_path, write):
    missing = tmp_path / "prompts.txt"
    f = _runnable(tmp_path, write, f'[sample]\nsample_prompts = "{missing}"\n')
    msg = only_problem(["--config_file", f], check_paths=True)
    assert msg == f"{f}: [sample] sample_prompts: file {str(missing)!r} not found"
    # Path checks are what check_paths=False skips.
    assert load(["--config_file", f]).config.sample.sample_prompts == str(missing)


@pytest.mark.parametrize("key", ["train_data_dir", "reg_data_dir"])
def test_missing_data_folders(tmp_path, write, key):
    other = "reg_data_dir" if key == "train_data_dir" else "train_data_dir"
    f = write("c.toml", f"""
        [model]
        pretrained_model_name_or_path = "m"
        [dataset]
        {other} = "{tmp_path}"
        {key} = "{tmp_path / 'nope'}"
    """)
    msg = only_problem(["--config_file", f], check_paths=True)
    assert msg == f"{f}: [dataset] {key}: folder {str(tmp_path / 'nope')!r} does not exist"


def test_required_keys_are_reported_with_their_home(tmp_path):
    found = problems([], check_paths=True)
    assert found == [
        "config: [model] pretrained_model_name_or_path: required; set it to a diffusers "
        "model folder",
        "config: [dataset] train_data_dir: required; set it to your image folder "
        "(N_name class subfolders, or images with metadata.csv)",
    ]


def test_missing_resume_folder_message_is_clear(tmp_path, write):
    # `resume` is planned (not implemented yet): the message says so; once it is implemented
    # the message must say that the state folder was not found. Either way it names the
    # file, the section, the key and what to do.
    missing = tmp_path / "state"
    f = _runnable(tmp_path, write, f'[saving]\nresume = "{missing}"\n')
    msg = only_problem(["--config_file", f], check_paths=True)
    assert msg.startswith(f"{f}: [saving] resume")
    assert ("not supported by this version of tomlora yet; remove it" in msg
            or f"state folder {str(missing)!r} not found" in msg)


def test_missing_resume_folder_from_the_diffusers_flag(tmp_path):
    found = problems(["--resume_from_checkpoint", tmp_path / "state"], check_paths=True)
    msg = [m for m in found if "resume" in m][0]
    assert msg.startswith("command line: [saving] resume")
    assert "not found" in msg


def _planned_fields():
    """Planned fields with a non-default TOML value that passes their other checks."""
    out = []
    for sec, cls in schema.SECTIONS.items():
        for f in fields(cls):
            if not f.metadata["planned"] or f.metadata["choices"]:
                continue  # a planned key with choices fails on the choice first
            kind, _ = values.base_type(f.type)
            value = {"bool": "false" if f.default else "true", "str": '"x"',
                     "int": "1000", "float": "1000.0"}.get(kind)
            if value is not None:
                out.append(pytest.param(sec, f.name, value, id=f.name))
    return out


@pytest.mark.parametrize("section, key, value", _planned_fields())
def test_planned_keys_are_refused_not_ignored(write, section, key, value):
    f = write("c.toml", f"{key} = {value}\n")
    msg = only_problem(["--config_file", f])
    # names the home section, says it is not implemented and what to do
    assert msg == (f"{f}: [{section}] {key}: is not supported by this version of tomlora "
                   "yet; remove it from the config (see docs/CONFIG.md)")


def test_there_are_planned_keys_to_test():
    assert len(_planned_fields()) >= 1


def test_planned_key_at_its_default_is_fine(write):
    f = write("c.toml", "[model]\nxformers = false\nallow_pickle = false\n"
                        "[saving]\nsave_state = false\n")
    load(["--config_file", f])


def test_bad_toml_syntax_reports_line_and_column(write):
    f = write("c.toml", """\
        [training]
        max_train_steps = 10
        seed =
    """)
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: invalid TOML: ")
    assert "line 3, column 7" in msg
    assert "fix the syntax" in msg


def test_bad_toml_syntax_alone_with_path_checks(write):
    # The unread file's keys are unknown: no "required" noise on top of the syntax error.
    f = write("c.toml", "[model\n")
    assert "invalid TOML" in only_problem(["--config_file", f], check_paths=True)


def test_key_in_a_misspelt_table_counts_for_required_keys(write, tmp_path):
    f = write("c.toml", f'[model_argument]\npretrained_model_name_or_path = "m"\n'
                        f'train_data_dir = "{tmp_path}"\n')
    assert load(["--config_file", f], check_paths=True).config.model.\
        pretrained_model_name_or_path == "m"


def test_missing_config_file(tmp_path):
    msg = only_problem(["--config_file", tmp_path / "nope.toml"])
    assert msg.startswith(f"{tmp_path / 'nope.toml'}: config file not found")


def test_base_include_cycle(write):
    a = write("a.toml", 'base = "sub/b.toml"\n')
    b = write("sub/b.toml", 'base = ["../a.toml"]\n')
    msg = only_problem(["--config_file", a])
    assert msg == (f"{a}: `base` include cycle: {a} -> {b} -> {a} (remove one of the "
                   "includes)")


def test_base_including_itself(write):
    a = write("a.toml", 'base = "a.toml"\n')
    assert "`base` include cycle" in only_problem(["--config_file", a])


def test_base_missing_file_and_bad_base_value(write):
    a = write("a.toml", 'base = "nope.toml"\n')
    assert only_problem(["--config_file", a]).startswith(
        f"{a.parent / 'nope.toml'}: config file not found")
    b = write("b.toml", "base = 3\n")
    assert only_problem(["--config_file", b]) == (
        f"{b}: base: expected a list of TOML file paths, got 3")


def test_all_problems_at_once(write):
    f = write("c.toml", """
        [optimizer]
        learning_rat = 1e-4
        [lora]
        network_dim = "eight"
        [training]
        mixed_precision = "fp8"
    """)
    found = problems(["--config_file", f])
    assert found == [
        f"{f}: [optimizer] learning_rat: unknown key (did you mean learning_rate?)",
        # typed keys are reported in schema order: [training] before [lora]
        f"{f}: [training] mixed_precision: invalid value 'fp8'; expected one of: no, fp16, "
        "bf16",
        f"{f}: [lora] network_dim: expected an integer, got 'eight'",
    ]


def test_all_problems_at_once_across_file_cli_and_cross_key_checks(write):
    # A typing error must not hide a contradiction elsewhere, nor a bad flag.
    f = write("c.toml", """
        [lora]
        network_dim = 0
        network_train_unet_only = true
        network_train_text_encoder_only = true
    """)
    found = problems(["--config_file", f, "--learning_rat", "1", "--seed", "x"])
    assert len(found) == 4, found
    assert any("--learning_rat: unknown option (did you mean --learning_rate?)" in p
               for p in found)
    assert any(p.startswith(f"{f}: [lora] network_dim: value 0 out of range") for p in found)
    assert any(p.startswith("command line: [training] seed: expected an integer") for p in found)
    assert any("contradicts network_train_unet_only" in p for p in found)


def test_failed_key_is_not_reported_twice(tmp_path, write):
    # resolution fails typing; the multiple-of-8 check must not report it again, and a bad
    # bucket_reso_steps must not make a good resolution look wrong.
    f = write("c.toml", '[dataset]\nresolution = "big"\nenable_bucket = true\n'
                        'bucket_reso_steps = "x"\n')
    found = problems(["--config_file", f])
    assert len(found) == 2, found
    assert found[0].startswith(f"{f}: [dataset] resolution: ")
    assert found[1].startswith(f"{f}: [dataset] bucket_reso_steps: ")
    g = write("g.toml", '[dataset]\nresolution = 1024\nenable_bucket = true\n'
                        'bucket_reso_steps = "x"\n')
    assert only_problem(["--config_file", g]).startswith(f"{g}: [dataset] bucket_reso_steps")


def test_error_names_the_alias_the_user_wrote(write):
    f = write("c.toml", "[dataset_arguments]\nbatch_size = 0\n")
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [dataset_arguments] batch_size")
    assert "train_batch_size" in msg  # and the key it stands for


def test_cli_errors_name_the_flag():
    assert only_problem(["--learning_rat", "1e-4"]).startswith(
        "command line: --learning_rat: unknown option (did you mean --learning_rate?)")
    assert only_problem(["--network_dim"]) == "command line: --network_dim: needs a value"
    assert only_problem(["--set", "lora.network_dim"]) == (
        "command line: --set 'lora.network_dim': expected section.key=value")
    assert only_problem(["--set", "lora.network_dimm=4"]).startswith(
        "command line: --set 'lora.network_dimm=4': unknown key network_dimm (did you mean "
        "network_dim?)")
    assert only_problem(["--set", "loar.network_dim=4"]).startswith(
        "command line: --set 'loar.network_dim=4': unknown section [loar] (did you mean lora?)")
    assert only_problem(["--network_dim", "x"]) == (
        "command line: [lora] network_dim: expected an integer, got 'x'")
