"""Tests for networks/lora.py: LoRAModule behaviour on every base kind and dtype, and
LoRANetwork's kohya state dict.

The behaviour table runs over base module kind x base dtype. References are computed
independently of LoRAModule's own math: from the raw weights with F.linear / F.conv2d in fp32.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.lora import LoRAModule, LoRANetwork, Target

RANK = 4
ALPHA = 3.0
MULT = 0.7

# kind id -> (factory for the base module, input shape)
KINDS = {
    "linear": (lambda: nn.Linear(16, 24), (2, 5, 16)),  # 3-D input like a transformer block
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 7, 7)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, stride=1, padding=1), (2, 8, 7, 7)),
    "conv3x3s2": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 9, 9)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (rtol, atol) for comparing an output in the base dtype with an fp32 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 3e-2)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up costs more than the math, on a loaded box much more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=list(KINDS), ids=list(KINDS))
def kind(request):
    return request.param


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def dtype(request):
    return DTYPES[request.param]


def make_base(kind: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = KINDS[kind][0]()
    with torch.no_grad():  # a nonzero bias, so a bias bug shows
        base.bias.normal_(0.0, 0.5)
    return base.to(dtype).requires_grad_(False)  # frozen, as train_network.py does


def make_input(kind: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(KINDS[kind][1], generator=g).to(dtype)


def randomise_up(lora: LoRAModule, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = lora.lora_up.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)


def attached(base, **kw) -> LoRAModule:
    kw.setdefault("alpha", ALPHA)
    kw.setdefault("multiplier", MULT)
    lora = LoRAModule("lora_unet_test", base, RANK, **kw)
    lora.attach()
    return lora


def reference(base: nn.Module, lora: LoRAModule | None, x: torch.Tensor,
              multiplier: float = MULT, alpha: float = ALPHA) -> torch.Tensor:
    """base(x) + multiplier * alpha / rank * up(down(x)), all in fp32, from raw weights."""
    xf = x.float()
    w, b = base.weight.detach().float(), base.bias.detach().float()
    if isinstance(base, nn.Linear):
        out = F.linear(xf, w, b)
        if lora is not None:
            h = F.linear(xf, lora.lora_down.weight.detach().float())
            out = out + multiplier * alpha / RANK * F.linear(h, lora.lora_up.weight.detach())
    else:
        out = F.conv2d(xf, w, b, stride=base.stride, padding=base.padding)
        if lora is not None:
            h = F.conv2d(xf, lora.lora_down.weight.detach().float(), stride=base.stride,
                         padding=base.padding)
            out = out + multiplier * alpha / RANK * F.conv2d(h, lora.lora_up.weight.detach())
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


# ---- the behaviour table --------------------------------------------------------------

def test_fresh_module_equals_base_bit_exact(kind, dtype):
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    before = base(x)
    lora = attached(base)
    out = base(x)
    assert out.dtype == dtype
    assert torch.equal(out, before)
    assert lora.lora_up.weight.abs().sum() == 0  # up is zero-initialised
    assert lora.lora_down.weight.abs().sum() > 0  # down is not


def test_output_is_base_plus_scaled_delta(kind, dtype):
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    lora = attached(base)
    randomise_up(lora)
    out = base(x)
    assert out.dtype == dtype
    ref = reference(base, lora, x)
    # the delta is far from negligible, so a wrong scale cannot hide in the tolerance
    assert (ref - reference(base, None, x)).abs().max() > 0.5
    assert_close(out, ref, dtype)


def test_merge_matches_unmerged_and_is_idempotent(kind, dtype):
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    lora = attached(base)
    randomise_up(lora)
    unmerged = base(x)
    lora.merge()
    merged_w = base.weight.detach().clone()
    merged = base(x)
    assert_close(merged, unmerged, dtype)
    assert_close(merged, reference(base, None, x), dtype)  # weight now holds the delta
    lora.merge()  # a second merge must not add the delta again
    assert torch.equal(base.weight, merged_w)
    assert torch.equal(base(x), merged)


def test_unmerge_restores_base_weight_bit_exact(kind, dtype):
    base = make_base(kind, dtype)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    lora = attached(base)
    randomise_up(lora)
    lora.merge()
    assert not torch.equal(base.weight, w0)
    lora.unmerge()
    assert torch.equal(base.weight, w0)
    assert torch.equal(base.bias, b0)
    assert base.weight.dtype == dtype
    lora.unmerge()  # no-op when not merged
    assert torch.equal(base.weight, w0)


def test_detach_restores_original_forward(kind, dtype):
    base = make_base(kind, dtype)
    clone = copy.deepcopy(base)
    x = make_input(kind, dtype)
    lora = attached(base)
    randomise_up(lora)
    assert not torch.equal(base(x), clone(x))
    lora.merge()
    lora.unmerge()
    lora.detach()
    assert "forward" not in base.__dict__
    assert torch.equal(base(x), clone(x))
    assert torch.equal(base.weight, clone.weight)
    lora.detach()  # detaching twice is harmless
    assert "forward" not in base.__dict__


def test_attach_twice_is_idempotent(kind, dtype):
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    lora = attached(base)
    randomise_up(lora)
    once = base(x)
    lora.attach()
    assert torch.equal(base(x), once)  # neither recursion nor a doubled delta
    lora.detach()
    assert "forward" not in base.__dict__
    assert_close(base(x), reference(base, None, x), dtype)


def test_detach_keeps_a_foreign_instance_forward(kind, dtype):
    """A forward someone else installed (e.g. a hook wrapper) survives attach/detach, and a
    LoRA that was never attached does not remove it."""
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    class_forward = base.forward

    def wrapper(inp, *args, **kwargs):
        return class_forward(inp, *args, **kwargs) * 2

    base.forward = wrapper
    never = LoRAModule("lora_unet_never", base, RANK)
    never.detach()
    assert base.__dict__.get("forward") is wrapper

    lora = attached(base)
    randomise_up(lora)
    expected = reference(base, None, x) * 2 + (reference(base, lora, x)
                                                - reference(base, None, x))
    assert_close(base(x), expected, dtype)
    lora.detach()
    assert base.__dict__.get("forward") is wrapper


def test_only_lora_params_get_gradients(kind, dtype):
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    lora = attached(base)
    randomise_up(lora)
    lora.train()
    # The base module is referenced, not registered: the optimizer never sees its weights.
    names = {n for n, _ in lora.named_parameters()}
    assert names == {"lora_down.weight", "lora_up.weight"}
    base(x).float().square().sum().backward()
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert base.weight.grad is None and base.bias.grad is None
    for p in (lora.lora_down.weight, lora.lora_up.weight):
        assert p.requires_grad
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert p.grad.abs().sum() > 0


def test_lora_weights_are_fp32(kind, dtype):
    base = make_base(kind, dtype)
    lora = attached(base)
    assert lora.lora_down.weight.dtype == torch.float32
    assert lora.lora_up.weight.dtype == torch.float32
    assert lora.alpha.dtype == torch.float32
    assert base.weight.dtype == dtype  # the base is left in its own dtype


def test_lora_shapes(kind, dtype):
    base = make_base(kind, dtype)
    lora = LoRAModule("lora_unet_test", base, RANK)
    if isinstance(base, nn.Linear):
        assert lora.lora_down.weight.shape == (RANK, 16)
        assert lora.lora_up.weight.shape == (24, RANK)
    else:
        kh, kw = base.kernel_size
        assert lora.lora_down.weight.shape == (RANK, 8, kh, kw)
        assert lora.lora_down.stride == base.stride
        assert lora.lora_down.padding == base.padding
        assert lora.lora_up.weight.shape == (12, RANK, 1, 1)
    assert lora.delta_weight().shape == base.weight.shape


@pytest.mark.parametrize("which", ["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_active_in_train_off_in_eval(kind, dtype, which):
    base = make_base(kind, dtype)
    pristine = copy.deepcopy(base)  # before attach: a copy of an attached base carries its LoRA
    x = make_input(kind, dtype)
    lora = attached(base, **{which: 0.5})
    randomise_up(lora)

    # What the same weights give without any dropout.
    plain = LoRAModule("lora_unet_plain", pristine, RANK, alpha=ALPHA, multiplier=MULT)
    plain.load_state_dict(lora.state_dict())
    plain.attach()
    no_dropout = plain.base(x)

    lora.train()
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outs.append(base(x))
    torch.manual_seed(3)
    assert torch.equal(base(x), outs[3])  # same seed, same draw
    distinct = {tuple(o.float().flatten().tolist()) for o in outs}
    assert len(distinct) > 1, f"{which} had no effect in train()"
    assert any(not torch.equal(o, no_dropout) for o in outs)

    lora.eval()
    torch.manual_seed(0)
    first = base(x)
    torch.manual_seed(1)
    second = base(x)
    assert torch.equal(first, second)
    assert torch.equal(first, no_dropout)


def test_multiplier_zero_gives_base_output(kind, dtype):
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    before = base(x)
    lora = attached(base, multiplier=0.0)
    randomise_up(lora)
    assert torch.equal(base(x), before)
    lora.multiplier = 2.0
    assert_close(base(x), reference(base, lora, x, multiplier=2.0), dtype)


def test_alpha_none_means_scale_one(kind, dtype):
    base = make_base(kind, dtype)
    x = make_input(kind, dtype)
    lora = attached(base, alpha=None)
    assert lora.scale == 1.0
    assert float(lora.alpha) == RANK
    randomise_up(lora)
    assert_close(base(x), reference(base, lora, x, alpha=RANK), dtype)


def test_alpha_given_means_alpha_over_rank(kind, dtype):
    base = make_base(kind, dtype)
    lora = LoRAModule("lora_unet_test", base, RANK, alpha=1.0)
    assert lora.scale == pytest.approx(1.0 / RANK)
    assert float(lora.alpha) == 1.0
    assert lora.alpha.dim() == 0


# ---- constructor errors ---------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one_raises(rank):
    with pytest.raises(ValueError, match="lora_unet_bad"):
        LoRAModule("lora_unet_bad", nn.Linear(4, 4), rank)


@pytest.mark.parametrize("module", [nn.Embedding(10, 4), nn.Conv1d(4, 4, 3), nn.LayerNorm(4)])
def test_unsupported_module_raises_type_error_with_name(module):
    with pytest.raises(TypeError, match="lora_unet_weird_module"):
        LoRAModule("lora_unet_weird_module", module, 2)


# ---- LoRANetwork ----------------------------------------------------------------------

def make_targets(rank: int = RANK, conv_rank: int = 2, seed: int = 0) -> list[Target]:
    torch.manual_seed(seed)
    return [
        Target("lora_unet_blk_proj_in", nn.Conv2d(8, 12, 1), rank, ALPHA),
        Target("lora_unet_blk_attn1_to_q", nn.Linear(16, 24), rank, ALPHA),
        Target("lora_unet_res_conv1", nn.Conv2d(8, 12, 3, padding=1), conv_rank, 1.0),
        Target("lora_unet_down_op", nn.Conv2d(8, 12, 3, stride=2, padding=1), conv_rank, 1.0),
        Target("lora_te_text_model_encoder_layers_0_self_attn_q_proj", nn.Linear(16, 16),
               rank, ALPHA),
        Target("lora_te1_text_model_encoder_layers_0_mlp_fc1", nn.Linear(16, 32), rank, ALPHA),
        Target("lora_te2_text_model_encoder_layers_1_mlp_fc2", nn.Linear(32, 16), rank, ALPHA),
    ]


def randomise_network(net: LoRANetwork, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_network_rejects_duplicate_names():
    t = make_targets()
    with pytest.raises(ValueError, match="lora_unet_blk_attn1_to_q"):
        LoRANetwork(t + [Target(t[1].name, nn.Linear(16, 24), RANK, ALPHA)])


def test_network_rejects_empty_targets():
    with pytest.raises(ValueError):
        LoRANetwork([])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_kohya_state_dict_layout(dtype):
    targets = make_targets()
    net = LoRANetwork(targets)
    sd = net.kohya_state_dict(dtype)
    assert len(sd) == 3 * len(targets)
    expected_keys = {f"{t.name}.{suffix}" for t in targets
                     for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(sd) == expected_keys
    for t in targets:
        down, up, alpha = (sd[f"{t.name}.lora_down.weight"], sd[f"{t.name}.lora_up.weight"],
                           sd[f"{t.name}.alpha"])
        assert alpha.dim() == 0 and float(alpha) == t.alpha
        m = t.module
        if isinstance(m, nn.Conv2d):  # 1x1 convs included: always 4-D
            assert down.shape == (t.rank, m.in_channels, *m.kernel_size)
            assert up.shape == (m.out_channels, t.rank, 1, 1)
        else:
            assert down.shape == (t.rank, m.in_features)
            assert up.shape == (m.out_features, t.rank)
        for v in (down, up, alpha):
            assert v.dtype == dtype
            assert v.device.type == "cpu"
            assert v.is_contiguous()


def test_load_kohya_state_dict_round_trip_is_exact():
    src = LoRANetwork(make_targets(seed=0))
    randomise_network(src)
    with torch.no_grad():  # alphas other than the target's, so scale must be reloaded
        for i, m in enumerate(src):
            m.alpha.fill_(0.5 + i)
    sd = {k: v.clone() for k, v in src.kohya_state_dict(torch.float32).items()}

    dst = LoRANetwork(make_targets(seed=1))
    dst.load_kohya_state_dict(sd)
    assert set(dst.kohya_state_dict(torch.float32)) == set(sd)
    for k, v in dst.kohya_state_dict(torch.float32).items():
        assert torch.equal(v, sd[k]), k
    for i, m in enumerate(dst):
        assert m.scale == pytest.approx((0.5 + i) / m.rank)


def test_loaded_file_without_alpha_has_scale_one():
    """A file without `.alpha` means scale 1 to every loader (LORA_FORMAT.md)."""
    src = LoRANetwork(make_targets())
    randomise_network(src)
    sd = {k: v for k, v in src.kohya_state_dict(torch.float32).items()
          if not k.endswith(".alpha")}
    dst = LoRANetwork(make_targets(seed=1))
    dst.load_kohya_state_dict(sd)
    for m in dst:
        assert m.scale == 1.0
        assert float(m.alpha) == m.rank


def test_load_kohya_state_dict_mismatch_raises_and_changes_nothing():
    net = LoRANetwork(make_targets())
    before = {k: v.clone() for k, v in net.kohya_state_dict(torch.float32).items()}

    other = LoRANetwork(make_targets(rank=8))  # linear / 1x1 modules at another rank
    randomise_network(other)
    sd = dict(other.kohya_state_dict(torch.float32))
    del sd["lora_unet_res_conv1.lora_down.weight"]
    sd["lora_unet_not_in_network.lora_down.weight"] = torch.zeros(2, 2)

    with pytest.raises(ValueError) as err:
        net.load_kohya_state_dict(sd, source="bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "missing" in msg and "lora_unet_res_conv1.lora_down.weight" in msg
    assert "unexpected" in msg and "lora_unet_not_in_network.lora_down.weight" in msg
    assert "shape" in msg and "lora_unet_blk_proj_in.lora_down.weight" in msg
    for k, v in net.kohya_state_dict(torch.float32).items():  # validated before copying
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_load_kohya_state_dict_each_problem_alone_raises(problem):
    net = LoRANetwork(make_targets())
    sd = dict(net.kohya_state_dict(torch.float32))
    key = "lora_unet_blk_attn1_to_q.lora_up.weight"
    if problem == "missing":
        del sd[key]
    elif problem == "unexpected":
        key = "lora_unet_blk_attn1_to_q.dora_scale"
        sd[key] = torch.ones(24)
    else:
        sd[key] = torch.zeros(24, RANK + 1)
    with pytest.raises(ValueError, match=problem) as err:
        net.load_kohya_state_dict(sd)
    assert key in str(err.value)


def test_parts_groups_by_prefix():
    targets = make_targets()
    net = LoRANetwork(targets)
    parts = net.parts()
    assert set(parts) == {"lora_unet", "lora_te", "lora_te1", "lora_te2"}
    assert [m.lora_name for m in parts["lora_unet"]] == [t.name for t in targets[:4]]
    assert [m.lora_name for m in parts["lora_te"]] == [targets[4].name]
    assert [m.lora_name for m in parts["lora_te1"]] == [targets[5].name]
    assert [m.lora_name for m in parts["lora_te2"]] == [targets[6].name]
    assert sum(len(v) for v in parts.values()) == len(net)


def test_network_attach_merge_detach_restores_everything():
    targets = make_targets()
    clones = [copy.deepcopy(t.module) for t in targets]
    net = LoRANetwork(targets, multiplier=MULT).attach()
    randomise_network(net)
    x_lin, x_conv = torch.randn(2, 16), torch.randn(2, 8, 9, 9)
    q = targets[1].module
    unmerged = q(x_lin)
    net.merge()
    torch.testing.assert_close(q(x_lin), unmerged, rtol=1e-5, atol=1e-5)
    net.detach()  # unmerges too
    for t, c in zip(targets, clones):
        assert "forward" not in t.module.__dict__
        assert torch.equal(t.module.weight, c.weight)
    assert torch.equal(targets[0].module(x_conv), clones[0](x_conv))
    assert torch.equal(q(x_lin), clones[1](x_lin))
