"""A base model (diffusers folder or single-file LDM checkpoint) as weight files and a map
from kohya LoRA stems to the tensors they change, built from tensor names alone.

Nothing is loaded: `open_model(path)` reads headers (library.lora_tools.st_io) and returns a
`BaseModel` whose `slots[stem]` say which file, tensor and rows hold each LoRA target
(SDXL's second text encoder stores q/k/v fused in OpenCLIP's `in_proj_weight`, so its q/k/v
modules are row ranges). Stems use the file naming of LORA_FORMAT.md (SD1.5: diffusers module
names, SDXL: LDM names); `canonical_stem` also accepts the other naming. A single file's UNet
layout is read from its key names (`unet_config_from_ldm`), so fine-tunes and the tiny test
models need no config folder.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from library.lora_tools.st_io import LazyFile
from networks import formats

UNET = "model.diffusion_model."
TE_PREFIX = {"sd15": ("cond_stage_model.transformer.",),
             "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")}
LORA_TE = {"sd15": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}
COMPONENTS = {"sd15": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}
_CLIP = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\."
                   r"(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])\.weight$")
_OPEN_CLIP = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj"
                        r"\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_OPEN_CLIP_NAMES = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                    "mlp.c_proj.weight": "mlp.fc2"}


@dataclass(frozen=True)
class Slot:
    file: Path
    key: str
    rows: tuple[int, int] | None  # a row range of a fused tensor
    shape: tuple[int, ...]  # of the module's weight (the rows only, when fused)
    path: str  # "unet.<diffusers path>" or "text_encoder[_2].<layer>.<proj>"


@dataclass
class BaseModel:
    root: Path
    kind: str  # "diffusers" or "single_file"
    family: str
    unet_config: dict
    files: list[Path]  # every weight file, in the order they are rewritten
    slots: dict[str, list[Slot]] = field(default_factory=dict)  # one per copy (variants)
    lazy: dict[Path, LazyFile] = field(default_factory=dict)

    def add(self, stem: str, slot: Slot) -> None:
        self.slots.setdefault(stem, []).append(slot)

    def read(self, slot: Slot):
        t = self.lazy[slot.file].read(slot.key)
        return t if slot.rows is None else t[slot.rows[0]:slot.rows[1]]


def canonical_stem(stem: str, model: BaseModel) -> str | None:
    """The model's name for a LoRA stem written in either UNet naming (None: no such module)."""
    if stem in model.slots:
        return stem
    if not stem.startswith(formats.UNET_PREFIX):
        return None
    for naming in ("sd15", "sdxl"):
        try:
            path = formats.kohya_to_unet_module(stem, naming, model.unet_config)
            name = formats.unet_module_to_kohya(path, model.family, model.unet_config)
        except ValueError:
            continue
        if name in model.slots:
            return name
    return None


# ---- single files ---------------------------------------------------------------------------
def unet_config_from_ldm(keys) -> dict:
    """The topology fields of a UNet2DConditionModel config from LDM key names."""
    sub: dict[str, set[str]] = {}  # "input_blocks.4.1" -> {"proj_in.weight", ...}
    for k in keys:
        if k.startswith(UNET):
            parts = k[len(UNET):].split(".")
            if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 3:
                sub.setdefault(".".join(parts[:3]), set()).add(".".join(parts[3:]))
    if not any(k.startswith("input_blocks.") for k in sub):
        raise ValueError("no UNet input_blocks found")

    def depth(unit: str) -> int:
        return len({r.split(".")[1] for r in sub.get(unit, ())
                    if r.startswith("transformer_blocks.")})

    def is_attention(unit: str) -> bool:
        return any(r.startswith(("transformer_blocks.", "proj_in.")) for r in sub.get(unit, ()))

    n_in = 1 + max(int(k.split(".")[1]) for k in sub if k.startswith("input_blocks."))
    samplers = [k for k, rests in sub.items()
                if k.startswith("input_blocks.") and "op.weight" in rests]
    n = len(samplers) + 1
    lpb = (n_in - 1 - (n - 1)) // n
    down, depths = [], []
    for b in range(n):
        first = f"input_blocks.{1 + b * (lpb + 1)}.1"
        attn = is_attention(first)
        down.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(depth(first) if attn else 1)
    up, up_depths = [], []
    for b in range(n):
        first = f"output_blocks.{b * (lpb + 1)}.1"
        attn = is_attention(first)
        up.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
        up_depths.append(depth(first) if attn else 1)
    mid_attn = any(k.startswith(f"{UNET}middle_block.1.transformer_blocks.") for k in keys)
    proj = next((k for k in keys if k.startswith(UNET) and k.endswith(".proj_in.weight")), None)
    config = {
        "down_block_types": down, "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attn else None,
        "layers_per_block": lpb, "transformer_layers_per_block": depths,
        "use_linear_projection": proj is not None and len(keys[proj]) == 2,
    }
    if up_depths != list(reversed(depths)):
        config["reverse_transformer_layers_per_block"] = up_depths
    return config


def _open_single_file(path: Path) -> BaseModel:
    from library.models.checkpoint_file import family_of_checkpoint
    from library.models.errors import ModelLoadError
    lazy = LazyFile(path)
    shapes = {k: e.shape for k, e in lazy.entries.items()}
    try:
        family = family_of_checkpoint(shapes, path)
    except ModelLoadError as e:
        raise ValueError(str(e).replace("pretrained_model_name_or_path: ", "")) from None
    model = BaseModel(path, "single_file", family, unet_config_from_ldm(shapes), [path],
                      lazy={path: lazy})
    add_ldm_slots(model, shapes)
    return model


def add_ldm_slots(model: BaseModel, shapes: dict[str, tuple[int, ...]]) -> None:
    """The slots of an LDM-layout single file from its {key: shape}."""
    path, family, config = model.root, model.family, model.unet_config
    for key, shape in shapes.items():
        if key.startswith(UNET) and key.endswith(".weight") and len(shape) in (2, 4):
            ldm = key[len(UNET):-len(".weight")]
            try:
                dpath = formats.kohya_to_unet_module("lora_unet_" + ldm.replace(".", "_"),
                                                     "sdxl", config)
                stem = formats.unet_module_to_kohya(dpath, family, config)
            except ValueError:
                continue
            model.add(stem, Slot(path, key, None, shape, f"unet.{dpath}"))
    te_prefixes = TE_PREFIX[family]
    for key, shape in shapes.items():
        for i, prefix in enumerate(te_prefixes):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            component = COMPONENTS[family][1 + i]
            m = _CLIP.match(rest)
            if m and not (family == "sdxl" and i == 1):
                stem = formats.te_module_to_kohya(int(m.group(1)), m.group(2), LORA_TE[family][i])
                model.add(stem, Slot(path, key, None, shape, f"{component}.{m.group(1)}."
                                                              f"{m.group(2)}"))
            m = _OPEN_CLIP.match(rest) if family == "sdxl" and i == 1 else None
            if m:
                layer, name = int(m.group(1)), m.group(2)
                if name == "attn.in_proj_weight":
                    d = shape[0] // 3
                    for j, proj in enumerate(("self_attn.q_proj", "self_attn.k_proj",
                                              "self_attn.v_proj")):
                        stem = formats.te_module_to_kohya(layer, proj, "lora_te2")
                        model.add(stem, Slot(path, key, (j * d, (j + 1) * d), (d, shape[1]),
                                             f"{component}.{layer}.{proj}"))
                else:
                    proj = _OPEN_CLIP_NAMES[name]
                    stem = formats.te_module_to_kohya(layer, proj, "lora_te2")
                    model.add(stem, Slot(path, key, None, shape, f"{component}.{layer}.{proj}"))


# ---- diffusers folders ----------------------------------------------------------------------
def component_files(folder: Path) -> list[Path]:
    """The .safetensors weights of one component folder (every variant and shard)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f" (only {pickles[0]}, a pickle: re-save the model with safetensors)"
                if pickles else "")
        raise ValueError(f"{folder}: no .safetensors weights{hint}")
    return files


def _open_folder(root: Path) -> BaseModel:
    from networks.layouts import model_family, model_unet_config
    family = model_family(root)
    config = model_unet_config(root)
    files = []
    for comp in COMPONENTS[family]:
        if not (root / comp).is_dir():
            raise ValueError(f"{root}: no {comp}/ folder (expected a diffusers {family} model)")
        files += component_files(root / comp)
    model = BaseModel(root, "diffusers", family, config, files)
    for f in files:
        lazy = model.lazy[f] = LazyFile(f)
        comp = f.parent.name
        for key, e in lazy.entries.items():
            if comp == "unet":
                if not key.endswith(".weight") or len(e.shape) not in (2, 4):
                    continue
                dpath = key[:-len(".weight")]
                try:
                    stem = formats.unet_module_to_kohya(dpath, family, config)
                except ValueError:
                    continue
                model.add(stem, Slot(f, key, None, e.shape, f"unet.{dpath}"))
            else:
                m = _CLIP.match(key)
                if m:
                    prefix = LORA_TE[family][COMPONENTS[family].index(comp) - 1]
                    stem = formats.te_module_to_kohya(int(m.group(1)), m.group(2), prefix)
                    model.add(stem, Slot(f, key, None, e.shape,
                                         f"{comp}.{m.group(1)}.{m.group(2)}"))
    return model


def open_model(path: str | Path, what: str = "model") -> BaseModel:
    """A diffusers folder or a single .safetensors checkpoint; ValueError naming `what`."""
    p = Path(path)
    try:
        if p.is_dir():
            if not (p / "unet" / "config.json").is_file():
                raise ValueError("is a folder without unet/config.json (expected a diffusers "
                                 "model folder)")
            model = _open_folder(p)
        elif p.is_file():
            if p.suffix.lower() != ".safetensors":
                raise ValueError("only .safetensors checkpoints are read (a pickle can run "
                                 "code; convert it with a tool you trust)")
            model = _open_single_file(p)
        else:
            raise ValueError("not found")
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(p)) else f"{what} {p}: {msg}") from None
    if not model.slots:
        raise ValueError(f"{what} {p}: no UNet or text-encoder weights a LoRA could target")
    return model


def model_index(root: Path) -> dict:
    f = root / "model_index.json"
    return json.loads(f.read_text()) if f.is_file() else {}
