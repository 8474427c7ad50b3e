"""LyCORIS's presets choose the same modules (and ranks) in our network as in LyCORIS's own
kohya network, on the tiny SD1.5 and SDXL models; and a file of each algorithm we write loads
in LyCORIS's create_lycoris_from_weights with every key used and the same merged weights."""
from __future__ import annotations

import copy

import pytest
import torch

from library.models.loading import FAMILIES
from library.train.saving import save_lora
from networks.adapters.base import AdapterSpec
from networks.from_file import read_kohya, targets_from_state_dict
from networks.lora import LoRANetwork
from networks.presets import PRESETS, Dims, preset_targets
from tests.networks.helpers import encoders, load_pipe, one_thread  # noqa: F401

lycoris = pytest.importorskip("lycoris")
from lycoris import create_lycoris_from_weights, kohya  # noqa: E402
from lycoris.config import PRESET  # noqa: E402


@pytest.fixture(scope="module")
def pipes(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": load_pipe(tiny_sd15_dir), "sdxl": load_pipe(tiny_sdxl_dir)}


def lycoris_preset(name: str) -> dict:
    """LyCORIS's preset as it behaves on sd-scripts' models: attn-only's CrossAttention is
    diffusers' Attention; full/full-lin list time_embedding both by class and by name, which
    LyCORIS 4.1.3 rejects as duplicates on a diffusers UNet (the set meant is the union)."""
    p = copy.deepcopy(PRESET[name])
    p["unet_target_module"] = ["Attention" if m == "CrossAttention" else m
                               for m in p["unet_target_module"]]
    p["unet_target_name"] = [n for n in p["unet_target_name"]
                             if not n.startswith("time_embedding")]
    return p


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", ["full", "full-lin", "attn-mlp", "attn-only",
                                    "unet-transformer-only", "unet-convblock-only"])
def test_preset_chooses_lycoris_modules(pipes, family, preset):
    pipe = pipes[family]
    tes = encoders(pipe)
    kohya.LycorisNetworkKohya.apply_preset(lycoris_preset(preset))
    try:
        net = kohya.LycorisNetworkKohya(tes if family == "sdxl" else tes[0], pipe.unet,
                                        lora_dim=4, conv_lora_dim=2, alpha=4.0,
                                        conv_alpha=1.0, network_module="locon",
                                        warn_on_unmatched=False)
    finally:
        kohya.LycorisNetworkKohya.apply_preset(PRESET["full"])
    theirs = {id(m.org_module[0]): m.lora_dim for m in net.unet_loras + net.text_encoder_loras}
    targets = preset_targets(preset, pipe.unet, tes, FAMILIES[family].te_prefixes, family,
                             Dims(4, 4.0, 2, 1.0), AdapterSpec(), train_unet=True,
                             train_text_encoder=True)
    ours = {id(t.module): t.rank for t in targets}
    assert len(ours) == len(targets)
    assert ours == theirs
    assert ours  # a preset that chooses nothing would pass vacuously


def test_ia3_preset_targets_keys_values_and_ff_out(pipes):
    pipe = pipes["sd15"]
    targets = preset_targets("ia3", pipe.unet, encoders(pipe), ("lora_te",), "sd15",
                             Dims(4, None, 4, None), AdapterSpec("ia3"), train_unet=True,
                             train_text_encoder=True)
    names = [t.name for t in targets]
    assert all(n.endswith(("to_k", "to_v", "ff_net_2", "k_proj", "v_proj", "mlp_fc2"))
               for n in names)
    on_input = {t.name for t in targets if t.spec is not None and t.spec.on_input}
    assert on_input == {n for n in names if n.endswith(("ff_net_2", "mlp_fc2"))} != set()


ALGOS = [AdapterSpec("lora", use_tucker=True), AdapterSpec("loha"),
         AdapterSpec("lokr", factor=4), AdapterSpec("lokr", decompose_both=True),
         AdapterSpec("lora", dora=True), AdapterSpec("loha", dora=True),
         AdapterSpec("lokr", dora=True), AdapterSpec("full")]


def lycoris_reloads_own(m) -> bool:
    """Whether LyCORIS's loader rebuilds its own module of this kind from its own tensors:
    it guesses a LoKr's factor from the shapes and, for a k x k conv whose w2 is low-rank,
    counts the kernel into the input width (conv_in of the tiny UNet: 4 channels), so a few
    of its own LoKr files do not load there; those modules are left out of the comparison."""
    from lycoris.modules import get_module, make_module
    from lycoris.modules.lokr import LokrModule
    if m.spec.algo != "lokr":
        return True
    theirs = LokrModule("x", m.base, 1.0, m.rank, float(m.alpha), factor=m.spec.factor,
                        decompose_both=m.spec.decompose_both, use_tucker=m.spec.use_tucker,
                        weight_decompose=m.spec.dora)
    sd = {f"x.{k}": v for k, v in theirs.state_dict().items()}
    try:
        make_module(*get_module(sd, "x"), "x", m.base)
        return True
    except RuntimeError:
        return False


# Tucker LoKr is left out: LyCORIS's loader takes its rank from lokr_w2_a's second axis,
# which is not the rank in that layout, so it rejects its own such files too (the module
# itself is checked in test_lycoris_oracle.py).
@pytest.mark.parametrize("spec", ALGOS, ids=lambda s: s.algo + ("-dora" if s.dora else "")
                         + ("-tucker" if s.use_tucker else ""))
def test_file_loads_in_lycoris_with_every_key(pipes, spec, tmp_path):
    pipe = pipes["sd15"]
    tes = encoders(pipe)
    targets = preset_targets("full", pipe.unet, tes, ("lora_te",), "sd15",
                             Dims(2, None, 2, None), spec, train_unet=True,
                             train_text_encoder=True)
    net = LoRANetwork(targets, spec=spec).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = save_lora(net, tmp_path / "x.safetensors", precision="fp32", layout="safetensors",
                     family="sd15", unet_config=dict(pipe.unet.config), metadata={})
    sd, _ = read_kohya(path, "sd15", dict(pipe.unet.config))
    holder = torch.nn.ModuleDict({"unet": pipe.unet, "te": tes[0]})
    paths = {id(m): p for p, m in holder.named_modules()}
    stems = {t.name: "lycoris_" + paths[id(t.module)].replace(".", "_")
             for t in targets_from_state_dict(sd, pipe.unet, tes, ("lora_te",), "sd15")}
    own_fail = {m.lora_name for m in net if not lycoris_reloads_own(m)}
    assert len(own_fail) <= 2, own_fail
    renamed = {f"{stems[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()
               if k.split(".", 1)[0] not in own_fail}
    lyco, _ = create_lycoris_from_weights(1.0, None, holder, weights_sd=dict(renamed))
    used = {f"{m.lora_name}.{k}" for m in lyco.loras for k in m.state_dict()}
    assert len(lyco.loras) == len(net) - len(own_fail) and used == set(renamed)
    weights = {id(m.base): m.base.weight.detach().clone() for m in net}
    net.merge()
    ours = {id(m.base): m.base.weight.detach().clone() for m in net}
    net.unmerge()
    for m in lyco.loras:
        m.merge_to(1.0)
    try:
        for m in lyco.loras:
            w = m.org_module[0].weight
            torch.testing.assert_close(w, ours[id(m.org_module[0])], rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            for m in net:
                m.base.weight.copy_(weights[id(m.base)])


def test_shipped_lokr_example_builds_full_matrix_lokr(pipes):
    """configs/examples/sdxl_lokr_character.toml: its network_args parse for SDXL and build a
    LoKr network on LyCORIS's full preset whose modules are all full-matrix (alpha ignored)."""
    from types import SimpleNamespace

    from networks.build import build_network
    from networks.param_groups import check_config
    from tests.config.helpers import REPO, load
    cfg = load(["--config_file", REPO / "configs" / "examples" /
                "sdxl_lokr_character.toml"]).config
    args = check_config(cfg, "sdxl")
    assert args.spec.algo == "lokr" and args.spec.factor == 8 and args.preset == "full"
    pipe = pipes["sdxl"]
    c = SimpleNamespace(unet=pipe.unet, text_encoders=encoders(pipe))
    net = build_network(c, FAMILIES["sdxl"], cfg, args)
    assert {m.spec.algo for m in net} == {"lokr"}
    assert all(m.use_w1 and m.use_w2 and m.scale == 1.0 for m in net)
    assert {"lora_unet_input_blocks_0_0", "lora_te2_text_model_encoder_layers_0_mlp_fc2"} <= \
        set(net.loras)
