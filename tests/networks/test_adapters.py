"""The adapter family's shared shape, for every algorithm: a fresh network is the base, files
round-trip exactly (use_scalar folded in, the raw training state kept apart), merge/unmerge
and detach restore the base bit for bit, delta_weight() is what the forward adds (multiplier
included, DoRA's too), and sampling's lora_as_saved restores the training weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from library.train.sampling import lora_as_saved
from networks.adapters import ALGORITHMS, canonical
from networks.adapters.base import AdapterSpec
from networks.lora import LoRANetwork, Target
from tests.networks.helpers import one_thread  # noqa: F401

SPECS = [AdapterSpec("lora"), AdapterSpec("lora", use_tucker=True, use_scalar=True),
         AdapterSpec("lora", dora=True), AdapterSpec("loha", use_tucker=True),
         AdapterSpec("loha", dora=True, use_scalar=True), AdapterSpec("lokr", factor=2),
         AdapterSpec("lokr", decompose_both=True, dora=True), AdapterSpec("full"),
         AdapterSpec("ia3"), AdapterSpec("ia3", on_input=True),
         AdapterSpec("lora", rs_lora=True)]
IDS = [f"{s.algo}{'-tucker' * s.use_tucker}{'-dora' * s.dora}{'-scalar' * s.use_scalar}"
       f"{'-input' * s.on_input}{'-rs' * s.rs_lora}" for s in SPECS]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def network(model, spec, randomise=True):
    net = LoRANetwork([Target("lora_unet_lin", model.lin, 4, 2.0),
                       Target("lora_unet_conv", model.conv, 2, 1.0)], spec=spec)
    if randomise:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 16, generator=g), torch.randn(1, 8, 5, 5, generator=g)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_fresh_network_is_the_base(spec):
    model = Tiny()
    base = model(*inputs())
    net = network(model, spec, randomise=False).attach()
    for got, want in zip(model(*inputs()), base):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert all(float(m.delta_weight().abs().max()) < 1e-6 for m in net)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_files_round_trip_and_delta_is_the_forward(spec, tmp_path):
    model = Tiny()
    x = inputs()
    base = [t.detach() for t in model(*x)]
    weights = [p.detach().clone() for p in model.parameters()]
    net = network(model, spec).eval().attach()
    net.set_multiplier(0.5)
    with torch.no_grad():
        out = model(*x)
        lin_d, conv_d = (m.delta_weight() for m in net)
        lin_b = net.loras["lora_unet_lin"].delta_bias()
    want_lin = base[0] + x[0] @ lin_d.T + (lin_b if lin_b is not None else 0)
    torch.testing.assert_close(out[0], want_lin, rtol=1e-5, atol=1e-5)
    # a file (scalar folded in) and the raw state both rebuild the same network
    for raw in (False, True):
        sd = net.kohya_state_dict(torch.float32, raw=raw)
        assert any(k.endswith(".scalar") for k in sd) == (raw and spec.use_scalar)
        other = network(Tiny(), spec, randomise=False)
        other.load_kohya_state_dict(sd)
        other.set_multiplier(0.5)
        for a, b in zip(net, other):
            torch.testing.assert_close(b.delta_weight(), a.delta_weight(), rtol=1e-6,
                                       atol=1e-6)
    # merge = forward; unmerge and detach give the base bit for bit
    net.merge()
    for m in net:  # the modules' own detach keeps the merge (the network's unmerges)
        m.detach()
    with torch.no_grad():
        merged = model(*x)
    torch.testing.assert_close(merged[0], out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[1], out[1], rtol=1e-5, atol=1e-5)
    net.unmerge()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_lora_as_saved_restores_the_training_weights(spec):
    net = network(Tiny(), spec).attach()
    before = [t.detach().clone() for t in list(net.parameters()) + list(net.buffers())]
    with lora_as_saved(net, torch.float16):
        assert all(m.multiplier == 1.0 for m in net)
    after = list(net.parameters()) + list(net.buffers())
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_algorithm_names():
    assert canonical("LoCon") == "lora" and canonical("kron") == "lokr"
    assert set(ALGORITHMS) == {"lora", "loha", "lokr", "full", "ia3"}
    with pytest.raises(ValueError, match="GLoRA is not supported"):
        canonical("glora")
    with pytest.raises(ValueError, match="unknown algorithm 'lorax'"):
        canonical("lorax")


def test_wrong_algorithm_file_is_a_clear_error():
    model = Tiny()
    sd = network(model, AdapterSpec("loha")).kohya_state_dict()
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        network(Tiny(), AdapterSpec("lokr"), randomise=False).load_kohya_state_dict(sd, "x")


def test_show_metadata_names_the_lycoris_algorithm():
    from tools.show_metadata import describe_network
    line = describe_network({"ss_network_module": "lycoris.kohya", "ss_network_dim": "8",
                             "ss_network_alpha": "4",
                             "ss_network_args": '{"algo": "lokr", "factor": 8}'})
    assert line == ("network: LyCORIS LoKr (lycoris.kohya, algo=lokr), dim 8, alpha 4, "
                    "factor=8")
    assert describe_network({"ss_network_module": "networks.lora", "ss_network_dim": "4",
                             "ss_network_alpha": "4"}) == "network: networks.lora, dim 4, alpha 4"


def test_network_type_is_written_as_lycoris_metadata():
    from dataclasses import replace

    from library.config.schema import Config
    from library.train.saving import network_identity
    lo = replace(Config().lora, network_type="loha", network_args={"conv_dim": 4})
    assert network_identity(lo) == ("lycoris.kohya", {"algo": "loha", "conv_dim": 4})
    assert network_identity(Config().lora) == ("networks.lora", {})



@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_training_forward_reads_no_tensor_value_on_the_host(spec, monkeypatch):
    """A host read (.item(), bool(tensor), float(tensor)) in the forward syncs the GPU and
    invalidates CUDA graph capture (the (IA)3 forward once read its on_input buffer so)."""
    model = Tiny()
    net = network(model, spec).attach()
    net.train()
    x, img = inputs()

    def host_read(*_args):
        raise AssertionError("the adapter forward read a tensor's value on the host")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    lin, conv = model(x, img)
    assert lin.shape == (3, 8) and conv.shape == (1, 8, 5, 5)


def test_ia3_file_with_the_other_axis_is_refused_by_name():
    """The forward takes (IA)3's axis from the network's spec, so a file trained on the other
    axis (same shape for a square layer) is refused rather than applied along the wrong one."""
    model = Tiny()
    sd = network(model, AdapterSpec("ia3", on_input=True)).kohya_state_dict()
    fresh = network(Tiny(), AdapterSpec("ia3"), randomise=False)
    with pytest.raises(ValueError, match="on_input flags differ.*lora_unet_conv.on_input"):
        fresh.load_kohya_state_dict(sd, source="x.safetensors")
