"""Our adapters against LyCORIS's own modules (lycoris-lora, test-only): for every algorithm
on a Linear, a 1x1 and a 3x3 conv, LyCORIS's loader builds its module from the tensors our
module writes (every tensor used), and its ΔW and forward output equal ours."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.adapters import ALGORITHMS, delta_from_tensors
from networks.adapters.base import AdapterSpec
from networks.adapters.lokr import factorization
from networks.lora import LoRANetwork, Target
from tests.networks.helpers import one_thread  # noqa: F401  (fixture)

lycoris = pytest.importorskip("lycoris")
from lycoris.functional.general import factorization as lyco_factorization  # noqa: E402
from lycoris.functional.general import weight_decompose  # noqa: E402
from lycoris.modules import get_module, make_module  # noqa: E402


def bases():
    torch.manual_seed(0)
    return {"linear": nn.Linear(64, 32), "conv1x1": nn.Conv2d(16, 32, 1),
            "conv3x3": nn.Conv2d(16, 32, 3, padding=1, stride=1)}


def inputs(kind):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 64, generator=g) if kind == "linear" else \
        torch.randn(2, 16, 6, 6, generator=g)


CASES = [
    ("lora", {}), ("lora", {"use_tucker": True}), ("lora", {"dora": True}),
    ("lora", {"dora": True, "dora_on_out": False}), ("lora", {"use_scalar": True}),
    ("loha", {}), ("loha", {"use_tucker": True}), ("loha", {"dora": True}),
    ("lokr", {}), ("lokr", {"factor": 4}), ("lokr", {"decompose_both": True}),
    ("lokr", {"full_matrix": True}), ("lokr", {"use_tucker": True}), ("lokr", {"dora": True}),
    ("lokr", {"rank": 16}),
    ("full", {}), ("ia3", {}), ("ia3", {"on_input": True}),
]


def ours(algo, kind, opts):
    opts = dict(opts)
    rank = opts.pop("rank", 2)
    base = bases()[kind]
    spec = AdapterSpec(algo=algo, **opts)
    net = LoRANetwork([Target("lora_unet_x", base, rank, 3.0)], spec=spec).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (p.abs().mean() if
                                                            p.dim() > 1 else 0))
    return net, base


def lyco_delta(m):
    """ΔW as LyCORIS's forward applies it (its merge path scales LoHa/LoKr twice)."""
    w = m.org_module[0].weight.float()
    name = type(m).__name__
    if name == "LoConModule":
        diff = m.make_weight() * m.scale
    elif name in ("LohaModule", "LokrModule"):
        diff = m.get_weight(m.shape) * m.scalar
    else:
        return m.get_diff_weight()[0]
    if m.wd:
        return weight_decompose(w + diff, m.dora_scale, 1, m.wd_on_out) - w
    return diff


@pytest.mark.parametrize("algo,opts", CASES, ids=[f"{a}-{'-'.join(o) or 'plain'}"
                                                    for a, o in CASES])
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_same_delta_and_forward_as_lycoris(algo, opts, kind):
    net, base = ours(algo, kind, opts)
    (m,) = list(net)
    sd = net.kohya_state_dict(torch.float32)
    lyco_type, params = get_module(sd, "lora_unet_x")
    assert lyco_type is not None, sorted(sd)
    if algo == "ia3":  # LyCORIS's IA3 loader takes the weight only (on_input from args)
        lyco = lyco_type("lora_unet_x", base, 1.0, train_on_input=bool(opts.get("on_input")))
        lyco.weight.data.copy_(sd["lora_unet_x.weight"])
    elif opts.get("dora_on_out") is False or (algo == "lokr" and m.tucker
                                              and "lokr_w1_a" not in m.slots()):
        # LyCORIS's loader assumes DoRA on outputs, and takes a Tucker LoKr's rank from
        # lokr_w2_a's second axis (b, not r): its own such files do not load there either.
        lyco = lyco_type("lora_unet_x", base, 1.0, m.rank, float(m.alpha),
                         weight_decompose=m.spec.dora, wd_on_out=m.spec.dora_on_out,
                         use_tucker=m.spec.use_tucker)
        lyco.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items()}, strict=False)
    else:
        lyco = make_module(lyco_type, params, "lora_unet_x", base)
    lyco.eval()
    # every tensor of our file is one LyCORIS writes for this module, and vice versa
    assert {f"lora_unet_x.{k}" for k in lyco.state_dict()} == set(sd)
    ours_delta = m.delta_weight()
    torch.testing.assert_close(ours_delta, lyco_delta(lyco).detach().float(),
                               rtol=1e-5, atol=1e-5)
    # the pure function of the file's tensors gives the same ΔW
    file_tensors = {k.split(".", 1)[1]: v for k, v in sd.items()}
    torch.testing.assert_close(
        delta_from_tensors(file_tensors, tuple(base.weight.shape), base.weight.detach()),
        ours_delta, rtol=1e-5, atol=1e-5)
    x = inputs(kind)
    with torch.no_grad():
        net.attach()
        y_ours = base(x)
        net.detach()
        lyco.apply_to()
        y_lyco = base(x)
        lyco.restore()
    torch.testing.assert_close(y_ours, y_lyco, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim", [1, 7, 16, 64, 127, 128, 250, 320, 360, 512, 640, 1280])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16])
def test_factorization_matches(dim, factor):
    assert factorization(dim, factor) == lyco_factorization(dim, factor)


def test_every_algorithm_is_covered():
    assert {a for a, _ in CASES} == set(ALGORITHMS)
