"""Config keys of issue 4: text_encoder_lr (one value or one per SDXL encoder),
network_weights (must exist), dim_from_weights (needs network_weights)."""
from __future__ import annotations

from library.config.output import config_to_toml
from tests.config.helpers import load, only_problem


def test_text_encoder_lr_one_value_or_a_pair(write):
    assert load(["--text_encoder_lr", "1e-4"]).config.optimizer.text_encoder_lr == 1e-4
    assert load(["--text_encoder_lr", "1e-4", "5e-5"]).config.optimizer.text_encoder_lr == \
        (1e-4, 5e-5)
    f = write("c.toml", "[optimizer_arguments]\ntext_encoder_lr = [1e-4, 2e-5]\n")
    cfg = load(["--config_file", f]).config
    assert cfg.optimizer.text_encoder_lr == (1e-4, 2e-5)
    again = write("again.toml", config_to_toml(cfg))  # the resolved config reloads the same
    assert load(["--config_file", again]).config.optimizer.text_encoder_lr == (1e-4, 2e-5)
    f = write("d.toml", "[optimizer]\ntext_encoder_lr = 3e-5\n")
    assert load(["--config_file", f]).config.optimizer.text_encoder_lr == 3e-5


def test_text_encoder_lr_errors(write):
    msg = only_problem(["--text_encoder_lr", "1", "2", "3"])
    assert msg == ("command line: [optimizer] text_encoder_lr: expected one number or a list "
                   "of two (TE1, TE2), got ['1', '2', '3']")
    f = write("c.toml", "[optimizer]\ntext_encoder_lr = [-1e-4]\n")
    assert "text_encoder_lr: learning rates must be >= 0" in only_problem(["--config_file", f])


def test_network_weights_must_exist_and_dim_from_weights_needs_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    msg = only_problem(["--network_weights", missing, "--pretrained_model_name_or_path",
                        tmp_path, "--train_data_dir", tmp_path], check_paths=True)
    assert msg == f"command line: [lora] network_weights: LoRA file '{missing}' not found"
    assert only_problem(["--dim_from_weights"]) == (
        "command line: [lora] dim_from_weights: needs network_weights (the LoRA file to take "
        "the modules, ranks and alphas from)")
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    cfg = load(["--network_weights", lora, "--dim_from_weights"]).config
    assert cfg.lora.network_weights == str(lora) and cfg.lora.dim_from_weights
