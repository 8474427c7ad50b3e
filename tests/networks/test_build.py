"""networks/build.py: the run's network from the config, and network_weights (strict)."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from library.config.schema import Config
from library.models.loading import FAMILIES
from networks.build import build_network, load_network_weights, skipped_prefixes
from networks.network_args import parse_network_args
from tests.networks.helpers import encoders, load_pipe, one_thread, randomise, save  # noqa: F401


def make_cfg(**lora) -> Config:
    c = Config()
    return replace(c, lora=replace(c.lora, **lora))


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    pipe = load_pipe(tiny_sd15_dir)
    return pipe, SimpleNamespace(unet=pipe.unet, text_encoders=encoders(pipe)), FAMILIES["sd15"]


def build(sd15, **lora):
    _, c, fam = sd15
    cfg = make_cfg(**lora)
    return build_network(c, fam, cfg, parse_network_args(cfg.lora.network_args, "sd15")), cfg


def load(net, path, sd15, cfg=None):
    pipe, _, fam = sd15
    skip = skipped_prefixes(cfg, fam) if cfg is not None else ()
    return load_network_weights(net, path, "sd15", dict(pipe.unet.config), skip)


def params(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_network_weights_resume_exactly_in_both_layouts(sd15, tmp_path):
    pipe = sd15[0]
    net, _ = build(sd15, network_dim=4, network_alpha=2.0,
                   network_args={"conv_dim": 2, "conv_alpha": 1})
    randomise(net, seed=7)
    kohya = save(net, tmp_path / "k.safetensors", "sd15", pipe)
    fresh, _ = build(sd15, network_dim=4, network_alpha=2.0,
                     network_args={"conv_dim": 2, "conv_alpha": 1})
    notes = load(fresh, kohya, sd15)
    assert notes == [f"network_weights: started from {kohya} ({len(net)} modules)"]
    want = params(net)
    assert all(torch.equal(v, want[k]) for k, v in params(fresh).items())

    peft = save(net, tmp_path / "pytorch_lora_weights.safetensors", "sd15", pipe,
                layout="diffusers")
    other, _ = build(sd15, network_dim=4, network_alpha=2.0,
                     network_args={"conv_dim": 2, "conv_alpha": 1})
    load(other, peft, sd15)  # no alpha in the peft layout: alpha = rank, scale baked in
    for name, m in other.loras.items():
        torch.testing.assert_close(m.delta_weight(), net.loras[name].delta_weight(),
                                   rtol=1e-5, atol=1e-7)


def test_mismatched_files_fail_naming_the_file(sd15, tmp_path):
    pipe = sd15[0]
    net, _ = build(sd15, network_dim=4)
    path = save(net, tmp_path / "r4.safetensors", "sd15", pipe)
    smaller, _ = build(sd15, network_dim=2)
    before = params(smaller)
    with pytest.raises(ValueError) as e:
        load(smaller, path, sd15)
    msg = str(e.value)
    assert msg.startswith(f"network_weights {path}: does not match this network")
    assert "shape mismatches" in msg and "dim_from_weights = true" in msg
    assert all(torch.equal(v, before[k]) for k, v in params(smaller).items())  # untouched

    unet_only, cfg = build(sd15, network_dim=4, network_train_unet_only=True)
    unet_file = save(unet_only, tmp_path / "unet.safetensors", "sd15", pipe)
    with pytest.raises(ValueError, match=r"missing keys, e\.g\. \['lora_te_text_model"):
        load(build(sd15, network_dim=4)[0], unet_file, sd15)
    with pytest.raises(ValueError, match="not found"):
        load(net, tmp_path / "nope.safetensors", sd15)


def test_untrained_components_of_the_file_are_left_out(sd15, tmp_path):
    net, _ = build(sd15, network_dim=4)
    randomise(net, seed=3)
    path = save(net, tmp_path / "both.safetensors", "sd15", sd15[0])
    unet_only, cfg = build(sd15, network_dim=4, network_train_unet_only=True)
    notes = load(unet_only, path, sd15, cfg)
    n_te = len(net.parts()["lora_te"])
    assert n_te == 12 and notes[0] == (f"network_weights: {n_te} modules of components not "
                                       "trained in this run (lora_te) left out")
    for name, m in unet_only.loras.items():
        assert torch.equal(m.lora_up.weight, net.loras[name].lora_up.weight)


def test_dim_from_weights_takes_modules_ranks_and_alphas_from_the_file(sd15, tmp_path):
    net, _ = build(sd15, network_dim=4, network_alpha=1.0, network_args={"conv_dim": 2})
    randomise(net, seed=4)
    path = save(net, tmp_path / "f.safetensors", "sd15", sd15[0])
    other, cfg = build(sd15, network_dim=16, network_weights=str(path), dim_from_weights=True)
    assert sorted(other.loras) == sorted(net.loras)
    load(other, path, sd15, cfg)
    for name, m in other.loras.items():
        assert (m.rank, float(m.alpha)) == (net.loras[name].rank, float(net.loras[name].alpha))
        assert torch.equal(m.lora_up.weight, net.loras[name].lora_up.weight)
