"""kohya's block_dims / block_alphas / conv_block_* on the tiny models: the right rank and alpha
for named modules at every UNet level (hand-written block indices), rank 0 leaves a module
out, and the saved file has one alpha per part with each module's scale baked into lora_up,
giving the same delta in our network, in the file and in diffusers."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from networks import file_rules
from networks.lora import LoRANetwork
from networks.network_args import parse_network_args, rank_spec
from networks.targets import find_targets
from tests.networks.helpers import (assert_outputs_close, file_modules, load_pipe,  # noqa: F401
                                    one_thread, outputs, peft_layers, randomise, save)

# (diffusers path, kohya key stem without lora_unet_, kohya block index, is a 3x3 conv)
SD15 = [
    ("down_blocks.0.attentions.0.proj_in", "down_blocks_0_attentions_0_proj_in", 1, False),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
     "down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", 2, False),
    ("down_blocks.0.downsamplers.0.conv", "down_blocks_0_downsamplers_0_conv", 3, True),
    ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
     "down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", 4, False),
    ("down_blocks.2.attentions.1.proj_out", "down_blocks_2_attentions_1_proj_out", 8, False),
    ("down_blocks.3.resnets.1.conv1", "down_blocks_3_resnets_1_conv1", 11, True),
    ("down_blocks.3.resnets.1.time_emb_proj", "down_blocks_3_resnets_1_time_emb_proj", 11, False),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
     "mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 12, False),
    ("mid_block.resnets.1.conv2", "mid_block_resnets_1_conv2", 12, True),
    ("up_blocks.0.resnets.0.conv1", "up_blocks_0_resnets_0_conv1", 13, True),
    ("up_blocks.0.upsamplers.0.conv", "up_blocks_0_upsamplers_0_conv", 15, True),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
     "up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0", 16, False),
    ("up_blocks.3.attentions.2.proj_out", "up_blocks_3_attentions_2_proj_out", 24, False),
    ("up_blocks.3.resnets.2.conv_shortcut", "up_blocks_3_resnets_2_conv_shortcut", 24, False),
]
SDXL = [
    ("down_blocks.0.resnets.0.conv1", "input_blocks_1_0_in_layers_2", 2, True),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks_3_0_op", 4, True),
    ("down_blocks.1.attentions.0.proj_in", "input_blocks_4_1_proj_in", 5, False),
    ("down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_v",
     "input_blocks_8_1_transformer_blocks_1_attn1_to_v", 9, False),
    ("mid_block.resnets.0.conv1", "middle_block_0_in_layers_2", 10, True),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
     "middle_block_1_transformer_blocks_0_ff_net_0_proj", 11, False),
    ("mid_block.resnets.1.time_emb_proj", "middle_block_2_emb_layers_1", 12, False),
    ("up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_q",
     "output_blocks_0_1_transformer_blocks_1_attn2_to_q", 13, False),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks_2_2_conv", 15, True),
    ("up_blocks.1.attentions.2.proj_out", "output_blocks_5_1_proj_out", 18, False),
    ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks_6_0_skip_connection", 19, False),
    ("up_blocks.2.resnets.2.conv2", "output_blocks_8_0_out_layers_3", 21, True),
]
N = {"sd15": 25, "sdxl": 23}
ZERO = {"sd15": 16, "sdxl": 18}  # a block with rank 0: its modules are left out


def tables(family):
    n = N[family]
    dims = [i % 4 + 1 for i in range(n)]
    dims[ZERO[family]] = 0
    return {"block_dims": dims, "block_alphas": [0.5 * (i % 3 + 1) for i in range(n)],
            "conv_block_dims": [i % 2 + 1 for i in range(n)],
            "conv_block_alphas": [1.0 + i % 2 for i in range(n)]}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_block_ranks_bake_into_a_uniform_alpha_file(family, tiny_sd15_dir, tiny_sdxl_dir,
                                                    tmp_path):
    pipe = load_pipe(tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir)
    raw = tables(family)
    spec = rank_spec(parse_network_args(raw, family), 8, None, family)
    net = LoRANetwork(find_targets(pipe.unet, [], (), family, spec, train_unet=True,
                                   train_text_encoder=False)).eval()
    for path, stem, block, conv in SD15 if family == "sd15" else SDXL:
        name = "lora_unet_" + stem
        assert pipe.unet.get_submodule(path)
        dim = raw["conv_block_dims" if conv else "block_dims"][block]
        alpha = raw["conv_block_alphas" if conv else "block_alphas"][block]
        if block == ZERO[family] and not conv:
            assert name not in net.loras
            continue
        m = net.loras[name]
        assert (m.rank, float(m.alpha)) == (dim, alpha), name
        assert m.base is pipe.unet.get_submodule(path)
    assert not any(f"{'up_blocks_1_attentions_0' if family == 'sd15' else 'output_blocks_5_1'}"
                   in n for n in net.loras)

    randomise(net, seed=5)
    path = save(net, tmp_path / "blocks.safetensors", family, pipe)
    sd = load_file(str(path))
    assert file_rules.rule_problems(sd, family) == []
    mods = file_rules.modules(sd)
    linear_alphas = {float(t["alpha"]) for t in mods.values() if t["down"].dim() == 2
                     or t["down"].shape[2:] == (1, 1)}
    assert len(linear_alphas) == 1
    baked = 0
    for name, m in net.loras.items():  # same delta from the file as from the network
        t = mods[name]
        up, down = t["up"].flatten(1), t["down"].flatten(1)
        delta = float(t["alpha"]) / m.rank * (up @ down)
        torch.testing.assert_close(delta, m.delta_weight().flatten(1), rtol=1e-5, atol=1e-6)
        baked += float(t["alpha"]) != float(m.alpha)
    assert baked > 0  # the test did exercise the baking

    # diffusers applies every module with the right rank and scale
    base = outputs(pipe, family)
    net.attach()
    net.merge()
    ours = outputs(pipe, family)
    net.detach()
    assert not torch.allclose(ours["unet"], base["unet"], atol=1e-4)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="b")
    assert peft_layers(pipe.unet, "b") == file_modules(sd, "lora_unet") == len(net)
    assert_outputs_close(outputs(pipe, family), ours)
