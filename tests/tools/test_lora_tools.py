"""tools/convert_lora.py, tools/check_lora.py and tools/show_metadata.py on files our writer
made for the tiny models, and networks/file_rules.py on deliberately broken files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, safe_open

from library.config.schema import Config
from library.train.saving import config_json
from networks import file_rules
from networks.kohya_file import read_lora, write_lora
from networks.targets import RankSpec
from tests.networks.helpers import load_pipe, one_thread, random_network, save  # noqa: F401
from tools import check_lora, convert_lora, show_metadata


@pytest.fixture(scope="module")
def files(tiny_sdxl_dir, tiny_sd15_dir, tmp_path_factory):
    """Our kohya files: SDXL UNet+TEs+LoCon at fp16 (alpha/rank 0.5), SDXL fp32 with
    alpha/rank 0.75, SD1.5 UNet+TE, and an untrained SD1.5 one."""
    d = tmp_path_factory.mktemp("loras")
    xl = load_pipe(tiny_sdxl_dir)
    net = random_network(xl, "sdxl", RankSpec(4, 2.0, 2, 1.0), seed=1)
    out = {"xl16": save(net, d / "xl16.safetensors", "sdxl", xl, precision="fp16")}
    net = random_network(xl, "sdxl", RankSpec(4, 3.0), seed=2)
    out["xl32"] = save(net, d / "xl32.safetensors", "sdxl", xl)
    sd = load_pipe(tiny_sd15_dir)
    net = random_network(sd, "sd15", RankSpec(4, None), seed=3)
    out["sd15"] = save(net, d / "sd15.safetensors", "sd15", sd)
    net = random_network(sd, "sd15", RankSpec(4, None), seed=3, scale=0.0)
    out["fresh"] = save(net, d / "fresh.safetensors", "sd15", sd)
    return out


def test_kohya_diffusers_kohya_round_trip_is_exact(files, tmp_path, tiny_sdxl_dir, capsys):
    src = files["xl16"]
    assert convert_lora.main([str(src), str(tmp_path), "--to", "diffusers", "--model",
                              str(tiny_sdxl_dir)]) == 0
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    assert f"wrote {peft_file}" in capsys.readouterr().out
    peft, meta = read_lora(peft_file)
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in peft)
    assert "lora_adapter_metadata" not in meta and meta["ss_network_dim"] == "4"
    assert set(json.loads(meta["tomlora_alphas"]).values()) == {1.0, 2.0}
    back = tmp_path / "back.safetensors"
    assert convert_lora.main([str(peft_file), str(back), "--to", "kohya"]) == 0  # family
    original, converted = load_file(str(src)), load_file(str(back))           # from keys
    assert original.keys() == converted.keys()
    for k, v in original.items():
        assert converted[k].dtype == v.dtype and torch.equal(converted[k], v), k
    _, back_meta = read_lora(back)
    assert "tomlora_alphas" not in back_meta and back_meta["ss_network_dim"] == "4"


def test_round_trip_with_any_alpha_keeps_alpha_and_delta(files, tmp_path):
    src = files["xl32"]  # alpha 3, rank 4: the 0.75 scale is baked and unbaked in fp32
    peft = convert_lora.convert(src, tmp_path / "p.safetensors", "diffusers", family="sdxl")
    back = convert_lora.convert(peft, tmp_path / "b.safetensors", "kohya")
    original, converted = load_file(str(src)), load_file(str(back))
    for k, v in original.items():
        if k.endswith(".alpha"):
            assert torch.equal(converted[k], v)
        else:
            torch.testing.assert_close(converted[k], v, rtol=1e-6, atol=1e-8)
    # a peft file from elsewhere: --alpha sets alpha and keeps the delta
    plain = tmp_path / "plain.safetensors"
    write_lora(plain, load_file(str(peft)), {})
    fixed = convert_lora.convert(plain, tmp_path / "a.safetensors", "kohya", alpha=1.0)
    sd = load_file(str(fixed))
    stem = next(k for k in sd if k.endswith(".alpha"))[:-len(".alpha")]
    assert float(sd[f"{stem}.alpha"]) == 1.0
    torch.testing.assert_close(sd[f"{stem}.lora_up.weight"] / 4,
                               original[f"{stem}.lora_up.weight"] * 0.75, rtol=1e-6, atol=1e-8)


def test_convert_errors_exit_2(files, tmp_path, capsys):
    src = files["sd15"]
    assert convert_lora.main([str(src), str(tmp_path / "x"), "--to", "kohya"]) == 2
    assert "is already in the kohya layout (--to kohya converts a peft file)" in \
        capsys.readouterr().err
    assert convert_lora.main([str(tmp_path / "nope.safetensors"), str(tmp_path),
                              "--to", "diffusers"]) == 2
    assert "not found" in capsys.readouterr().err
    assert convert_lora.main([str(src), str(src), "--to", "diffusers"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_check_lora_passes_our_files(files, capsys):
    assert check_lora.main([str(files["xl16"]), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "ok: follows the kohya LoRA format rules" in out
    assert "lora_unet:" in out and "lora_te1: 18 modules, ranks [4], alphas [2.0]" in out
    assert "never trained 0" in out
    assert check_lora.main([str(files["sd15"])]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines()
               if line.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1 "))
    assert row.split()[1:4] == ["4", "4", "1"]  # rank, alpha, scale


def test_check_lora_flags_untrained_modules(files, capsys):
    assert check_lora.main([str(files["fresh"]), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and "modules never trained (lora_up is all zeros)" in out


def test_check_lora_flags_a_broken_file(files, tmp_path, capsys):
    sd, meta = read_lora(files["sd15"])
    layer = "lora_te_text_model_encoder_layers_1_self_attn_out_proj"
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        del sd[layer + suffix]
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.scale"] = torch.ones(())
    broken = tmp_path / "broken.safetensors"
    write_lora(broken, sd, meta)
    assert check_lora.main([str(broken), "--summary"]) == 1
    out = capsys.readouterr().out
    assert "RULE BROKEN: 1 extra tensors" in out and ".scale" in out
    assert "RULE BROKEN: 1 partial text-encoder layers" in out
    assert "lora_te layer 1 lacks ['self_attn_out_proj']" in out


def rename(sd, old, new):
    return {k.replace(old, new): v for k, v in sd.items()}


def test_file_rules_catch_each_hazard(files):
    xl = load_file(str(files["xl16"]))
    sd15 = load_file(str(files["sd15"]))
    assert file_rules.rule_problems(xl, "sdxl") == []
    assert file_rules.rule_problems(sd15, "sd15") == []
    [p] = file_rules.rule_problems(rename(xl, "lora_te1_", "lora_te_"), "sdxl")
    assert "use lora_te_ on sdxl" in p
    [p] = file_rules.rule_problems(rename(sd15, "lora_unet_down_blocks_1_attentions_0",
                                          "lora_unet_input_blocks_4_1"), "sd15")
    assert "use LDM names on sd15" in p
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    flat = dict(sd15, **{f"{stem}.lora_down.weight": sd15[f"{stem}.lora_down.weight"][:, :, 0, 0],
                         f"{stem}.lora_up.weight": sd15[f"{stem}.lora_up.weight"][:, :, 0, 0]})
    [p] = file_rules.rule_problems(flat, "sd15")
    assert "1 conv targets have 2-D tensors" in p and stem in p
    odd = dict(sd15, **{f"{stem}.alpha": torch.tensor(2.0)})
    [p] = file_rules.rule_problems(odd, "sd15")
    assert p.startswith("lora_unet: 2 different alphas among Linear/1x1 modules")
    fixed = file_rules.uniform_alphas(odd)
    assert file_rules.rule_problems(fixed, "sd15") == []
    torch.testing.assert_close(fixed[f"{stem}.lora_up.weight"],
                               sd15[f"{stem}.lora_up.weight"] * 0.5)


def test_show_metadata(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    freq = {"10_zorblat star": {"zorblat": 3, "purple": 2, "star": 1}}
    write_lora(path, {"lora_te_x.alpha": torch.tensor(1.0)},
               {"ss_tag_frequency": json.dumps(freq), "ss_network_dim": "4",
                "modelspec.title": "t", "tomlora_config": config_json(Config())})
    assert show_metadata.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 tensors, 6 metadata keys")
    assert "  10_zorblat star (3 tags): zorblat (3), purple (2), star (1)" in out
    assert "  [lora]" in out and "    network_dim = 4" in out
    assert "== hashes" in out and "sshs_model_hash: " in out
    assert show_metadata.main([str(path), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["ss_tag_frequency"] == freq and parsed["tomlora_config"]["lora"]
    assert show_metadata.main([str(path), "--key", "ss_network_dim"]) == 0
    assert capsys.readouterr().out == "4\n"
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "4"
    (tmp_path / "bad.safetensors").write_bytes(b"\x05" * 20)
    assert show_metadata.main([str(tmp_path / "bad.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
