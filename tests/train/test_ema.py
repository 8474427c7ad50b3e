"""EMA of the LoRA weights (library/train/ema.py): the update against its formula, the swap
for sampling and saving, the state tensors, and exact resume through the real CLI from TOML."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.train.ema import LoraEMA, NoEMA, ema_decay_at, make_ema
from tests.test_train_e2e import read_scalars
from tools.make_demo_dataset import make_dataset


def test_decay_warms_up_then_holds():
    assert ema_decay_at(0.99, 1) == pytest.approx(0.1)        # (1 + 0) / (10 + 0)
    assert ema_decay_at(0.99, 10) == pytest.approx(10 / 19)
    assert ema_decay_at(0.99, 82) == pytest.approx(82 / 91)
    assert ema_decay_at(0.99, 5000) == 0.99
    assert ema_decay_at(0.5, 20) == 0.5


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = torch.nn.Parameter(torch.ones(2, 3))
        self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)


@pytest.mark.parametrize("cpu", [False, True])
def test_update_follows_the_formula(cpu):
    net = Net()
    ema = LoraEMA(net, 0.9, cpu=cpu)
    expected = {n: p.detach().double().clone() for n, p in net.named_parameters()
                if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    for step in range(1, 30):
        with torch.no_grad():  # what an optimizer step would do
            for p in (net.a, net.b):
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(step)
        d = min(0.9, step / (step + 9))
        for n, p in net.named_parameters():
            if n in expected:
                expected[n] = d * expected[n] + (1 - d) * p.detach().double()
    got = ema.state_tensors()
    assert set(got) == {"ema.a", "ema.b"}                 # only trained tensors
    for n, e in expected.items():
        torch.testing.assert_close(got[f"ema.{n}"].double(), e, rtol=1e-6, atol=1e-6)
        assert got[f"ema.{n}"].dtype == torch.float32


def test_applied_swaps_the_average_in_and_restores_the_weights_exactly():
    net = Net()
    ema = LoraEMA(net, 0.9)
    with torch.no_grad():
        net.a.add_(0.123456789)
    ema.update(1)
    before = net.a.detach().clone()
    with ema.applied():
        torch.testing.assert_close(net.a.detach(), ema.state_tensors()["ema.a"])
        assert not torch.equal(net.a.detach(), before)
    assert torch.equal(net.a.detach(), before)


def test_state_tensors_load_in_place_and_a_state_without_them_restarts(caplog):
    net = Net()
    ema = LoraEMA(net, 0.9)
    with torch.no_grad():
        net.b.mul_(3)
    ema.update(1)
    saved = {k: v.clone() for k, v in ema.state_tensors().items()}
    other = LoraEMA(Net(), 0.9)
    other.load_state_tensors(saved)
    for k, v in saved.items():
        assert torch.equal(other.state_tensors()[k], v)
    with caplog.at_level(logging.WARNING, logger="tomlora"):
        other.load_state_tensors({}, source="resume: x")
    assert "no EMA" in caplog.text
    assert torch.equal(other.state_tensors()["ema.b"], torch.ones(2, 3))  # its weights
    with pytest.raises(ValueError, match="shape"):
        other.load_state_tensors({**saved, "ema.a": torch.zeros(3)})


def test_no_ema_is_a_no_op():
    class T:
        ema_decay, ema_cpu = None, False
    ema = make_ema(T(), Net())
    assert isinstance(ema, NoEMA) and ema.state_tensors() == {}
    with ema.applied():
        ema.update(1)


# ---- through the CLI, from TOML --------------------------------------------------------------
def write_config(tmp_path: Path, model: Path, data: Path, name: str) -> Path:
    config = tmp_path / f"{name}.toml"
    config.write_text(f"""
[model]
pretrained_model_name_or_path = "{model}"
[dataset]
train_data_dir = "{data}"
resolution = 64
train_batch_size = 2
[training]
max_train_steps = 6
seed = 7
ema_decay = 0.8
timestep_sampling = "cosmap"
[lora]
network_dim = 4
[optimizer]
learning_rate = 1e-2
[saving]
output_dir = "{tmp_path / name}"
output_name = "t"
save_precision = "float"
""")
    return config


def test_resume_restores_the_ema_exactly(tmp_path, tiny_sd15_dir):
    data = make_dataset(tmp_path / "data", count=4, size=64, seed=3, repeats=2).parent
    a = write_config(tmp_path, tiny_sd15_dir, data, "a")
    assert train_network.main(["--config_file", str(a), "--save_every_n_steps", "3",
                               "--save_state", "--logging_dir", str(tmp_path / "la")]) == 0
    state = tmp_path / "a" / "t-step00000003-state"
    assert (state / "extra.safetensors").is_file()
    b = write_config(tmp_path, tiny_sd15_dir, data, "b")
    assert train_network.main(["--config_file", str(b), "--resume", str(state),
                               "--logging_dir", str(tmp_path / "lb")]) == 0
    la = read_scalars(tmp_path / "la")["loss/current"]
    lb = read_scalars(tmp_path / "lb")["loss/current"]
    assert lb == pytest.approx(la[3:], abs=1e-6)
    wa = load_file(str(tmp_path / "a" / "t.safetensors"))
    wb = load_file(str(tmp_path / "b" / "t.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    # The saved file is the average, not the last weights (kept in the state for resume).
    raw = load_file(str(tmp_path / "a" / "t-state" / "lora.safetensors"))
    ups = [k for k in raw if k.endswith("lora_up.weight")]
    assert max(float((raw[k] - wa[k]).abs().max()) for k in ups) > 1e-4
    avg = load_file(str(tmp_path / "a" / "t-state" / "extra.safetensors"))
    k = ups[0]
    torch.testing.assert_close(wa[k], avg[f"ema.loras.{k.removesuffix('.lora_up.weight')}"
                                           f".lora_up.weight"])
