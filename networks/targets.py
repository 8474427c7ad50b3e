"""Which modules get a LoRA (kohya's defaults), found by type, named by kohya key stem.

UNet, attention only (default): every nn.Linear / nn.Conv2d inside a Transformer2DModel.
UNet with `conv_dim` (LoCon): also the convs and time projection of ResnetBlock2D and the
Downsample2D / Upsample2D convs. Linear and 1x1 convs use network_dim/alpha; 3x3 convs use
conv_dim/conv_alpha. With kohya's per-block ranks (RankSpec.block_dims ...), each UNet module
takes the rank and alpha of its kohya block (formats.lora_block_index); rank 0 leaves it out.
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
    """Ranks and alphas of the targets. The per-block tables (kohya's block_dims, ...; built
    by networks.network_args.rank_spec) are indexed by formats.lora_block_index and apply to
    UNet modules only; a rank of 0 leaves the module out."""
    dim: int
    alpha: float | None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float | None, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float | None, ...] | None = None

    @property
    def include_conv(self) -> bool:
        return bool(self.conv_dim) or bool(self.conv_block_dims and any(self.conv_block_dims))

    def for_module(self, conv3x3: bool, block: int) -> tuple[int, float | None]:
        """(rank, alpha) of a UNet module in kohya block `block` (-1: outside the blocks)."""
        if conv3x3:
            dims, alphas, dim, alpha = (self.conv_block_dims, self.conv_block_alphas,
                                        self.conv_dim, self.conv_alpha)
        else:
            dims, alphas, dim, alpha = self.block_dims, self.block_alphas, self.dim, self.alpha
        if dims is None or block < 0:
            return dim or 0, alpha
        return dims[block], (alphas[block] if alphas is not None else alpha)


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
    """UNet targets; modules whose (block) rank is 0 are left out."""
    config = dict(unet.config)
    tables = [t for t in (ranks.block_dims, ranks.conv_block_dims) if t is not None]
    if tables:
        count = formats.lora_block_count(family, config)
        if any(len(t) != count for t in tables):
            raise ValueError(f"per-block network_args have {len(tables[0])} values but this "
                             f"UNet has {count} kohya blocks (a non-standard layout?)")
    out = []
    for path, m in unet_module_paths(unet, include_conv=ranks.include_conv):
        name = formats.unet_module_to_kohya(path, family, config)
        block = formats.lora_block_index(path, family, config) if tables else -1
        rank, alpha = ranks.for_module(_is_3x3(m), block)
        if rank:
            out.append(Target(name, m, rank, alpha))
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
        if not found and ranks.block_dims is not None:
            raise ValueError("every UNet block has rank 0 (network_args block_dims, or lr "
                             "weights of 0): nothing to train in the UNet; set "
                             "network_train_text_encoder_only = true or give some block a rank")
        if not found:
            raise ValueError("no LoRA targets found in the UNet (looked for Linear/Conv2d "
                             "inside Transformer2DModel blocks"
                             + (", ResnetBlock2D and Down/Upsample2D" if ranks.include_conv
                                else "") + "); is this an SD1.5/SDXL UNet?")
        targets += found
    if train_text_encoder:
        for te, prefix in zip(text_encoders, te_prefixes):
            found = text_encoder_targets(te, prefix, ranks)
            if not found:
                raise ValueError(f"no LoRA targets found in text encoder {prefix} (looked "
                                 "for layers.N.self_attn.{q,k,v,out}_proj and mlp.fc1/fc2)")
            targets += found
    return targets
