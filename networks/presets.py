"""LyCORIS's target presets (`network_args = ["preset=full"]` with network_module =
"lycoris.kohya"), choosing the modules LyCORIS's kohya network chooses.

LyCORIS walks each model: every module whose class is a preset target class gets an adapter
on each of its Linear and Conv2d children, and every module whose path matches a preset
target name (a regex matched at the start of the path) gets one itself. Linear and 1x1 convs
take network_dim / network_alpha; k x k convs take conv_dim / conv_alpha (conv_dim defaults
to network_dim, and presets that disable convs leave them out).

Class names are diffusers' and transformers' (LyCORIS's own tables also list classes of
other model families, which never occur in SD1.5 / SDXL). attn-only names sd-scripts'
`CrossAttention` class, which is diffusers' `Attention`. The ia3 preset's names are matched as
path suffixes (to_k, to_v, ff.net.2; k_proj, v_proj, mlp.fc2 with train_on_input), which is
what the preset means; LyCORIS's start-anchored match finds none of them in these models.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import nn

from networks import formats
from networks.adapters.base import AdapterSpec
from networks.lora import Target


@dataclass(frozen=True)
class Preset:
    enable_conv: bool
    unet_modules: tuple[str, ...]
    unet_names: tuple[str, ...] = ()
    te_modules: tuple[str, ...] = ()
    te_names: tuple[str, ...] = ()
    suffix_names: bool = False          # ia3: names are path suffixes
    on_input_names: tuple[str, ...] = ()  # ia3: these train on the input channels


_TE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
_TRANSFORMER = ("Transformer2DModel",)
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# diffusers' TimestepEmbedding is in LyCORIS's full class list (it names an Anima class of
# the same name), so full-lin / attn-mlp / ... pick time and label embeddings up too.
_EMB = ("TimestepEmbedding",)
PRESETS: dict[str, Preset] = {
    "full": Preset(True, _TRANSFORMER + _CONV_BLOCKS + _EMB,
                   ("conv_in", "conv_out", "time_embedding.linear_1",
                    "time_embedding.linear_2"), _TE),
    "full-lin": Preset(False, _TRANSFORMER + ("ResnetBlock2D",) + _EMB,
                       ("time_embedding.linear_1", "time_embedding.linear_2"), _TE),
    "attn-mlp": Preset(False, _TRANSFORMER + _EMB, (), _TE),
    "attn-only": Preset(False, ("Attention",), (), ("CLIPAttention", "CLIPSdpaAttention")),
    "unet-only": Preset(True, _TRANSFORMER + _CONV_BLOCKS + _EMB,
                        ("conv_in", "conv_out", "time_embedding.linear_1",
                         "time_embedding.linear_2"), ()),
    "unet-transformer-only": Preset(False, _TRANSFORMER + _EMB),
    "unet-convblock-only": Preset(True, _CONV_BLOCKS, ("conv_in", "conv_out")),
    "ia3": Preset(False, (), ("to_k", "to_v", "ff.net.2"), (), ("k_proj", "v_proj", "mlp.fc2"),
                  suffix_names=True, on_input_names=("ff.net.2", "mlp.fc2")),
}


@dataclass(frozen=True)
class Dims:
    dim: int
    alpha: float | None
    conv_dim: int
    conv_alpha: float | None


def _matches(preset: Preset, pattern: str, path: str) -> bool:
    if preset.suffix_names:
        return path == pattern or path.endswith("." + pattern)
    return path == pattern or re.match(pattern, path) is not None


def module_paths(root: nn.Module, preset: Preset, classes: tuple[str, ...],
                 names: tuple[str, ...], conv: bool) -> list[tuple[str, nn.Module]]:
    """(path, module) LyCORIS adapts in `root`, in its walk order, without duplicates."""
    found: dict[str, nn.Module] = {}

    def take(path: str, m: nn.Module) -> None:
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and (
                tuple(m.kernel_size) == (1, 1) or conv)):
            found.setdefault(path, m)

    for path, module in root.named_modules():
        if type(module).__name__ in classes and not any(_matches(preset, n, path)
                                                         for n in names):
            for sub, m in module.named_modules():
                take(f"{path}.{sub}" if sub else path, m)
        elif any(_matches(preset, n, path) for n in names):
            take(path, module)
    return list(found.items())


def preset_targets(preset_name: str, unet, text_encoders: list, te_prefixes: tuple[str, ...],
                   family: str, dims: Dims, spec: AdapterSpec, *, train_unet: bool,
                   train_text_encoder: bool) -> list[Target]:
    """The targets LyCORIS's kohya network would create with this preset."""
    preset = PRESETS[preset_name]
    conv = preset.enable_conv and dims.conv_dim > 0
    config = dict(unet.config)

    def target(name: str, path: str, m: nn.Module) -> Target:
        k3 = isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)
        rank, alpha = (dims.conv_dim, dims.conv_alpha) if k3 else (dims.dim, dims.alpha)
        own = None
        if any(path == n or path.endswith("." + n) for n in preset.on_input_names):
            own = replace(spec, on_input=True)
        return Target(name, m, rank, alpha, own)

    out: list[Target] = []
    if train_unet:
        for path, m in module_paths(unet, preset, preset.unet_modules, preset.unet_names,
                                    conv):
            out.append(target(formats.unet_module_to_kohya(path, family, config), path, m))
    if train_text_encoder:
        for te, prefix in zip(text_encoders, te_prefixes):
            for path, m in module_paths(te, preset, preset.te_modules, preset.te_names,
                                        conv):
                out.append(target(formats.te_module_path_to_kohya(path, prefix), path, m))
    if not out:
        raise ValueError(f"network_args preset={preset_name}: no modules to adapt in the "
                         "components this run trains")
    return out
