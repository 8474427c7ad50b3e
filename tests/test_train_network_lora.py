"""train_network.py with network_weights and network_args: resume from a file, exit code 2
for a file that does not fit or bad network_args (before anything is written)."""
from __future__ import annotations

from safetensors.torch import load_file

from networks.network_args import parse_network_args, rank_spec
from tests.networks.helpers import load_pipe, one_thread, random_network, save  # noqa: F401
from tests.test_train_e2e import train

ARGS = ["conv_dim=2", "down_lr_weight=sine", "loraplus_lr_ratio=4"]


def test_network_weights_resume_with_network_args(tmp_path, tiny_sd15_dir):
    pipe = load_pipe(tiny_sd15_dir)
    spec = rank_spec(parse_network_args({"conv_dim": 2, "down_lr_weight": "sine"}, "sd15"),
                     4, None, "sd15")
    start = save(random_network(pipe, "sd15", spec, seed=9), tmp_path / "start.safetensors",
                 "sd15", pipe)
    rc, out = train(tmp_path, tiny_sd15_dir, "--network_weights", str(start),
                    "--network_args", *ARGS, steps=1)
    assert rc == 0
    before, after = load_file(str(start)), load_file(str(out / "t.safetensors"))
    assert before.keys() == after.keys()
    diff = max(float((after[k].float() - v).abs().max()) for k, v in before.items())
    # one AdamW step moves each weight by at most lr x weight x ratio (4e-3), plus fp16
    # rounding; a fresh start would be off by the random lora_up itself (~0.1)
    assert 0 < diff < 5e-3


def test_network_weights_that_do_not_fit_exit_2(tmp_path, tiny_sd15_dir, capsys):
    pipe = load_pipe(tiny_sd15_dir)
    start = save(random_network(pipe, "sd15", rank_spec(parse_network_args({}, "sd15"), 2,
                                                        None, "sd15")),
                 tmp_path / "r2.safetensors", "sd15", pipe)
    rc, out = train(tmp_path, tiny_sd15_dir, "--network_weights", str(start))
    assert rc == 2
    err = capsys.readouterr().err
    assert "LoRA network error" in err and f"network_weights {start}" in err
    assert "shape mismatches" in err and "dim_from_weights" in err
    assert not (out / "t.safetensors").exists()


def test_bad_network_args_exit_2_before_models_load(tmp_path, tiny_sdxl_dir, capsys):
    rc, out = train(tmp_path, tiny_sdxl_dir, "--network_args", "block_dims=4,4,4",
                    "algo=lora", "--text_encoder_lr", "1e-4", "5e-5", "1e-6")
    assert rc == 2
    err = capsys.readouterr().err
    assert "text_encoder_lr: expected one number or a list of two" in err
    rc, out = train(tmp_path, tiny_sdxl_dir, "--network_args", "block_dims=4,4,4", "algo=lora")
    assert rc == 2
    err = capsys.readouterr().err
    assert "Configuration error (2 problems)" in err
    assert "[lora] network_args: block_dims: has 3 values; sdxl needs 23" in err
    assert "unknown key 'algo'" in err
    assert not out.exists()
