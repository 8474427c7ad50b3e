"""Schema hygiene: documented fields, DESIGN.md's key names, consistent metadata."""
from __future__ import annotations

from dataclasses import MISSING, fields

import pytest

from library.config import cli, kohya_vocab, loader, schema, values

# The key names DESIGN.md section 4 fixes (kohya's vocabulary), copied from it.
DESIGN_KEYS = """
pretrained_model_name_or_path vae train_data_dir reg_data_dir resolution train_batch_size
max_train_steps max_train_epochs learning_rate unet_lr text_encoder_lr lr_scheduler
lr_warmup_steps lr_scheduler_num_cycles network_module network_dim network_alpha network_args
network_train_unet_only network_train_text_encoder_only network_weights optimizer_type
optimizer_args max_grad_norm mixed_precision save_precision gradient_checkpointing
gradient_accumulation_steps output_dir output_name logging_dir log_with sample_every_n_steps
sample_every_n_epochs sample_prompts sample_sampler save_every_n_steps save_every_n_epochs
save_state resume seed caption_extension cache_latents cache_latents_to_disk
cache_text_encoder_outputs enable_bucket min_bucket_reso max_bucket_reso bucket_reso_steps
bucket_no_upscale shuffle_caption keep_tokens flip_aug random_crop prior_loss_weight
noise_offset min_snr_gamma clip_skip xformers sdpa
save_model_as model_config_dir skip_bad_images dry_run
""".split()

ALL_FIELDS = [(sec, f) for sec, cls in schema.SECTIONS.items() for f in fields(cls)]
FIELD_IDS = [f"{sec}.{f.name}" for sec, f in ALL_FIELDS]


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def test_design_keys_are_in_the_schema():
    names = {f.name for _, f in ALL_FIELDS}
    missing = [k for k in DESIGN_KEYS if k not in names]
    assert missing == [], f"keys of DESIGN.md section 4 missing from the schema: {missing}"
    assert len(set(DESIGN_KEYS)) == len(DESIGN_KEYS)


@pytest.mark.parametrize("sec, f", ALL_FIELDS, ids=FIELD_IDS)
def test_field_is_documented_and_consistent(sec, f):
    meta = f.metadata
    assert meta["doc"].strip(), f"{sec}.{f.name} has no doc"
    assert meta["doc"].strip()[-1] in ".)", f"{sec}.{f.name}: doc should be a sentence"
    kind, optional = values.base_type(f.type)
    assert kind in values.CONVERTERS, f"{sec}.{f.name}: no converter for {f.type}"
    default = default_of(f)
    if default is None:
        assert optional, f"{sec}.{f.name}: default None needs Optional[...]"
    else:
        # the default survives its own converter and checks
        assert values.convert(f.type, default) == default
        assert loader.check_field(f, default) is None
    if meta["choices"] and default is not None:
        assert str(default).lower() in [str(c).lower() for c in meta["choices"]]


def test_names_are_unique_across_keys_aliases_and_sections():
    seen: dict[str, str] = {}
    for sec, f in ALL_FIELDS:
        for name in (f.name, *f.metadata["aliases"]):
            assert name not in seen, f"{name} is both {seen[name]} and {sec}.{f.name}"
            seen[name] = f"{sec}.{f.name}"
    cli_only = {"config_file", "set", "output_config"}
    assert not (set(seen) & (cli_only | kohya_vocab.ALL_NAMES | set(schema.SECTIONS)
                             | set(schema.SECTION_ALIASES)))


def test_section_aliases_point_to_sections():
    assert set(schema.SECTION_ALIASES.values()) <= set(schema.SECTIONS)
    assert set(schema.SECTIONS) == {f.name for f in fields(schema.Config)} - {"config_version"}


def test_every_key_and_alias_is_a_cli_flag():
    parser = cli.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for _, f in ALL_FIELDS:
        for name in (f.name, *f.metadata["aliases"]):
            assert f"--{name}" in flags
