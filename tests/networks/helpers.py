"""Helpers for the LoRA tests on the tiny pipelines: random networks on the real components,
model outputs to compare, and peft layer counts after diffusers' load_lora_weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.models.loading import FAMILIES
from library.train.saving import save_lora
from networks.lora import LoRANetwork
from networks.targets import RankSpec, find_targets


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: more threads only spin against each other
    (a 12 ms Linear instead of microseconds). Import it into a test module to use it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_pipe(model_dir: Path):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoders(pipe) -> list:
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
            if te is not None]


def random_network(pipe, family: str, ranks: RankSpec, *, unet: bool = True, te: bool = True,
                   seed: int = 0, scale: float = 0.1) -> LoRANetwork:
    """Our network on the pipeline's own modules, lora_up randomised so deltas are non-zero."""
    targets = find_targets(pipe.unet, encoders(pipe), FAMILIES[family].te_prefixes, family,
                           ranks, train_unet=unet, train_text_encoder=te)
    net = LoRANetwork(targets).eval()
    randomise(net, seed, scale)
    return net


def randomise(net: LoRANetwork, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * scale)


def save(net: LoRANetwork, path: Path, family: str, pipe, layout: str = "safetensors",
         precision: str = "fp32") -> Path:
    return save_lora(net, path, precision=precision, layout=layout, family=family,
                     unet_config=dict(pipe.unet.config), metadata={"ss_network_dim": "4"})


def outputs(pipe, family: str) -> dict[str, torch.Tensor]:
    """UNet noise prediction and every text encoder's hidden states (and SDXL's pooled)."""
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 *
                                       cfg.addition_time_embed_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    out = {}
    with torch.no_grad():
        out["unet"] = pipe.unet(x, 10, ctx, **kwargs).sample
        ids = pipe.tokenizer(["zorblat, a purple star"], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        for i, te in enumerate(encoders(pipe)):
            res = te(ids)
            out[f"te{i}"] = res.last_hidden_state
            if getattr(res, "text_embeds", None) is not None:
                out[f"te{i}_pooled"] = res.text_embeds
    return out


def peft_layers(module, adapter: str) -> int:
    from peft.tuners.lora import LoraLayer
    return sum(1 for _, m in module.named_modules()
               if isinstance(m, LoraLayer) and adapter in m.lora_A)


def file_modules(sd: dict, prefix: str) -> int:
    return len({k.split(".")[0] for k in sd if k.startswith(prefix + "_")})


def assert_outputs_close(got: dict, want: dict, atol: float = 2e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")
