"""networks/network_args.py: typing and checking kohya's network_args, block lr weights."""
from __future__ import annotations

import math

import pytest

from networks.network_args import (NetworkArgs, NetworkArgsError, parse_network_args,
                                   rank_spec)


def problems_of(raw, family="sd15") -> list[str]:
    with pytest.raises(NetworkArgsError) as e:
        parse_network_args(raw, family)
    return e.value.problems


def test_empty_args_are_the_defaults():
    assert parse_network_args({}, "sd15") == NetworkArgs()
    assert rank_spec(NetworkArgs(), 8, 4.0, "sdxl").block_dims is None


def test_scalars_are_typed_from_strings_and_numbers():
    a = parse_network_args({"conv_dim": "4", "conv_alpha": 1, "rank_dropout": 0.1,
                            "module_dropout": "0.2", "loraplus_lr_ratio": 16}, "sdxl")
    assert (a.conv_dim, a.conv_alpha, a.rank_dropout, a.module_dropout) == (4, 1.0, 0.1, 0.2)
    assert a.loraplus_unet == a.loraplus_text_encoder == 16.0
    a = parse_network_args({"loraplus_lr_ratio": 16, "loraplus_unet_lr_ratio": 4}, "sdxl")
    assert (a.loraplus_unet, a.loraplus_text_encoder) == (4.0, 16.0)


@pytest.mark.parametrize("family,n", [("sd15", 25), ("sdxl", 23)])
def test_block_lists_as_string_or_array(family, n):
    dims = list(range(n))
    a = parse_network_args({"block_dims": ",".join(map(str, dims)),
                            "block_alphas": [1.5] * n, "conv_block_dims": dims,
                            "conv_block_alphas": " , ".join(["2"] * n)}, family)
    assert a.block_dims == tuple(dims) and a.conv_block_dims == tuple(dims)
    assert a.block_alphas == (1.5,) * n and a.conv_block_alphas == (2.0,) * n


@pytest.mark.parametrize("family,n,order", [("sd15", 25, "IN00..IN11, MID, OUT00..OUT11"),
                                            ("sdxl", 23, "BASE, IN00..IN08")])
def test_wrong_block_count_names_network_args_and_expected_length(family, n, order):
    [msg] = problems_of({"block_dims": "4,4,4"}, family)
    assert msg.startswith("[lora] network_args: block_dims: has 3 values; ")
    assert f"{family} needs {n}" in msg and order in msg


def test_every_problem_at_once_with_valid_keys_listed():
    probs = problems_of({"algo": "lora", "dropout": 0.1, "conv_dmi": 4, "conv_dim": "x",
                         "rank_dropout": 1.5, "block_alphas": [0] * 25,
                         "down_lr_weight": "sin", "conv_alpha": 0})
    text = "\n".join(probs)
    assert len(probs) == 8, text
    assert "unknown key 'algo'" in text and "valid keys for networks.lora: conv_dim" in text
    assert "unknown key 'dropout' (use the [lora] key network_dropout)" in text
    assert "unknown key 'conv_dmi' (did you mean conv_dim?)" in text
    assert "conv_dim: 'x' is not a number" in text
    assert "rank_dropout: 1.5 out of range; it must be >= 0 and < 1" in text
    assert "block_alphas: alphas must be > 0" in text
    assert "down_lr_weight: unknown preset 'sin'; valid presets: cosine, sine" in text
    assert "conv_alpha: 0 is ambiguous" in text


def test_without_family_lengths_are_not_checked_but_values_are():
    a = parse_network_args({"block_dims": "4,4", "down_lr_weight": "sine"}, None)
    assert a.block_dims == (4, 4) and a.lr_weights is None
    assert problems_of({"up_lr_weight": "1,x"}, None) == [
        "[lora] network_args: up_lr_weight: 'x' is not a number"]


def sine(i, n):
    return math.sin(math.pi * (i / (n - 1)) / 2)


def test_sd15_lr_weight_presets_follow_kohya():
    a = parse_network_args({"down_lr_weight": "sine", "mid_lr_weight": 0.5,
                            "up_lr_weight": "cosine+0.25"}, "sd15")
    w = a.lr_weights
    assert len(w) == 25
    assert w[0] == 0.0 and w[11] == pytest.approx(1.0) and w[5] == pytest.approx(sine(5, 12))
    assert w[12] == 0.5  # MID
    assert w[13] == pytest.approx(1.25) and w[24] == pytest.approx(0.25)  # OUT00, OUT11
    lin = parse_network_args({"down_lr_weight": "linear", "up_lr_weight": "reverse_linear"},
                             "sd15").lr_weights
    assert lin[:12] == pytest.approx([i / 11 for i in range(12)])
    assert lin[12] == 1.0 and lin[13:] == pytest.approx([1 - i / 11 for i in range(12)])
    zeros = parse_network_args({"up_lr_weight": "zeros+0.5"}, "sd15").lr_weights
    assert zeros == (1.0,) * 13 + (0.5,) * 12


def test_sdxl_lr_weights_keep_base_and_out_at_one():
    a = parse_network_args({"down_lr_weight": [0.5] * 9, "mid_lr_weight": "0,1,0.5",
                            "up_lr_weight": "zeros"}, "sdxl")
    assert a.lr_weights == (1.0,) + (0.5,) * 9 + (0.0, 1.0, 0.5) + (0.0,) * 9 + (1.0,)


def test_short_lists_fill_with_one_and_empty_entries_are_zero():
    a = parse_network_args({"down_lr_weight": "1,,0.5"}, "sd15")
    assert a.lr_weights[:4] == (1.0, 0.0, 0.5, 1.0) and len(a.lr_weights) == 25
    assert "down_lr_weight has 3 of 12 values" in a.warnings[0]
    [msg] = problems_of({"up_lr_weight": [1] * 10}, "sdxl")
    assert msg == "[lora] network_args: up_lr_weight: has 10 values; sdxl has 9 up blocks"


def test_zero_threshold_and_zero_weight_blocks_get_no_modules():
    a = parse_network_args({"down_lr_weight": "0.05,0.2,0.5", "block_lr_zero_threshold": 0.2,
                            "conv_dim": 2}, "sd15")
    assert a.lr_weights[:4] == (0.0, 0.0, 0.5, 1.0)
    spec = rank_spec(a, 8, 4.0, "sd15")
    assert spec.block_dims[:4] == (0, 0, 8, 8) and spec.conv_block_dims[:4] == (0, 0, 2, 2)
    assert spec.block_alphas == (4.0,) * 25 and spec.conv_block_alphas == (None,) * 25


def test_rank_spec_per_block_tables():
    dims = [i % 5 for i in range(23)]
    a = parse_network_args({"block_dims": dims, "block_alphas": [2] * 23,
                            "conv_block_dims": [1] * 23}, "sdxl")
    spec = rank_spec(a, 8, None, "sdxl")
    assert spec.block_dims == tuple(dims) and spec.block_alphas == (2.0,) * 23
    assert spec.include_conv and spec.conv_block_dims == (1,) * 23
    assert spec.for_module(False, 4) == (4, 2.0) and spec.for_module(True, 4) == (1, None)
    assert spec.for_module(False, -1) == (8, None)  # outside the blocks: network_dim


# ---- LyCORIS (network_module = "lycoris.kohya") ---------------------------------------------

def test_lycoris_args_as_kohya_ss_writes_them():
    from networks.adapters.base import AdapterSpec
    a = parse_network_args({"algo": "lokr", "factor": 8, "conv_dim": 4, "conv_alpha": 1,
                            "preset": "full", "dora_wd": "True", "use_tucker": False,
                            "use_scalar": "false", "rank_dropout": 0.1, "module_dropout": 0,
                            "train_norm": False, "decompose_both": True,
                            "rank_dropout_scale": True, "bypass_mode": True},
                           "sdxl", "lycoris.kohya")
    assert a.spec == AdapterSpec("lokr", factor=8, dora=True, decompose_both=True,
                                 rank_dropout_scale=True)
    assert a.preset == "full" and a.conv_dim == 4 and a.rank_dropout == 0.1
    assert any("bypass_mode" in w for w in a.warnings)
    assert parse_network_args({}, "sd15", "lycoris.kohya").preset == "full"
    assert parse_network_args({"use_cp": True}, "sd15", "lycoris.kohya").spec.use_tucker
    assert parse_network_args({"conv_alpha": 0}, "sd15", "lycoris.kohya").conv_alpha is None


def test_network_type_is_the_plain_spelling():
    a = parse_network_args({"factor": 4}, "sd15", network_type="lokr")
    assert a.spec.algo == "lokr" and a.spec.factor == 4 and a.preset is None
    assert parse_network_args({}, "sd15", network_type="locon").spec.algo == "lora"


@pytest.mark.parametrize("raw,module,network_type,message", [
    ({"algo": "loha"}, "networks.lora", None, "unknown key 'algo' (set network_module"),
    ({"preset": "full"}, "networks.lora", None, "preset: needs network_module"),
    ({"algo": "loha"}, "lycoris.kohya", "lokr", "algo=loha contradicts [lora] network_type"),
    ({"algo": "boft"}, "lycoris.kohya", None, "algo: BOFT is not supported"),
    ({"constraint": 0.1}, "lycoris.kohya", None, "constraint: only LyCORIS's OFT/BOFT"),
    ({"down_lr_weight": "sine"}, "lycoris.kohya", None, "down_lr_weight: a networks.lora"),
    ({"algo": "full", "dora_wd": True}, "lycoris.kohya", None, "DoRA applies to"),
    ({"use_tucker": "maybe"}, "lycoris.kohya", None, "use_tucker: expected true or false"),
    ({"preset": "my_preset.toml"}, "lycoris.kohya", None, "preset files are not supported"),
    ({"factr": 4}, "lycoris.kohya", None, "did you mean factor?"),
])
def test_lycoris_arg_errors_name_the_arg(raw, module, network_type, message):
    with pytest.raises(NetworkArgsError) as e:
        parse_network_args(raw, "sd15", module, network_type)
    assert message in str(e.value), str(e.value)
