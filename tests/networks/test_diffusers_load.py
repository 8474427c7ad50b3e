"""Our kohya files in diffusers: every module applied, and the same outputs as our own merge.

For SD1.5 and SDXL x {UNet only, text encoders only, both, LoCon}: a network with random
lora_up is saved by our writer; diffusers' `load_lora_weights` must create one peft layer per
file module, and the pipeline's UNet and text-encoder outputs must equal our model with the
LoRA merged into the weights (W + scale * up @ down). Two LoRAs through `set_adapters` at
0.8 / 0.5 must equal our two networks attached with those multipliers.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.models.loading import FAMILIES
from networks.targets import RankSpec
from tests.networks.helpers import (assert_outputs_close, encoders, file_modules, load_pipe,
                                    one_thread, outputs, peft_layers, random_network,  # noqa
                                    save)

KINDS = {  # (train UNet, train text encoders, conv_dim)
    "unet": (True, False, None),
    "te": (False, True, None),
    "both": (True, True, None),
    "locon": (True, True, 2),
}


def model_dir(family, tiny_sd15_dir, tiny_sdxl_dir):
    return tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_load_lora_weights_applies_every_module_and_matches_merge(
        family, kind, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    pipe = load_pipe(model_dir(family, tiny_sd15_dir, tiny_sdxl_dir))
    unet, te, conv_dim = KINDS[kind]
    # alpha != rank so the scale matters; 3x3 convs with their own alpha
    ranks = RankSpec(4, 2.0, conv_dim, 1.0 if conv_dim else None)
    net = random_network(pipe, family, ranks, unet=unet, te=te, seed=1)
    path = save(net, tmp_path / "ours.safetensors", family, pipe)
    base = outputs(pipe, family)

    net.attach()
    net.merge()
    ours = outputs(pipe, family)
    net.detach()
    assert_outputs_close(outputs(pipe, family), base, atol=0)  # detach restored the model
    changed = {k for k in base if not torch.allclose(ours[k], base[k], atol=1e-4)}
    assert ("unet" in changed) == unet
    assert any(k.startswith("te") for k in changed) == te

    pipe.load_lora_weights(str(tmp_path), weight_name="ours.safetensors", adapter_name="ours")
    sd = load_file(str(path))
    assert peft_layers(pipe.unet, "ours") == file_modules(sd, "lora_unet")
    for encoder, prefix in zip(encoders(pipe), FAMILIES[family].te_prefixes):
        assert peft_layers(encoder, "ours") == file_modules(sd, prefix)
    assert sum(peft_layers(m, "ours") for m in [pipe.unet, *encoders(pipe)]) == len(net)
    assert_outputs_close(outputs(pipe, family), ours)


# SDXL only: two text encoders and LDM names; tests/tools/test_generate.py checks the same
# two weights on SD1.5 (and SDXL) through whole generated images.
@pytest.mark.parametrize("family", ["sdxl"])
def test_set_adapters_equals_our_multipliers(family, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    pipe = load_pipe(model_dir(family, tiny_sd15_dir, tiny_sdxl_dir))
    a = random_network(pipe, family, RankSpec(4, 2.0), seed=2)
    b = random_network(pipe, family, RankSpec(2, None, 2, 1.0), te=False, seed=3)
    save(a, tmp_path / "a.safetensors", family, pipe)
    save(b, tmp_path / "b.safetensors", family, pipe)
    a.set_multiplier(0.8)
    b.set_multiplier(0.5)
    a.attach()
    b.attach()
    ours = outputs(pipe, family)
    b.detach()
    a.detach()

    pipe.load_lora_weights(str(tmp_path), weight_name="a.safetensors", adapter_name="a")
    pipe.load_lora_weights(str(tmp_path), weight_name="b.safetensors", adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    assert_outputs_close(outputs(pipe, family), ours)
