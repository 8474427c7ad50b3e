"""Speed toggles (library/train/speed.py) keep the training trajectory: `compile = true`
(regional torch.compile through inductor, here its CPU backend) and `channels_last` give the
same loss curve and LoRA as the eager run, through the real CLI on the tiny model. Their
speed is measured on the GPU in bench/bench_step.py, never here."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.config import ConfigError, load_config
from library.train.speed import compile_blocks
from tests.test_train_e2e import read_scalars
from tests.train.test_loop import data, run  # noqa: F401  (the fixture)


def curve_and_weights(root):
    return (read_scalars(root / "logs")["loss/current"],
            load_file(str(root / "out" / "t.safetensors")))


@pytest.mark.parametrize("flags", [["--compile"], ["--channels_last"]],
                         ids=["compile", "channels_last"])
def test_toggle_keeps_the_loss_curve(tmp_path, tiny_sd15_dir, data, flags):  # noqa: F811
    assert run(tmp_path / "eager", tiny_sd15_dir, data, "--max_train_steps", "3") == 0
    assert run(tmp_path / "fast", tiny_sd15_dir, data, "--max_train_steps", "3", *flags) == 0
    (a, wa), (b, wb) = curve_and_weights(tmp_path / "eager"), curve_and_weights(tmp_path / "fast")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-4)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


def test_compile_mode_is_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--compile_mode", "fastest"], check_paths=False)
    assert "compile_mode" in str(e.value) and "reduce-overhead" in str(e.value)


def test_compile_blocks_needs_blocks():
    with pytest.raises(ValueError, match="no transformer or ResNet blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
