"""networks/param_groups.py: unet_lr / text_encoder_lr (one or per encoder), kohya's block lr
weights and LoRA+ give the expected learning rate to every parameter; lr 0 freezes."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from library.config.schema import Config
from library.models.loading import FAMILIES
from networks import formats
from networks.build import build_network
from networks.network_args import NetworkArgsError, parse_network_args
from networks.param_groups import check_config, param_groups, text_encoder_lrs
from tests.networks.helpers import encoders, load_pipe, one_thread  # noqa: F401


def make_cfg(lora=None, **optimizer) -> Config:
    c = Config()
    return replace(c, lora=replace(c.lora, **(lora or {})),
                   optimizer=replace(c.optimizer, **optimizer))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    pipe = load_pipe(tiny_sdxl_dir)
    return SimpleNamespace(unet=pipe.unet, text_encoders=encoders(pipe)), FAMILIES["sdxl"]


def groups_for(sdxl, cfg):
    c, fam = sdxl
    args = parse_network_args(cfg.lora.network_args, "sdxl")
    net = build_network(c, fam, cfg, args)
    return net, param_groups(net, cfg, "sdxl", dict(c.unet.config), args)


def lr_of(groups) -> dict[int, float]:
    """id(parameter) -> its lr; each parameter in exactly one group."""
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = g["lr"]
    return out


def test_part_learning_rates_and_loraplus(sdxl):
    cfg = make_cfg({"network_args": {"loraplus_lr_ratio": 16, "loraplus_unet_lr_ratio": 4}},
                   learning_rate=1e-4, unet_lr=2e-4, text_encoder_lr=(1e-5, 3e-5))
    net, groups = groups_for(sdxl, cfg)
    assert [g["name"] for g in groups] == [
        "lora_unet", "lora_unet/plus", "lora_te1", "lora_te1/plus", "lora_te2", "lora_te2/plus"]
    lrs = lr_of(groups)
    base = {"lora_unet": 2e-4, "lora_te1": 1e-5, "lora_te2": 3e-5}
    ratio = {"lora_unet": 4, "lora_te1": 16, "lora_te2": 16}
    for part, mods in net.parts().items():
        for m in mods:
            assert lrs[id(m.lora_down.weight)] == base[part]
            assert lrs[id(m.lora_up.weight)] == pytest.approx(base[part] * ratio[part])
    assert len(lrs) == len(list(net.parameters()))


def test_one_text_encoder_lr_applies_to_both_and_defaults():
    assert text_encoder_lrs(None, 1e-4, "sdxl") == {"lora_te1": 1e-4, "lora_te2": 1e-4}
    assert text_encoder_lrs(5e-5, 1e-4, "sdxl") == {"lora_te1": 5e-5, "lora_te2": 5e-5}
    assert text_encoder_lrs((5e-5,), 1e-4, "sd15") == {"lora_te": 5e-5}
    with pytest.raises(ValueError, match="text_encoder_lr: 2 values given but sd15 has 1 text"):
        text_encoder_lrs((1e-4, 1e-5), 1e-4, "sd15")
    cfg = make_cfg({"network_args": {"conv_dim": "x"}}, text_encoder_lr=(1e-4, 1e-5))
    with pytest.raises(NetworkArgsError) as e:
        check_config(cfg, "sd15")
    assert len(e.value.problems) == 2  # every problem at once


def test_block_lr_weights_per_kohya_block(sdxl):
    cfg = make_cfg({"network_args": {"down_lr_weight": [0.5] * 9, "mid_lr_weight": "0,1,0.25",
                                     "up_lr_weight": "zeros+0.75"}},
                   learning_rate=1e-4, unet_lr=2e-4)
    net, groups = groups_for(sdxl, cfg)
    c, _ = sdxl
    lrs = lr_of(groups)
    blocks = set()
    for m in net.parts()["lora_unet"]:
        block = formats.lora_block_index(m.lora_name, "sdxl", dict(c.unet.config))
        blocks.add(block)
        want = 2e-4 * (0.5 if block <= 9 else {11: 1.0, 12: 0.25}.get(block, 0.75))
        assert block != 10, "middle_block.0 has lr weight 0: kohya leaves it out"
        assert lrs[id(m.lora_down.weight)] == pytest.approx(want), m.lora_name
    assert {5, 13, 18} <= blocks and 10 not in blocks  # attention blocks only (no conv_dim)
    names = [g["name"] for g in groups]
    assert "lora_unet/block05" in names and "lora_unet/block10" not in names
    assert all(lrs[id(p)] == 1e-4 for m in net.parts()["lora_te1"] for p in m.parameters())


def test_zero_lr_freezes_and_all_zero_is_an_error(sdxl):
    cfg = make_cfg(unet_lr=0.0, text_encoder_lr=(0.0, 1e-5))
    net, groups = groups_for(sdxl, cfg)
    assert [g["name"] for g in groups] == ["lora_te2"]
    frozen = [p for part in ("lora_unet", "lora_te1") for m in net.parts()[part]
              for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for m in net.parts()["lora_te2"] for p in m.parameters())
    with pytest.raises(ValueError, match="every learning rate is 0"):
        groups_for(sdxl, make_cfg(unet_lr=0.0, text_encoder_lr=0.0))


def test_top_level_loraplus_flag_overrides_network_args(sdxl):
    from library.config import load_config
    cfg = load_config(["--network_args", "loraplus_lr_ratio=16", "--loraplus_lr_ratio", "4",
                       "--learning_rate", "1e-4"], check_paths=False).config
    c, fam = sdxl
    args = check_config(cfg, "sdxl")  # what train_network.py calls
    net = build_network(c, fam, cfg, args)
    groups = param_groups(net, cfg, "sdxl", dict(c.unet.config), args)
    lrs = lr_of(groups)
    for m in net:
        assert lrs[id(m.lora_down.weight)] == pytest.approx(1e-4)
        assert lrs[id(m.lora_up.weight)] == pytest.approx(4e-4)
