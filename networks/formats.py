"""Name mappings between live module paths and LoRA file keys (rules: LORA_FORMAT.md).

Pure functions, no model needed: the UNet topology is derived from its diffusers config.

- UNet keys: SD1.5 files use diffusers module names (`lora_unet_down_blocks_1_attentions_0_...`),
  SDXL files the original LDM/SGM names (`lora_unet_input_blocks_4_1_...`): the only combination
  that loads fully in A1111, ComfyUI, diffusers and kohya's scripts.
- Text-encoder keys are always `<prefix>_text_model_encoder_layers_<i>_<proj>`, whatever naming
  the installed transformers gives the live modules.
- kohya <-> diffusers/peft layout (`pytorch_lora_weights.safetensors`).
- kohya's per-block index (block_dims / block_alphas / block lr weights).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

FAMILIES = ("sd15", "sdxl")
TE_PREFIXES = ("lora_te", "lora_te1", "lora_te2")
TE_PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
)  # fmt: skip
UNET_PREFIX = "lora_unet_"

# diffusers ResnetBlock2D child -> LDM ResBlock child. LDM keeps norm, activation and conv in
# Sequentials: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv].
_RESNET_TO_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}  # fmt: skip
_LDM_TO_RESNET = {v.replace(".", "_"): k for k, v in _RESNET_TO_LDM.items()}
# Modules outside the down/mid/up blocks.
_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}  # fmt: skip
# Children of a Transformer2DModel that may start the rest of a path.
_ATTN_HEADS = ("norm", "proj_in", "proj_out", "transformer_blocks")
# Names inside attentions that contain an underscore: needed to put the dots back when reading
# `transformer_blocks_0_attn1_to_out_0`.
_MULTI_WORD = {"transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out"}
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has attentions
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
# UNet2DConditionModel's defaults for the fields that decide the module tree.
_CONFIG_DEFAULTS = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
}


class _Unit(NamedTuple):
    """One resnet, attention, sampler or top-level module of the UNet."""

    path: str  # diffusers path, e.g. "down_blocks.1.attentions.0"
    ldm: str  # LDM path, e.g. "input_blocks.4.1"
    kind: str  # "resnet", "attention", "downsampler", "upsampler" or "top"
    depth: int  # transformer blocks (attentions only)
    block_sd15: int  # kohya block index, SD1.5 numbering (-1: none)
    block_sdxl: int  # kohya block index, SDXL numbering


class _Table(NamedTuple):
    by_path: dict[str, _Unit]
    by_ldm: dict[str, _Unit]  # keyed by the LDM path with '.' -> '_'
    by_diffusers: dict[str, _Unit]  # keyed by the diffusers path with '.' -> '_'
    num_blocks: tuple[int, int]  # (sd15, sdxl) lengths of kohya's per-block lists


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} (expected one of {FAMILIES})")


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _table(cfg: Mapping) -> _Table:
    if not isinstance(cfg, Mapping):
        raise TypeError(f"unet_config must be a mapping (unet.config), got {type(cfg).__name__}")
    return _build_table(tuple(_freeze(cfg.get(k, d)) for k, d in _CONFIG_DEFAULTS.items()))


def _per_block(value, n: int, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"unet config: {name} has {len(value)} entries, expected {n}")
    return list(value)


def _depths(per_block: list, layers: list[int]) -> list[tuple[int, ...]]:
    """Per-block transformer depth (int, or a list per layer) -> a depth per attention."""
    return [tuple(v) if isinstance(v, tuple) else (int(v),) * n for v, n in zip(per_block, layers)]


@functools.lru_cache(maxsize=64)
def _build_table(frozen: tuple) -> _Table:
    down_types, up_types, mid_type, lpb, tlpb, rev_tlpb = frozen
    n = len(down_types)
    bad = [t for t in down_types if t not in _DOWN_TYPES] + [t for t in up_types if t not in _UP_TYPES]
    if bad or mid_type not in _MID_TYPES or len(up_types) != n:
        raise ValueError(
            f"unet config: unsupported block layout (down {down_types}, up {up_types}, mid {mid_type}); "
            f"supported: {sorted(_DOWN_TYPES)}, {sorted(_UP_TYPES)}, {_MID_TYPES[0]}"
        )
    down_layers = [int(x) for x in _per_block(lpb, n, "layers_per_block")]
    # diffusers builds up block i from the reversed per-block settings with one extra resnet
    # (it takes the skip connection of the down block's sampler too).
    up_layers = [x + 1 for x in reversed(down_layers)]
    tl = _per_block(tlpb, n, "transformer_layers_per_block")
    down_depth = _depths(tl, down_layers)
    rev = list(reversed(tl)) if rev_tlpb is None else _per_block(rev_tlpb, n, "reverse_transformer_layers_per_block")
    up_depth = _depths(rev, up_layers)
    mid_depth = tl[-1][0] if isinstance(tl[-1], tuple) else int(tl[-1])

    # LDM numbering: input_blocks.0 is conv_in; each down block then takes layers_per_block
    # slots plus one for its downsampler (a stride of 3 in real SD/SDXL, not hardcoded here).
    # Output blocks: one slot per up-block resnet; the upsampler sits in the block's last slot
    # after the resnet (and the attention, when there is one).
    # kohya block indices: SD1.5 = [IN00..IN(n_in-1), MID, OUT00..]; SDXL = [BASE, IN.., MID0..2,
    # OUT.., OUT] (sd-scripts networks/lora.py get_block_index).
    n_in = 1 + sum(down_layers) + (n - 1)
    n_out = sum(up_layers)
    units: list[_Unit] = []

    def add(path, ldm, kind, depth, sd15, sdxl):
        units.append(_Unit(path, ldm, kind, depth, sd15, sdxl))

    idx = 1
    for i in range(n):
        for j in range(down_layers[i]):
            add(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", "resnet", 0, idx, 1 + idx)
            if _DOWN_TYPES[down_types[i]]:
                depth = down_depth[i][j]
                add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", "attention", depth, idx, 1 + idx)
            idx += 1
        if i < n - 1:
            add(f"down_blocks.{i}.downsamplers.0", f"input_blocks.{idx}.0", "downsampler", 0, idx, 1 + idx)
            idx += 1
    if mid_type is not None:
        for path, sub in (("resnets.0", 0), ("attentions.0", 1), ("resnets.1", 2)):
            kind = "attention" if sub == 1 else "resnet"
            add(f"mid_block.{path}", f"middle_block.{sub}", kind, mid_depth, n_in, 1 + n_in + sub)
    odx = 0
    for i in range(n):
        has_attn = _UP_TYPES[up_types[i]]
        for j in range(up_layers[i]):
            sd15, sdxl = n_in + 1 + odx, n_in + 4 + odx
            add(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{odx}.0", "resnet", 0, sd15, sdxl)
            if has_attn:
                add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{odx}.1", "attention", up_depth[i][j], sd15, sdxl)
            if i < n - 1 and j == up_layers[i] - 1:
                sub = 2 if has_attn else 1
                add(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{odx}.{sub}", "upsampler", 0, sd15, sdxl)
            odx += 1
    last = n_in + 4 + n_out
    for path, ldm in _TOP_TO_LDM.items():
        sdxl = 1 if path == "conv_in" else (last if path.startswith("conv") else 0)
        add(path, ldm, "top", 0, -1, sdxl)
    return _Table(
        by_path={u.path: u for u in units},
        by_ldm={u.ldm.replace(".", "_"): u for u in units},
        by_diffusers={u.path.replace(".", "_"): u for u in units},
        num_blocks=(n_in + 1 + n_out, last + 1),
    )


def _underscore_to_dotted(rest: str) -> str:
    """`transformer_blocks_0_attn1_to_out_0` -> `transformer_blocks.0.attn1.to_out.0`."""
    tokens, parts, i = rest.split("_"), [], 0
    while i < len(tokens):
        pair = "_".join(tokens[i : i + 2])
        take = 2 if i + 1 < len(tokens) and pair in _MULTI_WORD else 1
        parts.append("_".join(tokens[i : i + take]))
        i += take
    return ".".join(parts)


_RE_UNIT = re.compile(
    r"^((?:down|up)_blocks\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+"
    r"|mid_block\.(?:resnets|attentions)\.\d+)(?:\.(.+))?$"
)


def _locate(path: str, table: _Table) -> tuple[_Unit, str | None]:
    """The unit holding a diffusers path and the rest of the path below it (checked)."""
    unit = table.by_path.get(path)
    rest = None
    if unit is None:
        m = _RE_UNIT.match(path)
        unit, rest = (table.by_path.get(m.group(1)), m.group(2)) if m else (None, None)
    if unit is None:
        raise ValueError(f"cannot map UNet module {path!r}: not a module of a UNet2DConditionModel with this config")
    if rest is None:
        return unit, rest
    ok = {
        "resnet": rest in _RESNET_TO_LDM,
        "downsampler": rest == "conv",
        "upsampler": rest == "conv",
        "top": False,
    }.get(unit.kind)
    if unit.kind == "attention":
        parts = rest.split(".")
        ok = parts[0] in _ATTN_HEADS and (
            parts[0] != "transformer_blocks" or len(parts) == 1 or (parts[1].isdigit() and int(parts[1]) < unit.depth)
        )
        # the file key loses the dots: the name must read back the same way
        ok = ok and _underscore_to_dotted(rest.replace(".", "_")) == rest
    if not ok:
        raise ValueError(f"cannot map UNet module {path!r}: no {rest!r} in {unit.path} ({unit.kind})")
    return unit, rest


def _ldm_rest(unit: _Unit, rest: str) -> str:
    if unit.kind == "resnet":
        return _RESNET_TO_LDM[rest]
    return "op" if unit.kind == "downsampler" else rest


def unet_module_to_kohya(module_path: str, family: str, unet_config: Mapping) -> str:
    """kohya key stem (no `.lora_down.weight`) of a diffusers UNet module path.

    sd15: `lora_unet_` + the diffusers path with '.' -> '_'.
    sdxl: `lora_unet_` + the LDM name with '.' -> '_', e.g.
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`.
    Raises ValueError naming the path when the config has no such module.
    """
    _check_family(family)
    unit, rest = _locate(module_path, _table(unet_config))
    if family == "sd15":
        name = module_path
    else:
        name = unit.ldm if rest is None else f"{unit.ldm}.{_ldm_rest(unit, rest)}"
    return UNET_PREFIX + name.replace(".", "_")


_RE_KEY_SD15 = re.compile(
    r"^((?:down|up)_blocks_\d+_(?:resnets|attentions|downsamplers|upsamplers)_\d+"
    r"|mid_block_(?:resnets|attentions)_\d+)(?:_(.+))?$"
)
_RE_KEY_LDM = re.compile(r"^((?:input|output)_blocks_\d+_\d+|middle_block_\d+)(?:_(.+))?$")


def kohya_to_unet_module(key_stem: str, family: str, unet_config: Mapping) -> str:
    """Inverse of `unet_module_to_kohya`: kohya key stem -> diffusers UNet module path.

    Accepts the stem with or without a `.lora_down.weight`-style suffix. The result is checked
    by mapping it forward again, so it is exact or a ValueError.
    """
    _check_family(family)
    stem = key_stem.split(".", 1)[0]
    if not stem.startswith(UNET_PREFIX):
        raise ValueError(f"not a UNet LoRA key: {key_stem!r} (expected prefix {UNET_PREFIX!r})")
    table, name = _table(unet_config), stem[len(UNET_PREFIX) :]
    units = table.by_diffusers if family == "sd15" else table.by_ldm
    unit, rest = units.get(name), None
    if unit is None:
        m = (_RE_KEY_SD15 if family == "sd15" else _RE_KEY_LDM).match(name)
        unit, rest = (units.get(m.group(1)), m.group(2)) if m else (None, None)
    path = None
    if unit is not None:
        if rest is None:
            path = unit.path
        elif unit.kind == "attention":
            path = f"{unit.path}.{_underscore_to_dotted(rest)}"
        elif unit.kind == "resnet":
            path = f"{unit.path}.{rest if family == 'sd15' else _LDM_TO_RESNET.get(rest, '?')}"
        elif unit.kind in ("downsampler", "upsampler"):
            path = f"{unit.path}.conv"
    if path is not None:
        try:
            if unet_module_to_kohya(path, family, unet_config) == stem:
                return path
        except ValueError:
            pass
    raise ValueError(f"cannot map {family} LoRA key {key_stem!r} to a module of this UNet config")


_RE_TE_PATH = re.compile(
    r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])$"
)
_RE_TE_KEY = re.compile(
    r"^(lora_te[12]?)_(?:text_model_)?encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$"
)


def te_module_to_kohya(layer_index: int, proj: str, prefix: str) -> str:
    """`(3, "self_attn.q_proj", "lora_te1")` -> `lora_te1_text_model_encoder_layers_3_self_attn_q_proj`."""
    if prefix not in TE_PREFIXES:
        raise ValueError(f"unknown text-encoder prefix {prefix!r} (expected one of {TE_PREFIXES})")
    if proj not in TE_PROJECTIONS:
        raise ValueError(f"unknown text-encoder projection {proj!r} (expected one of {TE_PROJECTIONS})")
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
        raise ValueError(f"text-encoder layer index must be an int >= 0, got {layer_index!r}")
    return f"{prefix}_text_model_encoder_layers_{layer_index}_{proj.replace('.', '_')}"


def te_module_path_to_kohya(module_path: str, prefix: str) -> str:
    """Live CLIP module path -> kohya key stem, always in the `text_model_encoder_...` form.

    Under transformers 5, `CLIPTextModel.named_modules()` yields `encoder.layers.3.self_attn.q_proj`
    (no `text_model` submodule) while `CLIPTextModelWithProjection` still yields
    `text_model.encoder.layers.3...`; both give `<prefix>_text_model_encoder_layers_3_self_attn_q_proj`.
    """
    m = _RE_TE_PATH.match(module_path)
    if not m:
        raise ValueError(f"cannot map text-encoder module {module_path!r}: not a CLIP encoder-layer projection")
    return te_module_to_kohya(int(m.group(1)), m.group(2), prefix)


def kohya_to_te_module(key_stem: str) -> tuple[str, int, str]:
    """`lora_te1_text_model_encoder_layers_3_self_attn_q_proj` -> ("lora_te1", 3, "self_attn.q_proj").

    Also reads the `<prefix>_encoder_layers_...` form (files written from live transformers-5 names).
    """
    stem = key_stem.split(".", 1)[0]
    m = _RE_TE_KEY.match(stem)
    if not m:
        raise ValueError(f"cannot map text-encoder LoRA key {key_stem!r}")
    proj = m.group(3).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return m.group(1), int(m.group(2)), proj


_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _te_component(prefix: str, family: str) -> str:
    allowed = {"sd15": {"lora_te": "text_encoder"}, "sdxl": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}}
    if prefix not in allowed[family]:
        raise ValueError(f"{prefix}_ keys are not valid for {family} (expected {sorted(allowed[family])})")
    return allowed[family][prefix]


def _group(sd: Mapping[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for suffix in suffixes:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            raise ValueError(f"unexpected LoRA key {key!r} (expected one of the suffixes {suffixes})")
    return groups


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return t
    return (t.float() * scale).to(t.dtype)


def kohya_to_peft(
    sd: Mapping[str, torch.Tensor], family: str, unet_config: Mapping
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya state dict -> (diffusers/peft state dict, alpha per module).

    Keys become `unet.<diffusers module path>.lora_A.weight` / `.lora_B.weight`,
    `text_encoder.text_model.encoder.layers.<i>.<proj>...` and `text_encoder_2....` (diffusers
    strips `text_model.` itself when the live CLIPTextModel has none). lora_A = lora_down,
    lora_B = lora_up; tensor shapes are the same in both layouts (Linear and Conv2d).

    The peft layout has no alpha tensor and diffusers loads it with alpha = rank (scale 1), so
    the scale alpha/rank is baked into lora_B: the effective delta alpha/rank · up @ down is
    unchanged. When alpha == rank (or alpha is missing) the tensors are passed through
    untouched. The returned dict maps each peft module name (with its `unet.`/`text_encoder.`
    prefix) to the file's alpha, for callers that want to restore it (see `peft_to_kohya`).
    """
    _check_family(family)
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for stem, parts in _group(sd, _KOHYA_SUFFIXES).items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise ValueError(f"LoRA module {stem!r} needs both lora_down and lora_up weights")
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(parts[".alpha"].item()) if ".alpha" in parts else float(rank)
        if not alpha > 0:  # kohya reads 0 as "alpha = rank", A1111/ComfyUI/diffusers as scale 0
            raise ValueError(f"LoRA module {stem!r} has alpha {alpha}: ambiguous, expected > 0")
        if stem.startswith(UNET_PREFIX):
            module = "unet." + kohya_to_unet_module(stem, family, unet_config)
        elif stem.startswith("lora_te"):
            prefix, layer, proj = kohya_to_te_module(stem)
            module = f"{_te_component(prefix, family)}.text_model.encoder.layers.{layer}.{proj}"
        else:
            raise ValueError(f"unexpected LoRA key prefix in {stem!r} (expected lora_unet_ or lora_te*)")
        out[f"{module}.lora_A.weight"] = down
        out[f"{module}.lora_B.weight"] = _scaled(up, alpha / rank)
        alphas[module] = alpha
    return out, alphas


def peft_to_kohya(
    sd: Mapping[str, torch.Tensor],
    family: str,
    unet_config: Mapping,
    alpha: float | Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """diffusers/peft state dict -> kohya state dict (inverse of `kohya_to_peft`).

    alpha None: alpha = rank for every module and the weights are kept as they are (the peft
    delta B @ A is exactly the kohya delta). alpha given (one float, or a mapping from peft
    module name to alpha as returned by `kohya_to_peft`): lora_up = lora_B · rank / alpha, so
    the effective delta is unchanged. Alpha tensors are 0-d, in lora_down's dtype.
    """
    _check_family(family)
    out: dict[str, torch.Tensor] = {}
    for module, parts in _group(sd, _PEFT_SUFFIXES).items():
        if len(parts) != 2:
            raise ValueError(f"LoRA module {module!r} needs both lora_A and lora_B weights")
        down, up = parts[".lora_A.weight"], parts[".lora_B.weight"]
        rank = down.shape[0]
        component, _, path = module.partition(".")
        if component == "unet":
            stem = unet_module_to_kohya(path, family, unet_config)
        elif component in ("text_encoder", "text_encoder_2"):
            prefix = {"text_encoder": "lora_te" if family == "sd15" else "lora_te1", "text_encoder_2": "lora_te2"}
            if family == "sd15" and component == "text_encoder_2":
                raise ValueError(f"sd15 has no second text encoder: {module!r}")
            stem = te_module_path_to_kohya(path, prefix[component])
        else:
            raise ValueError(f"unexpected peft key {module!r} (expected unet., text_encoder. or text_encoder_2.)")
        a = alpha.get(module) if isinstance(alpha, Mapping) else alpha
        if a is None:
            a, new_up = float(rank), up
        else:
            a = float(a)
            if not a > 0:
                raise ValueError(f"alpha must be > 0, got {a} for {module!r}")
            new_up = _scaled(up, rank / a)
        dtype = down.dtype if down.dtype.is_floating_point else torch.float32
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = new_up
        out[f"{stem}.alpha"] = torch.tensor(a, dtype=dtype)
    return out


def lora_block_count(family: str, unet_config: Mapping) -> int:
    """Length of kohya's per-block lists (block_dims, ...): 25 for SD1.5, 23 for SDXL."""
    _check_family(family)
    return _table(unet_config).num_blocks[FAMILIES.index(family)]


def lora_block_index(module_path: str, family: str, unet_config: Mapping) -> int:
    """kohya's block index of a UNet module (diffusers path, or a `lora_unet_` key stem).

    Follows sd-scripts `networks/lora.py:get_block_index` (derived from the config, so other
    layers_per_block values shift the indices the same way):
    - sd15, 25 blocks IN00..IN11, MID, OUT00..OUT11: down-block modules get their LDM
      input_blocks number (1..11; IN00 = conv_in, which kohya never targets, so 0 is unused),
      the mid block 12, up-block modules 13 + their LDM output_blocks number. Modules outside
      the blocks (conv_in, time embedding, conv_out) give -1, as kohya's regex does.
    - sdxl, 23 blocks: 0 = BASE (time_embed, label_emb), 1 + input_blocks number (conv_in is 1),
      10..12 = middle_block.0/1/2, 13 + output_blocks number, 22 = OUT (conv_norm_out, conv_out).
    Text-encoder keys and paths that are not UNet modules give -1.
    """
    _check_family(family)
    if module_path.startswith("lora_"):
        try:
            module_path = kohya_to_unet_module(module_path, family, unet_config)
        except ValueError:
            return -1
    try:
        unit, _ = _locate(module_path, _table(unet_config))
    except ValueError:
        return -1
    return unit.block_sd15 if family == "sd15" else unit.block_sdxl
