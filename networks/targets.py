"""Which modules get a LoRA (kohya's defaults), found by type, named by kohya key stem.

UNet, attention only (default): every nn.Linear / nn.Conv2d inside a Transformer2DModel.
UNet with `conv_dim` (LoCon): also the convs and time projection of ResnetBlock2D and the
Downsample2D / Upsample2D convs. Linear and 1x1 convs use network_dim/alpha; 3x3 convs use
conv_dim/conv_alpha.
Text encoders: q/k/v/out projections and fc1/fc2 of every CLIP encoder layer, always all six
per layer (partial layers do not load everywhere; see LORA_FORMAT.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from networks import formats
from networks.lora import Target

_TE_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass(frozen=True)
class RankSpec:
    dim: int
    alpha: float | None
    conv_dim: int | None = None
    conv_alpha: float | None = None


def _is_3x3(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)


def unet_module_paths(unet: nn.Module, include_conv: bool) -> list[tuple[str, nn.Module]]:
    """(module path, module) of every UNet target, in module order."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    containers = (Transformer2DModel,)
    if include_conv:
        containers = containers + (ResnetBlock2D, Downsample2D, Upsample2D)
    found: dict[str, nn.Module] = {}
    for cpath, container in unet.named_modules():
        if not isinstance(container, containers):
            continue
        for sub, m in container.named_modules():
            if sub and isinstance(m, (nn.Linear, nn.Conv2d)):
                found.setdefault(f"{cpath}.{sub}", m)
    return list(found.items())


def unet_targets(unet: nn.Module, family: str, ranks: RankSpec) -> list[Target]:
    config = dict(unet.config)
    out = []
    for path, m in unet_module_paths(unet, include_conv=ranks.conv_dim is not None):
        name = formats.unet_module_to_kohya(path, family, config)
        if _is_3x3(m):
            out.append(Target(name, m, ranks.conv_dim, ranks.conv_alpha))
        else:
            out.append(Target(name, m, ranks.dim, ranks.alpha))
    return out


def text_encoder_targets(text_encoder: nn.Module, prefix: str, ranks: RankSpec) -> list[Target]:
    out = []
    for path, m in text_encoder.named_modules():
        match = _TE_MODULE.search(path)
        if match and isinstance(m, nn.Linear):
            name = formats.te_module_to_kohya(int(match.group(1)), match.group(2), prefix)
            out.append(Target(name, m, ranks.dim, ranks.alpha))
    return out


def find_targets(unet, text_encoders: list, te_prefixes: tuple[str, ...], family: str,
                 ranks: RankSpec, *, train_unet: bool, train_text_encoder: bool
                 ) -> list[Target]:
    targets: list[Target] = []
    if train_unet:
        found = unet_targets(unet, family, ranks)
        if not found:
            raise ValueError("no LoRA targets found in the UNet (looked for Linear/Conv2d "
                             "inside Transformer2DModel blocks"
                             + (", ResnetBlock2D and Down/Upsample2D" if ranks.conv_dim else "")
                             + "); is this an SD1.5/SDXL UNet?")
        targets += found
    if train_text_encoder:
        for te, prefix in zip(text_encoders, te_prefixes):
            found = text_encoder_targets(te, prefix, ranks)
            if not found:
                raise ValueError(f"no LoRA targets found in text encoder {prefix} (looked "
                                 "for layers.N.self_attn.{q,k,v,out}_proj and mlp.fc1/fc2)")
            targets += found
    return targets
