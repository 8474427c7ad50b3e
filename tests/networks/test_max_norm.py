"""networks/max_norm.py: the max-norm clamp of kohya's scale_weight_norms on real LoRA
modules. The reference norm is computed independently: the full product up @ down (a conv
kernel flattened) times alpha / rank, with torch.linalg.norm."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from networks.lora import LoRAModule
from networks.max_norm import AVERAGE_KEY_NORM, KEYS_SCALED, MAX_KEY_NORM, apply_max_norm

BASES = {
    "linear": lambda: nn.Linear(16, 24),
    "conv1x1": lambda: nn.Conv2d(8, 12, 1),
    "conv3x3": lambda: nn.Conv2d(8, 12, 3, padding=1),
}


def reference_norm(m: LoRAModule) -> float:
    up = m.lora_up.weight.detach().double()
    down = m.lora_down.weight.detach().double()
    delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return float(torch.linalg.norm(delta) * float(m.alpha) / m.rank)


def module(kind: str, norm: float, *, rank: int = 4, alpha: float = 2.0, seed: int = 0):
    """A LoRA module whose ΔW norm is exactly `norm` (up randomised, then rescaled)."""
    torch.manual_seed(seed)
    m = LoRAModule(f"lora_unet_{kind}", BASES[kind](), rank, alpha)
    with torch.no_grad():
        m.lora_up.weight.normal_()
        m.lora_up.weight.mul_(norm / reference_norm(m))
    return m


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("norm, max_norm, scaled", [
    (0.5, 1.0, False),    # below the max: untouched
    (0.1, 1.0, False),    # far below (under max/2, sd-scripts' clamp region): untouched
    (0.99, 1.0, False),   # just below the max: untouched
    (3.0, 1.0, True),     # above: scaled to exactly the max
    (40.0, 0.25, True),
])
def test_norm_is_clamped_to_the_max(kind, norm, max_norm, scaled):
    m = module(kind, norm)
    up, down = m.lora_up.weight.detach().clone(), m.lora_down.weight.detach().clone()
    out = apply_max_norm([m], max_norm)
    after = reference_norm(m)
    assert out[KEYS_SCALED] == (1.0 if scaled else 0.0)
    if scaled:
        assert after == pytest.approx(max_norm, rel=1e-5)
        # both factors take the same share: sqrt(ratio) each, so the direction is kept
        ratio = math.sqrt(max_norm / norm)
        torch.testing.assert_close(m.lora_up.weight, up * ratio, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.lora_down.weight, down * ratio, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(m.lora_up.weight, up) and torch.equal(m.lora_down.weight, down)
        assert after == pytest.approx(norm, rel=1e-5)
    assert out[MAX_KEY_NORM] == pytest.approx(min(norm, max_norm), rel=1e-5)


def test_scalars_over_several_modules():
    mods = [module("linear", 0.5, seed=1), module("conv3x3", 2.0, seed=2),
            module("conv1x1", 5.0, seed=3)]
    out = apply_max_norm(mods, 1.0)
    assert out[KEYS_SCALED] == 2.0
    assert out[MAX_KEY_NORM] == pytest.approx(1.0, rel=1e-5)
    assert out[AVERAGE_KEY_NORM] == pytest.approx((0.5 + 1.0 + 1.0) / 3, rel=1e-5)
    assert [reference_norm(m) for m in mods] == pytest.approx([0.5, 1.0, 1.0], rel=1e-5)


def test_fresh_lora_with_zero_up_is_untouched_and_unset_max_does_nothing():
    m = LoRAModule("lora_unet_x", nn.Linear(8, 8), 4, 4.0)  # up is zero-initialised
    down = m.lora_down.weight.detach().clone()
    assert apply_max_norm([m], 1.0)[KEYS_SCALED] == 0.0
    assert torch.equal(m.lora_down.weight, down)
    big = module("linear", 10.0)
    assert apply_max_norm([big], None) == {} and apply_max_norm([big], 0.0) == {}
    assert reference_norm(big) == pytest.approx(10.0, rel=1e-5)


class ProductAdapter(nn.Module):
    """A non-LoRA adapter (ΔW = a ⊙ b, like LoHa's Hadamard product) offering the small
    interface: max_norm_factors() -> (norm of ΔW, the tensors whose product it is)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.full((3, 3), 2.0))
        self.b = nn.Parameter(torch.full((3, 3), 3.0))

    def max_norm_factors(self):
        return torch.linalg.norm(self.a * self.b), [self.a, self.b]


def test_other_adapters_join_through_max_norm_factors():
    m = ProductAdapter()  # ||ΔW|| = 6 * 3 = 18
    out = apply_max_norm([m], 9.0)
    assert out[KEYS_SCALED] == 1.0
    assert float(torch.linalg.norm(m.a * m.b)) == pytest.approx(9.0, rel=1e-6)
    torch.testing.assert_close(m.a / 2.0, m.b / 3.0)  # each factor scaled by sqrt(1/2)


@pytest.mark.parametrize("spec", [
    dict(algo="lora"), dict(algo="lora", use_tucker=True), dict(algo="lora", use_scalar=True),
    dict(algo="loha"), dict(algo="lokr"), dict(algo="full"), dict(algo="ia3")],
    ids=["lora", "locon-tucker", "lora-scalar", "loha", "lokr", "full", "ia3"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
def test_every_adapter_is_clamped_to_the_max(spec, conv):
    """Each LyCORIS algorithm of our network: after apply_max_norm the dense ΔW (multiplier
    1) has norm exactly the max, and a second call scales nothing."""
    from networks.adapters import make_adapter
    from networks.adapters.base import AdapterSpec
    if spec["algo"] == "ia3" and conv:
        pytest.skip("(IA)3 targets Linear layers")
    torch.manual_seed(0)
    base = nn.Conv2d(8, 12, 3, padding=1) if conv else nn.Linear(16, 12)
    m = make_adapter("m", base, 4, 2.0, AdapterSpec(**spec))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    big = float(m.delta_weight().norm())
    out = apply_max_norm([m], big / 3)
    assert out["max_norm/keys_scaled"] == 1
    assert float(m.delta_weight().norm()) == pytest.approx(big / 3, rel=1e-4)
    assert apply_max_norm([m], big / 3 * 1.0001)["max_norm/keys_scaled"] == 0  # rounding


def test_dora_modules_are_left_alone():
    from networks.adapters import make_adapter
    from networks.adapters.base import AdapterSpec
    m = make_adapter("m", nn.Linear(16, 12), 4, 2.0, AdapterSpec(algo="lora", dora=True))
    with torch.no_grad():
        m.lora_up.weight.normal_()
    before = m.delta_weight().clone()
    assert apply_max_norm([m], 1e-6) == {}
    torch.testing.assert_close(m.delta_weight(), before)
