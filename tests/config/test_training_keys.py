"""Config-time checks of the optimizer, schedule, noise and loss keys: exit-2 errors that
name the file, section, key and fix, before any model loads."""
from __future__ import annotations

import importlib.util

import pytest

from tests.config.helpers import load, only_problem, problems, problems_if_any


def test_optimizer_args_problems_name_the_key_and_the_accepted_args(write):
    f = write("c.toml", """
        [optimizer_arguments]
        optimizer_type = "adamw8bit"
        optimizer_args = ["weight_decay=0.01", "decouple=True"]
    """)
    msg = only_problem(["--config_file", f])
    assert msg.startswith(f"{f}: [optimizer_arguments] optimizer_args: 'decouple' is not an "
                          "argument of AdamW8bit; accepted: betas, eps, weight_decay")


def test_kohya_adafactor_args_load_typed(write):
    f = write("c.toml", """
        [optimizer_arguments]
        optimizer_type = "Adafactor"
        optimizer_args = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
        lr_scheduler = "constant_with_warmup"
    """)
    o = load(["--config_file", f]).config.optimizer
    assert o.optimizer_args == {"scale_parameter": False, "relative_step": False,
                                "warmup_init": False}


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is not None,
                    reason="prodigyopt is installed here")
def test_missing_optimizer_package_is_a_config_error_with_the_pip_command(write, tmp_path):
    f = write("c.toml", '[optimizer]\noptimizer_type = "prodigy"\nlearning_rate = 1.0\n')
    found = problems(["--config_file", f, "--pretrained_model_name_or_path", "m",
                      "--train_data_dir", tmp_path], check_paths=True)
    assert found == [f"{f}: [optimizer] optimizer_type: optimizer_type = \"Prodigy\" needs "
                     "the package prodigyopt, which is not installed: pip install prodigyopt"]


@pytest.mark.parametrize("toml, fragment", [
    ('[optimizer]\nlr_scheduler = "adafactor"\n',
     "[optimizer] lr_scheduler: the adafactor schedule needs optimizer_type = \"Adafactor\""),
    ('[optimizer]\noptimizer_type = "Adafactor"\nlr_scheduler = "adafactor"\n'
     'optimizer_args = { relative_step = false }\n', "the adafactor schedule needs"),
    ('[optimizer]\nlr_scheduler = "cosine_with_min_lr"\n',
     "cosine_with_min_lr needs lr_scheduler_min_lr_ratio"),
    ('[optimizer]\nlr_scheduler_min_lr_ratio = 2.0\n', "2.0 is above 1"),
    ('[training]\nmin_timestep = 500\nmax_timestep = 100\n',
     "[training] min_timestep: 500 is above max_timestep 100"),
    ('[training]\nmax_timestep = 1001\n', "max_timestep: 1001 is above 1000"),
    ('[training]\nmin_timestep = 1000\n', "min_timestep: 1000 is beyond the last timestep"),
    ('[training]\nadaptive_noise_scale = 0.1\n', "adaptive_noise_scale: needs noise_offset"),
    ('[training]\nscale_v_pred_loss_like_noise_pred = true\n',
     "set v_parameterization = true"),
    ('[training]\nloss_type = "huberish"\n', "expected one of: l2, l1, huber, smooth_l1"),
    ('[training]\nhuber_c = 0\n', "huber_c: value 0.0 out of range; it must be > 0"),
])
def test_contradictions_are_reported(write, toml, fragment):
    msg = only_problem(["--config_file", write("c.toml", toml)])
    assert fragment in msg


def test_valid_combinations_load(write):
    f = write("c.toml", """
        [model]
        v_parameterization = true
        [training]
        noise_offset = 0.05
        adaptive_noise_scale = 0.01
        scale_v_pred_loss_like_noise_pred = true
        zero_terminal_snr = true
        min_timestep = 100
        max_timestep = 900
        loss_type = "smooth_l1"
        huber_schedule = "exponential"
        [optimizer]
        optimizer_type = "adafactor"
        lr_scheduler = "adafactor"
    """)
    loaded = load(["--config_file", f])
    assert loaded.warnings == ()
    assert loaded.config.optimizer.optimizer_type == "Adafactor"


def test_zero_terminal_snr_without_v_prediction_warns(write):
    f = write("c.toml", "[training]\nzero_terminal_snr = true\n")
    loaded = load(["--config_file", f])
    assert any("zero_terminal_snr" in w and "v_parameterization" in w for w in loaded.warnings)


def test_new_keys_are_cli_flags():
    cfg = load(["--loss_type", "huber", "--huber_c", "0.2", "--multires_noise_iterations", "6",
                "--ip_noise_gamma", "0.1", "--optimizer_type", "Lion8bit",
                "--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1",
                "--debiased_estimation_loss"]).config
    assert (cfg.training.loss_type, cfg.training.huber_c, cfg.training.ip_noise_gamma) == \
        ("huber", 0.2, 0.1)
    assert cfg.training.debiased_estimation_loss is True
    assert problems_if_any(["--optimizer_type", "sgdnesterov"]) == []
