"""full_bf16 / full_fp16: config checks (exit-2 errors naming the keys and the fix) and the
CPU fallback through the real CLI on the tiny model."""
from __future__ import annotations

import json
import logging

import pytest
from safetensors.torch import load_file

from library.config import ConfigError, load_config
from library.train.state_codec import decode
from tests.train.test_loop import data, run  # noqa: F401  (the fixture)


def problems(*argv: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(list(argv), check_paths=False)
    return info.value.problems


@pytest.mark.parametrize("argv, fragment", [
    (["--full_bf16"], 'full_bf16: needs mixed_precision = "bf16" (it is "no")'),
    (["--mixed_precision", "fp16", "--full_bf16"],
     'full_bf16: needs mixed_precision = "bf16" (it is "fp16"); set mixed_precision = '
     '"bf16" or remove full_bf16'),
    (["--mixed_precision", "bf16", "--full_fp16"],
     'full_fp16: needs mixed_precision = "fp16" (it is "bf16"); set mixed_precision = '
     '"fp16" or remove full_fp16'),
    (["--mixed_precision", "bf16", "--full_bf16", "--full_fp16"],
     "full_fp16: contradicts full_bf16 = true; set at most one of them"),
])
def test_full_precision_needs_the_matching_mixed_precision(argv, fragment):
    found = problems(*argv)
    assert len(found) == 1 and fragment in found[0], found


def test_full_precision_in_a_toml_names_the_file_and_section(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[training_arguments]\nmixed_precision = "fp16"\nfull_bf16 = true\n')
    assert problems("--config_file", str(f)) == [
        f'{f}: [training_arguments] full_bf16: needs mixed_precision = "bf16" (it is "fp16"); '
        'set mixed_precision = "bf16" or remove full_bf16']


@pytest.mark.parametrize("argv", [["--mixed_precision", "bf16", "--full_bf16"],
                                  ["--mixed_precision", "fp16", "--full_fp16"], []])
def test_matching_full_precision_loads(argv):
    t = load_config(argv, check_paths=False).config.training
    assert (t.full_bf16, t.full_fp16) == ("--full_bf16" in argv, "--full_fp16" in argv)


def test_full_bf16_on_cpu_falls_back_to_fp32_and_trains(tmp_path, tiny_sd15_dir, data,
                                                        caplog):
    import torch
    if torch.cuda.is_available():
        pytest.skip("the fallback is the CPU path")
    caplog.set_level(logging.WARNING, "tomlora")
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "2",
               "--mixed_precision", "bf16", "--full_bf16") == 0
    assert 'mixed_precision = "bf16" needs a CUDA GPU' in caplog.text
    assert "full_bf16 is ignored" in caplog.text
    w = load_file(str(tmp_path / "out" / "t.safetensors"))
    assert w and all(v.dtype == torch.float32 for v in w.values())  # save_precision float


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_lora_cast_to_half_trains_on_a_full_precision_base(dtype):
    # What full_bf16 / full_fp16 do on CUDA (network.to(dtype)), on a CPU-sized module: the
    # LoRA casts its input to its own dtype, its gradients come out in that dtype and the
    # output keeps the base's dtype.
    import torch
    from networks.lora import LoRANetwork, Target
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8)
    net = LoRANetwork([Target("lora_unet_x", base, 4, 4.0)]).attach().train()
    net.to(dt)
    m = [x for x in net.modules() if hasattr(x, "lora_up")][0]
    torch.nn.init.normal_(m.lora_up.weight)
    out = base(torch.randn(3, 8))
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert m.lora_up.weight.dtype == dt and m.lora_up.weight.grad.dtype == dt
    assert m.lora_down.weight.grad is not None and m.lora_down.weight.grad.abs().sum() > 0
    assert base.weight.dtype == torch.float32  # network.to() leaves the base module alone
    assert all(v.dtype == torch.float32 for v in net.kohya_state_dict(torch.float32).values())


# ---- on a CUDA GPU (the device machine; skipped here) ---------------------------------------
import torch  # noqa: E402

from tests.train.test_speed import curve_and_weights  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="fp16/bf16 mixed precision, the gradient scaler and full_bf16 "
                                "/ full_fp16 need a CUDA GPU: run on the device machine")


@gpu
@pytest.mark.parametrize("flags, log", [
    (["--mixed_precision", "fp16"], "gradient scaler"),
    (["--mixed_precision", "fp16", "--full_fp16"], "full_fp16: LoRA weights and gradients"),
    (["--mixed_precision", "bf16"], None),
    (["--mixed_precision", "bf16", "--full_bf16"], "full_bf16: LoRA weights and gradients"),
], ids=["fp16", "full_fp16", "bf16", "full_bf16"])
def test_gpu_precision_follows_the_fp32_curve(tmp_path, tiny_sd15_dir, data, flags, log,
                                             caplog):
    steps = ["--max_train_steps", "6"]
    assert run(tmp_path / "fp32", tiny_sd15_dir, data, *steps) == 0
    with caplog.at_level("INFO", logger="tomlora"):
        assert run(tmp_path / "mp", tiny_sd15_dir, data, *steps, *flags) == 0
    if log:
        assert log in caplog.text
    (a, wa), (b, wb) = curve_and_weights(tmp_path / "fp32"), curve_and_weights(tmp_path / "mp")
    assert len(a) == len(b) == 6 and all(torch.isfinite(torch.tensor(b)))
    # 16-bit numerics on a random tiny model: the curves agree to a few per cent (measured on
    # an H200: at most 8 % at one step, full_fp16), the weights as a whole to 10 %. Adam's
    # first steps move each element by about lr whatever the gradient's size, so single
    # elements with near-zero gradients may differ by up to 2 * steps * lr; the norm does not.
    assert b == pytest.approx(a, rel=0.15)
    assert sum(abs(x - y) for x, y in zip(a, b)) / sum(a) < 0.05
    assert all(wb[k].dtype == torch.float32 for k in wb)  # save_precision float
    ups = [k for k in wb if "lora_up" in k]
    moved = [k for k in ups if wb[k].abs().sum() > 0]  # trained off the zero init
    if "--full_fp16" in flags:
        # AdamW's fp16 state underflows for the smallest gradients (measured: some text-
        # encoder LoRA tensors did not move in 6 steps; docs/TRAINING.md): the UNet's must
        ups = [k for k in ups if k.startswith("lora_unet")]
    assert ups and set(ups) <= set(moved)
    up_a = torch.cat([wa[k].flatten() for k in ups])
    up_b = torch.cat([wb[k].flatten() for k in ups])
    assert (up_b - up_a).norm() / up_a.norm() < 0.1


@gpu
def test_gpu_fp16_resume_restores_the_gradient_scaler(tmp_path, tiny_sd15_dir, data):
    fp16 = ["--mixed_precision", "fp16", "--max_train_steps", "6"]
    assert run(tmp_path / "a", tiny_sd15_dir, data, *fp16, "--save_every_n_steps", "3",
               "--save_state") == 0
    state = tmp_path / "a" / "out" / "t-step00000003-state"
    blob = decode(json.loads((state / "training.json").read_text()),  # no pickle
                  load_file(str(state / "training.safetensors")))
    assert blob["scaler"] is not None and blob["scaler"]["scale"] > 0
    assert run(tmp_path / "b", tiny_sd15_dir, data, *fp16, "--resume", str(state)) == 0
    (a, wa), (b, wb) = curve_and_weights(tmp_path / "a"), curve_and_weights(tmp_path / "b")
    assert len(b) == 3 and b == pytest.approx(a[3:], rel=1e-3)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-2, atol=1e-4)
