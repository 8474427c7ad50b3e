"""tools/convert_lora.py --to lora --rank N: LyCORIS files exported to plain LoRA by SVD; the
export loads in diffusers and gives our network's outputs when the rank suffices."""
from __future__ import annotations

import pytest
import torch

from library.models.loading import FAMILIES
from networks.adapters.base import AdapterSpec
from networks.export import implied_shape, stock_shape, svd_lora
from networks.lora import LoRANetwork
from networks.targets import RankSpec, find_targets
from tests.networks.helpers import (assert_outputs_close, encoders, load_pipe,  # noqa: F401
                                    one_thread, outputs, peft_layers, save)
from tools import check_lora, convert_lora


def lycoris_net(pipe, spec: AdapterSpec, seed: int = 0) -> LoRANetwork:
    targets = find_targets(pipe.unet, encoders(pipe), FAMILIES["sd15"].te_prefixes, "sd15",
                           RankSpec(2, 1.0, 2, 1.0), train_unet=True, train_text_encoder=True)
    net = LoRANetwork(targets, spec=spec).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def test_svd_lora_is_exact_at_full_rank_and_reports_the_error():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 4, 3, 3, generator=g)
    up, down, err = svd_lora(delta, 36)
    assert up.shape == (6, 6, 1, 1) and down.shape == (6, 4, 3, 3) and err < 1e-6
    torch.testing.assert_close(torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down), delta,
                               rtol=1e-5, atol=1e-5)
    _, _, err1 = svd_lora(delta, 1)
    assert 0.3 < err1 < 1.0


def test_loha_export_loads_in_diffusers_with_our_outputs(tiny_sd15_dir, tmp_path, capsys):
    pipe = load_pipe(tiny_sd15_dir)
    net = lycoris_net(pipe, AdapterSpec("loha"))  # rank 2: ΔW has rank <= 4, so N=8 is exact
    src = save(net, tmp_path / "loha.safetensors", "sd15", pipe)
    assert convert_lora.main([str(tmp_path / "lora.safetensors"), str(tmp_path), "--to",
                              "diffusers"]) == 2  # not there
    capsys.readouterr()
    assert convert_lora.main([str(src), str(tmp_path), "--to", "diffusers"]) == 2
    assert "--to lora --rank N" in capsys.readouterr().err
    dst = tmp_path / "exported.safetensors"
    assert convert_lora.main([str(src), str(dst), "--to", "lora", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "lora_unet: " in out and "lora_te: " in out and "relative error mean 0.0000" in out
    assert check_lora.main([str(dst), "--summary"]) == 0
    assert "ok: follows the kohya LoRA format rules" in capsys.readouterr().out
    net.attach()
    want = outputs(pipe, "sd15")
    net.detach()
    pipe.load_lora_weights(str(tmp_path), weight_name=dst.name, adapter_name="x")
    assert peft_layers(pipe.unet, "x") + peft_layers(pipe.text_encoder, "x") == len(net)
    assert_outputs_close(outputs(pipe, "sd15"), want, atol=1e-4)


def test_lokr_export_reports_its_error_and_dora_needs_the_model(tiny_sd15_dir, tmp_path,
                                                               capsys):
    pipe = load_pipe(tiny_sd15_dir)
    src = save(lycoris_net(pipe, AdapterSpec("lokr", factor=2), seed=1),
               tmp_path / "lokr.safetensors", "sd15", pipe)
    assert convert_lora.main([str(src), str(tmp_path / "a.safetensors"), "--to", "lora",
                              "--rank", "1"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("lora_unet:")][0]
    assert float(line.split("mean ")[1].split()[0]) > 0.05  # rank 1 cannot hold a kron
    dora = save(lycoris_net(pipe, AdapterSpec("loha", dora=True), seed=2),
                tmp_path / "dora.safetensors", "sd15", pipe)
    assert convert_lora.main([str(dora), str(tmp_path / "b.safetensors"), "--to", "lora",
                              "--rank", "8"]) == 2
    assert "--model DIR" in capsys.readouterr().err
    assert convert_lora.main([str(dora), str(tmp_path / "b.safetensors"), "--to", "lora",
                              "--rank", "8", "--model", str(tiny_sd15_dir)]) == 0


def test_stock_shapes_of_flattened_convs():
    t = {"hada_w1_a": torch.zeros(32, 2), "hada_w1_b": torch.zeros(2, 64 * 9)}
    assert stock_shape("lora_unet_down_blocks_0_resnets_0_conv1", implied_shape(t),
                       False) == (32, 64, 3, 3)
    assert stock_shape("lora_unet_conv_in", (32, 36), False) == (32, 4, 3, 3)
    t = {"hada_w1_a": torch.zeros(32, 2), "hada_w1_b": torch.zeros(2, 64)}
    assert stock_shape("lora_unet_down_blocks_0_attentions_0_proj_in", implied_shape(t),
                       False) == (32, 64, 1, 1)
    assert stock_shape("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                       (32, 64), False) == (32, 64)
