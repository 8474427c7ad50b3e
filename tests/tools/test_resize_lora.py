"""tools/resize_lora.py: full-rank resizes reproduce every delta, dynamic rules keep what
they promise, metadata is updated, and bad inputs stop with one line and no file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.lora_tools.svd import choose_rank
from networks.kohya_file import read_lora
from tests.networks.helpers import one_thread  # noqa: F401
from tests.tools.lora_fixtures import deltas, loras  # noqa: F401
from tools import resize_lora


def assert_same_deltas(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for stem, d in want.items():
        torch.testing.assert_close(got[stem], d, rtol=rtol, atol=atol,
                                   msg=lambda m, s=stem: f"{s}: {m}")


@pytest.mark.parametrize("name,rank,conv,tol", [
    ("xl_a", 4, 2, 2e-3),          # SDXL, UNet + both TEs + LoCon, fp16 in, fp16 out
    ("sd15_a", 4, 2, 1e-5),        # SD1.5 fp32 with LoCon
    ("sd15_kohya", 4, 2, 2e-3),    # sd-scripts' file: fp16, a different alpha per module
])
def test_resize_to_full_rank_reproduces_every_delta(loras, tmp_path, capsys,  # noqa: F811
                                                    name, rank, conv, tol):
    out = tmp_path / "same.safetensors"
    assert resize_lora.main(["--model", str(loras[name]), "--save_to", str(out), "--new_rank",
                             str(rank), "--new_conv_rank", str(conv), "--quiet"]) == 0
    assert_same_deltas(deltas(out), deltas(loras[name]), rtol=tol, atol=tol)
    text = capsys.readouterr().out
    assert "lora_unet:" in text and "Frobenius retained mean 1.0000" in text
    src, _ = read_lora(loras[name])
    sd, meta = read_lora(out)
    assert {v.dtype for v in sd.values()} == {next(iter(src.values())).dtype}
    assert meta["ss_network_dim"] == str(rank)
    assert f"rank resized from 4 to {rank} (conv {conv})" in meta["ss_training_comment"]
    assert meta["sshs_model_hash"] and meta["ss_network_module"] == "networks.lora"


def test_fixed_resize_lowers_rank_and_keeps_scale(loras, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r2.safetensors"
    assert resize_lora.main(["--model", str(loras["sd15_a"]), "--save_to", str(out),
                             "--new_rank", "2", "--new_conv_rank", "1", "--save_precision",
                             "bf16", "--quiet"]) == 0
    sd, meta = read_lora(out)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    ranks = {k: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert {r for k, r in ranks.items() if sd[k].dim() == 2} == {2}
    assert {r for k, r in ranks.items() if sd[k].dim() == 4 and sd[k].shape[2] == 3} == {1}
    # the kept part is the best rank-2 approximation of each input delta (Eckart-Young)
    src, got = deltas(loras["sd15_a"]), deltas(out)
    stem = next(s for s in src if src[s].dim() == 2)
    s = torch.linalg.svdvals(src[stem])
    err = torch.linalg.matrix_norm(src[stem] - got[stem])
    assert float(err) == pytest.approx(float(s[2:].norm()), rel=2e-2)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_args"].count('"1"') == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("lora_te: 12 modules, Frobenius retained mean 0.") and
               "worst 0." in line for line in lines)


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8),
                                          ("sv_ratio", 3.0)])
def test_dynamic_resize_keeps_the_stated_fraction(loras, tmp_path, method, param):  # noqa
    out = tmp_path / "dyn.safetensors"
    assert resize_lora.main(["--model", str(loras["xl_a"]), "--save_to", str(out),
                             "--new_rank", "4", "--dynamic_method", method, "--dynamic_param",
                             str(param), "--save_precision", "fp32", "--quiet"]) == 0
    src, got = deltas(loras["xl_a"]), deltas(out)
    sd, meta = read_lora(out)
    sd_in, _ = read_lora(loras["xl_a"])
    for stem, d in src.items():
        # the singular values of the input's own rank (the rest are zero)
        r_in = sd_in[f"{stem}.lora_down.weight"].shape[0]
        s = torch.linalg.svdvals(d.flatten(1))[:r_in].double()
        k = sd[f"{stem}.lora_down.weight"].shape[0]
        assert k == choose_rank(s.float(), 4, method, param), stem
        kept = float(torch.linalg.matrix_norm(got[stem].flatten(1)) /
                     torch.linalg.matrix_norm(d.flatten(1)))
        if method == "sv_fro":
            assert kept >= param - 1e-4, stem
        elif method == "sv_cumulative":
            assert float(s[:k].sum() / s.sum()) >= param - 1e-4, stem
        else:
            assert k == r_in or float(s[0] / s[k]) >= param * (1 - 1e-4), stem
    assert f"dynamic resize with {method}" in meta["ss_training_comment"]


def test_rank_rules_match_sd_scripts():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    # sv_fro 0.9: 64/84.3 = 0.76, 80/84.3 = 0.949 -> k = 2 reaches it, sd-scripts keeps k + 1
    assert choose_rank(s, 10, "sv_fro", 0.9) == 3
    # sv_cumulative 0.5: 8/15.75 = 0.51 -> k = 1, keeps 2
    assert choose_rank(s, 10, "sv_cumulative", 0.5) == 2
    # sv_ratio 5: values above 8/5 = 1.6 are 8, 4, 2 -> 3, keeps 4
    assert choose_rank(s, 10, "sv_ratio", 5.0) == 4
    assert choose_rank(s, 2, "sv_ratio", 5.0) == 2  # --new_rank caps
    assert choose_rank(torch.zeros(6), 4, "sv_fro", 0.9) == 1  # an untrained module
    assert choose_rank(s, 3) == 3


def test_diffusers_layout_input(loras, tmp_path, tiny_sd15_dir):  # noqa: F811
    from tools import convert_lora
    peft = convert_lora.convert(loras["sd15_b"], tmp_path / "p.safetensors", "diffusers",
                                model=str(tiny_sd15_dir))
    out = tmp_path / "k.safetensors"
    assert resize_lora.main(["--model", str(peft), "--save_to", str(out), "--new_rank", "3",
                             "--quiet"]) == 2  # no family hints in the keys of an SD1.5 file
    assert resize_lora.main(["--model", str(peft), "--save_to", str(out), "--new_rank", "3",
                             "--family", "sd15", "--quiet"]) == 0
    assert_same_deltas(deltas(out), deltas(loras["sd15_b"]), rtol=1e-5, atol=1e-5)


def _oft(path):
    save_file({"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.zeros(4, 2, 2),
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0)}, str(path))
    return path


@pytest.mark.parametrize("case,expect", [
    ("not_lora", "not a LoRA file"),
    ("oft", "not a LoRA file"),  # OFT/BOFT: no tool reads them
    ("exists", "exists; pass --overwrite"),
    ("no_param", "--dynamic_method sv_fro needs --dynamic_param"),
    ("torn", "lora_up [8, 4] does not fit lora_down [3, 16]"),
])
def test_bad_inputs_exit_2_and_write_nothing(loras, tmp_path, tiny_sd15_dir, capsys,  # noqa
                                             case, expect):
    src, args = loras["sd15_b"], []
    out = tmp_path / "out.safetensors"
    if case == "not_lora":
        src = tiny_sd15_dir / "text_encoder" / "model.safetensors"
    elif case == "oft":
        src = _oft(tmp_path / "oft.safetensors")
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "no_param":
        args = ["--dynamic_method", "sv_fro"]
    elif case == "torn":
        src = tmp_path / "torn.safetensors"
        save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                   torch.zeros(3, 16),
                   "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
                   torch.zeros(8, 4)}, str(src))
    code = resize_lora.main(["--model", str(src), "--save_to", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("resize_lora: error: ") and expect in err and len(err.splitlines()) == 1
    if case in ("not_lora", "loha", "torn"):
        assert str(src) in err
    assert (out.read_bytes() == b"keep me") if case == "exists" else not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_quantile_by_selection_equals_torch_quantile():
    from library.lora_tools.svd import quantile
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        x = torch.randn(n, generator=g)
        for q in (0.0, 0.5, 0.99, 1.0):
            torch.testing.assert_close(quantile(x, q), torch.quantile(x, q))


def test_lycoris_files_resize_to_plain_lora(tmp_path):
    """LyCORIS files go through our adapters' math (networks.adapters): a LoHa file resizes
    to a plain LoRA with the delta of LoHa's formula, written out here independently."""

    def loha_delta(t, base_weight=None):
        w1 = t["hada_w1_a"].float() @ t["hada_w1_b"].float()
        w2 = t["hada_w2_a"].float() @ t["hada_w2_b"].float()
        return w1 * w2 * (float(t["alpha"]) / t["hada_w1_b"].shape[0])

    g = torch.Generator().manual_seed(0)
    stem = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {f"{stem}.hada_w1_a": torch.randn(16, 2, generator=g),
         f"{stem}.hada_w1_b": torch.randn(2, 8, generator=g),
         f"{stem}.hada_w2_a": torch.randn(16, 2, generator=g),
         f"{stem}.hada_w2_b": torch.randn(2, 8, generator=g), f"{stem}.alpha": torch.tensor(1.0)}
    src = tmp_path / "loha.safetensors"
    save_file(t, str(src))
    out = tmp_path / "lora.safetensors"
    assert resize_lora.main(["--model", str(src), "--save_to", str(out), "--new_rank", "8",
                             "--quiet"]) == 0
    want = loha_delta({k.split(".", 1)[1]: v for k, v in t.items()})
    torch.testing.assert_close(deltas(out)[stem], want, rtol=1e-4, atol=1e-5)
