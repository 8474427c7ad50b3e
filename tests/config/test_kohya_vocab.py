"""The kohya vocabulary cannot drift: every option of sd-scripts' LoRA trainers and every key
of its dataset config, written here as data read from sd-scripts at the commit below, is in
exactly one state of library/config/kohya_vocab.py (implemented, no effect, refused; the names
being implemented on other branches counted apart), and each state does what it says, in a
file and on the command line."""
from __future__ import annotations

import pytest

from library.config import kohya_vocab as vocab
from library.config import schema, sd_scripts_names
from tests.config.helpers import load, only_problem, problems

# Read from kohya-ss/sd-scripts at this commit: the option names of train_network.py's and
# sdxl_train_network.py's parsers (setup_parser) and the dataset-config schema's keys
# (library/config_util.py ConfigSanitizer), sorted.
COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
OPTIONS = set("""
adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier
bucket_no_upscale bucket_reso_steps cache_info cache_latents cache_latents_to_disk
cache_text_encoder_outputs cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs
caption_dropout_rate caption_extension caption_extention caption_prefix caption_separator
caption_suffix caption_tag_dropout_rate clip_skip color_aug conditioning_data_dir
config_file console_log_file console_log_level console_log_simple cpu_offload_checkpointing
dataset_class dataset_config dataset_repeats ddp_gradient_as_bucket_view ddp_static_graph
ddp_timeout debiased_estimation_loss debug_dataset deepspeed dim_from_weights
disable_mmap_load_safetensors dynamo_backend enable_bucket enable_wildcard
face_crop_aug_range flip_aug fp16_master_weights_and_gradients fp8_base fp8_base_unet
full_bf16 full_fp16 fused_backward_pass gradient_accumulation_steps gradient_checkpointing
highvram huber_c huber_scale huber_schedule huggingface_path_in_repo huggingface_repo_id
huggingface_repo_type huggingface_repo_visibility huggingface_token in_json initial_epoch
initial_step ip_noise_gamma ip_noise_gamma_random_strength keep_tokens keep_tokens_separator
learning_rate log_config log_prefix log_tracker_config log_tracker_name log_with logging_dir
loss_type lowram lr_decay_steps lr_scheduler lr_scheduler_args lr_scheduler_min_lr_ratio
lr_scheduler_num_cycles lr_scheduler_power lr_scheduler_timescale lr_scheduler_type
lr_warmup_steps masked_loss max_bucket_reso max_data_loader_n_workers max_grad_norm
max_timestep max_token_length max_train_epochs max_train_steps max_validation_steps
mem_eff_attn metadata_author metadata_description metadata_is_negative_embedding
metadata_license metadata_merged_from metadata_preprocessor metadata_tags metadata_thumbnail
metadata_title metadata_trigger_phrase metadata_usage_hint min_bucket_reso min_snr_gamma
min_timestep mixed_precision multires_noise_discount multires_noise_iterations network_alpha
network_args network_dim network_dropout network_module network_train_text_encoder_only
network_train_unet_only network_weights no_half_vae no_metadata noise_offset
noise_offset_random_strength offload_optimizer_device offload_optimizer_nvme_path
offload_param_device offload_param_nvme_path optimizer_args optimizer_type output_config
output_dir output_name persistent_data_loader_workers pretrained_model_name_or_path
prior_loss_weight random_crop reg_data_dir resize_interpolation resolution resume
resume_from_huggingface sample_at_first sample_every_n_epochs sample_every_n_steps
sample_prompts sample_sampler save_every_n_epochs save_every_n_steps save_last_n_epochs
save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_model_as
save_n_epoch_ratio save_precision save_state save_state_on_train_end
save_state_to_huggingface scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa
secondary_separator seed shuffle_caption skip_cache_check skip_until_initial_step
text_encoder_lr token_warmup_min token_warmup_step tokenizer_cache_dir torch_compile
train_batch_size train_data_dir training_comment unet_lr use_8bit_adam use_lion_optimizer v2
v_parameterization v_pred_like_loss vae vae_batch_size validate_every_n_epochs
validate_every_n_steps validation_seed validation_split wandb_api_key wandb_run_name
weighted_captions xformers zero3_init_flag zero3_save_16bit_model zero_stage
zero_terminal_snr
""".split())
DATASET_KEYS = set("""
alpha_mask batch_size bucket_no_upscale bucket_reso_steps cache_info
caption_dropout_every_n_epochs caption_dropout_rate caption_extension caption_prefix
caption_separator caption_suffix caption_tag_dropout_rate class_tokens color_aug
conditioning_data_dir custom_attributes enable_bucket enable_wildcard face_crop_aug_range
flip_aug image_dir is_reg keep_tokens keep_tokens_separator max_bucket_reso metadata_file
min_bucket_reso network_multiplier num_repeats random_crop resize_interpolation resolution
secondary_separator shuffle_caption token_warmup_min token_warmup_step validation_seed
validation_split
""".split())
HOMES = schema.key_homes()


def test_the_library_lists_are_sd_scripts_names_at_the_pinned_commit():
    assert vocab.SD_SCRIPTS_COMMIT == sd_scripts_names.SD_SCRIPTS_COMMIT == COMMIT
    assert set(sd_scripts_names.SD_SCRIPTS_OPTIONS) == OPTIONS
    assert len(sd_scripts_names.SD_SCRIPTS_OPTIONS) == len(OPTIONS) == 196
    assert set(sd_scripts_names.DATASET_CONFIG_KEYS) == DATASET_KEYS


def test_the_dataset_config_reader_knows_every_dataset_config_key():
    from library.data import dataset_config as reader
    known = set(reader.DATASET_KEYS + reader.SUBSET_KEYS + reader.SUBSET_ONLY_KEYS)
    assert DATASET_KEYS - known == set()


# Each group and the state it stands for; a name must be in exactly one group.
GROUPS = (("implemented", HOMES), ("implemented", vocab.TRANSLATED),
          ("implemented", vocab.COMMAND_LINE), ("no effect", vocab.NO_EFFECT),
          ("refused", vocab.REFUSED), ("pending", vocab.PENDING_IMPLEMENTATION))


def states(name: str) -> list[str]:
    """Every state that claims `name` (a correct vocabulary gives exactly one)."""
    return [state for state, group in GROUPS if name in group]


@pytest.mark.parametrize("name", sorted(OPTIONS | DATASET_KEYS))
def test_each_sd_scripts_name_is_in_exactly_one_state(name):
    assert len(states(name)) == 1, (name, states(name))


def test_vocabulary_holds_only_sd_scripts_names_or_marked_front_end_keys():
    extra = vocab.ALL_NAMES - OPTIONS - DATASET_KEYS
    assert extra == set(vocab.FRONT_END_KEYS), extra ^ set(vocab.FRONT_END_KEYS)
    for name in vocab.FRONT_END_KEYS:
        assert len(states(name)) == 1, (name, states(name))
    assert not (vocab.ALL_NAMES & set(HOMES))  # schema keys and aliases are not repeated


def test_pending_names_are_sd_scripts_names_not_yet_in_the_schema():
    # After merging a branch that adds one of them to the schema, delete it from
    # kohya_vocab.PENDING_IMPLEMENTATION: this names the ones to delete.
    pending = set(vocab.PENDING_IMPLEMENTATION)
    assert pending & set(HOMES) == set()
    assert pending <= OPTIONS | DATASET_KEYS
    assert len(pending) == len(vocab.PENDING_IMPLEMENTATION)


def test_every_vocabulary_name_is_a_flag_and_a_known_name():
    from library.config import cli
    flags = {s for a in cli.build_parser()._actions for s in a.option_strings}
    for name in vocab.ALL_NAMES:
        assert f"--{name}" in flags, name
        vocab.state_of(name)
