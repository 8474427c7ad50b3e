"""`batch_qkv_lora`: one down-projection matmul for the LoRAs of q, k and v
(networks.lora.SharedInputDown, library.train.speed.batch_qkv_lora) computes what the
separate modules compute, forward and backward, whatever the call order, and traces into
one torch.compile graph of a transformer block."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from library.train.speed import batch_qkv_lora
from networks.lora import LoRANetwork, SharedInputDown, Target
from networks.targets import RankSpec, find_targets
from tests.networks.helpers import one_thread  # noqa: F401  (autouse fixture)

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def unet_with_lora(batched: bool):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).requires_grad_(False)
    net = LoRANetwork(find_targets(unet, [], (), "sd15", RankSpec(4, 4), train_unet=True,
                                   train_text_encoder=False)).attach()
    torch.manual_seed(1)
    for p in net.parameters():  # non-zero ups, so the LoRA changes the output
        nn.init.normal_(p, std=0.1)
    note = batch_qkv_lora(unet, net) if batched else None
    return unet, net, note


def output_and_grads(batched: bool):
    unet, net, note = unet_with_lora(batched)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    y = unet(x, torch.tensor([10, 500]), c).sample
    y.square().mean().backward()
    return y.detach(), {n: p.grad for n, p in net.named_parameters()}, net, note


def test_batched_down_projections_give_the_same_output_and_gradients():
    y0, g0, _, _ = output_and_grads(False)
    y1, g1, net, note = output_and_grads(True)
    # This UNet has 4 transformer blocks (1 down, 2 up, 1 mid), each with one self- and one
    # cross-attention layer.
    assert note == ("batched LoRA down projections: q/k/v of 4 self-attention and k/v of 4 "
                    "cross-attention layers")
    groups = net.shared_groups()
    assert sorted(len(g.members) for g in groups) == [2] * 4 + [3] * 4
    assert not any(g._pending for g in groups), "every slice was taken within the forward"
    # fp32 sums in another order: 1 element of 512 moved 1.2e-6 (3e-6 relative) on an AMD EPYC
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)


def linear_group(rank_b: int = 3):
    torch.manual_seed(0)
    bases = [nn.Linear(8, 6), nn.Linear(8, 5)]
    net = LoRANetwork([Target("lora_a", bases[0], 2, 2.0), Target("lora_b", bases[1],
                                                                  rank_b, 1.0)]).attach()
    for p in net.parameters():
        nn.init.normal_(p)
    return bases, net


def test_any_call_order_and_other_inputs_give_each_module_its_own_result():
    bases, net = linear_group()
    x, other = torch.randn(4, 8), torch.randn(4, 8)
    want = [b(x).detach() for b in bases], [b(other).detach() for b in bases]
    net.share_input(list(net))
    # b first, then a with the same input: a takes its slice from b's matmul
    torch.testing.assert_close(bases[1](x), want[0][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(bases[0](x), want[0][0], rtol=0, atol=1e-6)
    # a with one tensor, b with another: b must not take a's slice of the wrong input
    torch.testing.assert_close(bases[0](x), want[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(bases[1](other), want[1][1], rtol=0, atol=1e-6)
    # a module called twice with the same input before the other recomputes, not reuses
    torch.testing.assert_close(bases[0](other), want[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(bases[0](other), want[1][0], rtol=0, atol=1e-6)


def test_groups_are_checked():
    bases, net = linear_group()
    with pytest.raises(ValueError, match="at least two"):
        net.share_input(list(net)[:1])
    net.share_input(list(net))
    with pytest.raises(ValueError, match="already"):
        net.share_input(list(net))
    _, other = linear_group()
    with pytest.raises(ValueError, match="every member must be a module of this network"):
        net.share_input(list(other))
    wide = LoRANetwork([Target("lora_w", nn.Linear(9, 4), 2, 2.0),
                        Target("lora_n", nn.Linear(8, 4), 2, 2.0)])
    with pytest.raises(ValueError, match="same input width"):
        SharedInputDown(list(wide))
    conv = LoRANetwork([Target("lora_c", nn.Conv2d(8, 4, 1), 2, 2.0),
                        Target("lora_l", nn.Linear(8, 4), 2, 2.0)])
    with pytest.raises(TypeError, match="Linear"):
        SharedInputDown(list(conv))


def test_no_groups_with_module_dropout():
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**UNET).requires_grad_(False)
    net = LoRANetwork(find_targets(unet, [], (), "sd15", RankSpec(4, 4), train_unet=True,
                                   train_text_encoder=False), module_dropout=0.1).attach()
    assert batch_qkv_lora(unet, net).startswith(
        "batched LoRA down projections: q/k/v of 0 self-attention and k/v of 0")
    assert net.shared_groups() == []


def test_under_autocast_the_input_is_not_copied_to_fp32():
    _, net = linear_group()
    m = next(iter(net))
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert m.lora_input(x).dtype == torch.float32  # no autocast: the LoRA weights' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.lora_input(x) is x  # autocast casts it for the matmul itself


def test_a_batched_transformer_block_compiles_to_one_graph():
    import torch._dynamo
    from diffusers.models.attention import BasicTransformerBlock
    unet, net, _ = unet_with_lora(True)
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    h, c = torch.randn(2, 16, 32), torch.randn(2, 7, 32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(h, encoder_hidden_states=c)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
