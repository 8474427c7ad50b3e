"""Output preservation without regularization images (library/train/preservation.py):
class prompts, the loss through library.train.step.diffusion_loss on the real tiny SD1.5
model (zero while the LoRA is zero; its gradient flows only through the LoRA branch), and a
run from a TOML config."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import train_network
from library.data.sources import Item
from library.models.loading import load_components
from library.train.conditioning import TextConditioner
from library.train.preservation import ClassPrompts, Preservation, class_prompts, lora_off, \
    replace_trigger
from library.train.step import LossSettings, diffusion_loss
from networks.lora import LoRANetwork
from networks.targets import RankSpec, find_targets
from tools.make_demo_dataset import make_dataset

CAPTION = "zorblat, a purple star in a red circle, on a green background"


# ---- class prompts -------------------------------------------------------------------------
@pytest.mark.parametrize("caption, klass, expected", [
    (CAPTION, "toy", "toy, a purple star in a red circle, on a green background"),
    (CAPTION, "", "a purple star in a red circle, on a green background"),
    ("a photo of zorblat, zorblat toy", "", "a photo of, toy"),
    ("zorblatx and xzorblat stay", "toy", "zorblatx and xzorblat stay"),
    ("a red circle on a blue background", "toy", "a red circle on a blue background"),
])
def test_the_trigger_is_replaced_by_the_class(caption, klass, expected):
    assert replace_trigger(caption, "zorblat", klass) == expected


def items(*folders: str, reg: str | None = None) -> list[Item]:
    out = [Item(Path(f"{f}/0.png"), CAPTION, 1, False, f, True) for f in folders]
    if reg:
        out.append(Item(Path(f"{reg}/0.png"), "a red circle", 1, True, reg, True))
    return out


class Training:  # the [training] keys class_prompts reads
    def __init__(self, **kw):
        self.preservation_weight = kw.get("preservation_weight", 1.0)
        self.preservation_trigger = kw.get("preservation_trigger")
        self.preservation_class = kw.get("preservation_class")
        self.preservation_prompt = kw.get("preservation_prompt")


def test_trigger_and_class_come_from_the_folder_name():
    p = class_prompts(Training(), items("10_zorblat toy", reg="1_shapes"))
    assert (p.trigger, p.klass) == ("zorblat", "toy")
    assert p([CAPTION, "a red circle"]) == [
        "toy, a purple star in a red circle, on a green background", "a red circle"]
    p = class_prompts(Training(preservation_class="shape"), items("10_zorblat toy"))
    assert (p.trigger, p.klass) == ("zorblat", "shape")
    assert class_prompts(Training(preservation_weight=0.0), items("10_zorblat toy")) is None


def test_a_fixed_prompt_and_unreadable_folders():
    p = class_prompts(Training(preservation_prompt="a toy"), items("x"))
    assert p(["a", "b"]) == ["a toy", "a toy"]
    with pytest.raises(ValueError, match="preservation_trigger and preservation_class"):
        class_prompts(Training(), items("10_zorblat toy", "5_blorp dog"))
    with pytest.raises(ValueError, match="preservation_prompt"):
        class_prompts(Training(), items("images"))
    p = class_prompts(Training(preservation_trigger="zorblat", preservation_class=""),
                      items("images"))
    assert p([CAPTION]) == ["a purple star in a red circle, on a green background"]


# ---- the loss on the real tiny model -------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_sd15_dir):
    c = load_components(str(tiny_sd15_dir))
    for m in [c.unet, c.vae, *c.text_encoders]:
        m.requires_grad_(False).eval()
    targets = find_targets(c.unet, c.text_encoders, c.family.te_prefixes, "sd15",
                           RankSpec(4, 4), train_unet=True, train_text_encoder=True)
    network = LoRANetwork(targets).attach()
    conditioning = TextConditioner(c, c.family, 1, True, keep_cache=False)
    return c, network, conditioning


def batch_of(captions, loss_weight=1.0):
    n = len(captions)
    return {"captions": captions, "loss_weight": torch.full((n,), loss_weight),
            "sample_seed": torch.arange(n) + 11}


def loss_of(setup, batch, weight=1.0, preserve=True):
    c, network, conditioning = setup
    latents = torch.randn(len(batch["captions"]), 4, 8, 8,
                          generator=torch.Generator().manual_seed(5))
    cond = conditioning(batch["captions"])
    pres = Preservation(ClassPrompts("zorblat", "toy"), weight, network, conditioning) \
        if preserve else None
    return diffusion_loss(c.unet, c.family, c.noise_scheduler, latents, cond, batch,
                          LossSettings(min_snr_gamma=5.0), preservation=pres)


def set_lora(network, up: float | None):
    with torch.no_grad():
        for m in network:
            if up is None:
                m.lora_up.weight.zero_()
            else:
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape,
                                                   generator=torch.Generator().manual_seed(
                                                       hash(m.lora_name) % 1000)) * up)


def test_preservation_loss_is_zero_while_the_lora_is_zero(setup):
    _, network, _ = setup
    set_lora(network, None)
    captions = [CAPTION, "zorblat, a purple star in a red circle, on a blue background"]
    # loss_weight 0 leaves only the preservation term
    with torch.no_grad():
        only = float(loss_of(setup, batch_of(captions, 0.0)))
    assert abs(only) < 1e-9
    set_lora(network, 0.5)  # and it is not zero once the LoRA changes the model
    with torch.no_grad():
        assert float(loss_of(setup, batch_of(captions, 0.0))) > 1e-5
    set_lora(network, None)


def test_preservation_adds_to_the_plain_loss(setup):
    _, network, _ = setup
    set_lora(network, 0.5)
    captions = [CAPTION]
    with torch.no_grad():
        plain = float(loss_of(setup, batch_of(captions), preserve=False))
        only = float(loss_of(setup, batch_of(captions, 0.0), weight=2.0))
        both = float(loss_of(setup, batch_of(captions), weight=2.0))
    assert both == pytest.approx(plain + only, rel=1e-5)
    set_lora(network, None)


def test_the_gradient_flows_only_through_the_lora_branch(setup):
    """The preservation term's gradient equals that of a loss whose target is the base
    prediction computed beforehand as a constant: the base branch adds nothing."""
    c, network, conditioning = setup
    set_lora(network, 0.5)
    params = [p for p in network.parameters() if p.requires_grad]
    captions = [CAPTION, "zorblat, a purple star in a red circle, on a white background"]
    batch = batch_of(captions, 0.0)
    for p in params:
        p.grad = None
    loss_of(setup, batch).backward()
    got = [p.grad.clone() for p in params]
    assert sum(float(g.abs().sum()) for g in got) > 0
    assert all(m.multiplier == 1.0 for m in network)  # lora_off restored them

    # By hand: the same noisy latents and timesteps (seeded per sample)
    from library.train.step import seeded_noisy_latents, timestep_weight
    s = LossSettings(min_snr_gamma=5.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    _, noisy, t = seeded_noisy_latents(c.noise_scheduler, latents, s, batch["sample_seed"])
    texts = [replace_trigger(x, "zorblat", "toy") for x in captions]
    with torch.no_grad(), lora_off(network):
        target = c.unet(noisy, t, conditioning(texts)["encoder_hidden_states"]).sample
    assert not target.requires_grad
    for p in params:
        p.grad = None
    pred = c.unet(noisy, t, conditioning(texts)["encoder_hidden_states"]).sample
    w = timestep_weight(c.noise_scheduler, t, s)
    (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w).mean().backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-7)
    for p in params:
        p.grad = None
    set_lora(network, None)


# ---- from a TOML config ---------------------------------------------------------------------
def test_a_run_with_preservation_from_toml(tmp_path, tiny_sd15_dir, caplog):
    data = make_dataset(tmp_path / "data", count=2, size=64, seed=1, repeats=1).parent
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
pretrained_model_name_or_path = "{tiny_sd15_dir}"
[dataset]
train_data_dir = "{data}"
resolution = 64
train_batch_size = 2
[training]
max_train_steps = 2
seed = 0
preservation_weight = 0.5
timestep_sampling = "logit_normal"
ema_decay = 0.9
[lora]
network_dim = 4
[saving]
output_dir = "{tmp_path / 'out'}"
output_name = "p"
""")
    with caplog.at_level(logging.INFO, logger="tomlora"):
        assert train_network.main(["--config_file", str(config),
                                   "--logging_dir", str(tmp_path / "logs")]) == 0
    assert (tmp_path / "out" / "p.safetensors").is_file()
    assert "'zorblat' replaced by 'toy'" in caplog.text


def test_preservation_refuses_cuda_graphs(tmp_path):
    from library.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path),
                     "--preservation_weight", "1", "--cuda_graphs"], check_paths=False)
    assert any("cuda_graphs" in p and "preservation_weight" in p for p in e.value.problems)
