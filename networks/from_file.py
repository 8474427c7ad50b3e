"""Apply LoRA files to loaded models: read a file in either layout, build our own
`LoRANetwork` from its keys and attach it (any number of files, each with its multiplier).

Layouts are told apart by their keys: kohya (`<stem>.lora_down.weight`, `.lora_up.weight`,
`.alpha`) or diffusers/peft (`unet.<path>.lora_A.weight`, `.lora_B.weight`), which is
converted with `formats.peft_to_kohya`. Target modules are found from the key names alone
(`formats.kohya_to_unet_module`, `formats.kohya_to_te_module`), so a file made by another
trainer applies as long as it names modules of this model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from networks import formats
from networks.adapters import algo_of, group_by_module, spec_from_tensors
from networks.kohya_file import read_lora
from networks.lora import LoRANetwork, Target

_PEFT_UNSUPPORTED = ("lora_magnitude_vector",)


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'kohya' (kohya LoRA or any LyCORIS algorithm: lora_down, hada_, lokr_, diff, (IA)3) or
    'peft'; ValueError for anything else (peft DoRA, old diffusers attention processors)."""
    odd = sorted(k for k in sd if any(u in k for u in _PEFT_UNSUPPORTED))
    if odd:
        raise ValueError(f"unsupported LoRA variant (peft DoRA keys such as {odd[0]!r}); "
                         "kohya/LyCORIS files and plain diffusers/peft LoRA are supported")
    if any(algo_of(t) for t in group_by_module(sd).values()):
        return "kohya"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd):
        return "peft"
    raise ValueError("no LoRA keys found (expected kohya `.lora_down.weight`, LyCORIS "
                     "`.hada_w1_a` / `.lokr_w1` / `.diff` or diffusers/peft `.lora_A.weight` "
                     "keys)")


def kohya_state_dict_of(sd: Mapping[str, torch.Tensor], family: str,
                        unet_config: Mapping) -> dict[str, torch.Tensor]:
    """A state dict of either layout as kohya keys."""
    if detect_layout(sd) == "kohya":
        return dict(sd)
    return formats.peft_to_kohya(sd, family, unet_config)


def read_kohya(path: str | Path, family: str, unet_config: Mapping
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(kohya state dict, metadata) of a LoRA file; ValueError naming the file."""
    try:
        sd, meta = read_lora(Path(path))
        return kohya_state_dict_of(sd, family, unet_config), meta
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _te_module(te: nn.Module, layer: int, proj: str) -> nn.Module:
    # transformers 5's CLIPTextModel has no `text_model` level; CLIPTextModelWithProjection
    # still has one.
    for path in (f"text_model.encoder.layers.{layer}.{proj}", f"encoder.layers.{layer}.{proj}"):
        try:
            return te.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"text encoder has no layer {layer} {proj}")


def targets_from_state_dict(sd: Mapping[str, torch.Tensor], unet: nn.Module,
                            text_encoders: list, te_prefixes: tuple[str, ...],
                            family: str) -> list[Target]:
    """One Target per key stem, with the algorithm, rank, alpha and options its tensors
    describe (LoRA: rank from lora_down; alpha from the file, default rank)."""
    targets = []
    for stem, tensors in sorted(group_by_module(sd).items()):
        if "lora_down.weight" in tensors or "lora_up.weight" in tensors:
            if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
                raise ValueError(f"{stem}: needs both lora_down and lora_up weights")
        if stem.startswith(formats.UNET_PREFIX):
            module = unet.get_submodule(
                formats.kohya_to_unet_module(stem, family, dict(unet.config)))
        else:
            prefix, layer, proj = formats.kohya_to_te_module(stem)
            if prefix not in te_prefixes:
                raise ValueError(f"{stem}: {prefix}_ keys do not fit a {family} model "
                                 f"(text encoders {', '.join(te_prefixes)})")
            module = _te_module(text_encoders[te_prefixes.index(prefix)], layer, proj)
        try:
            rank, alpha, spec = spec_from_tensors(tensors, tuple(module.weight.shape))
        except ValueError as e:
            raise ValueError(f"{stem}: {e}") from None
        targets.append(Target(stem, module, rank, alpha if alpha is not None else rank, spec))
    return targets


def network_from_state_dict(sd: Mapping[str, torch.Tensor], unet: nn.Module,
                            text_encoders: list, te_prefixes: tuple[str, ...], family: str,
                            *, multiplier: float = 1.0, source: str = "state dict"
                            ) -> LoRANetwork:
    """A (detached) LoRANetwork holding the file's weights, on the UNet's device."""
    try:
        targets = targets_from_state_dict(sd, unet, text_encoders, te_prefixes, family)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    network = LoRANetwork(targets, multiplier=multiplier)
    network.load_kohya_state_dict(sd, source)
    return network.to(unet.device).eval()


def attach_lora_files(c, loras: list[tuple[str, float]]) -> list[LoRANetwork]:
    """Attach every (path, multiplier) to loaded `Components`, in order. LoRAs on the same
    module chain: each adds its own term to the output of the previous ones. Detach in
    reverse order (`for n in reversed(nets): n.detach()`)."""
    family = c.family
    networks = []
    for path, multiplier in loras:
        sd, _ = read_kohya(path, family.name, dict(c.unet.config))
        networks.append(network_from_state_dict(
            sd, c.unet, c.text_encoders, family.te_prefixes, family.name,
            multiplier=multiplier, source=str(path)).attach())
    return networks
