"""The rules of ../shared/LORA_FORMAT.md as pure functions over a kohya state dict.

- `uniform_alphas` makes the file obey "one alpha per part for Linear/1x1 modules" by baking
  each module's own scale into lora_up (the writer calls it on every save).
- `rule_problems` lists what in a file breaks the rules (tools/check_lora.py, tests).

Why the alpha rule exists: diffusers turns a kohya file into one peft config per component,
with the most common alpha as `lora_alpha`; modules whose alpha differs are meant to go
through `alpha_pattern`, which silently misses attention projections, so they get the wrong
scale. Baking `alpha_m / alpha_u` into lora_up and writing alpha_u gives every loader the same
delta: (alpha_u / r) * (up * alpha_m / alpha_u) @ down = (alpha_m / r) * up @ down.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Mapping

import torch

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
TE_PROJECTIONS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                  "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
_TE_LAYER = re.compile(r"^(lora_te[12]?)_(?:text_model_)?encoder_layers_(\d+)_(.+)$")
# UNet module names (kohya stems, either naming) that are convolutions in SD1.5/SDXL UNets.
_CONV_NAMES = re.compile(r"_(conv1|conv2|conv_shortcut|in_layers_2|out_layers_3|skip_connection"
                         r"|op|conv)$")
_PROJ = re.compile(r"_proj_(in|out)$")


def part_of(stem: str) -> str:
    """'lora_unet', 'lora_te', 'lora_te1' or 'lora_te2' (the prefix without '_')."""
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix):
            return prefix[:-1]
    return ""


def modules(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """stem -> {"down", "up", "alpha"} (whatever of them is present); other keys are left out."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for suffix in SUFFIXES:
            if key.endswith(suffix):
                name = suffix.split(".")[1] if suffix != ".alpha" else "alpha"
                name = {"lora_down": "down", "lora_up": "up"}.get(name, name)
                out.setdefault(key[: -len(suffix)], {})[name] = value
                break
    return out


def is_linear_like(down: torch.Tensor) -> bool:
    """Linear or 1x1 conv (one alpha per part) vs. a 3x3 conv (may have its own)."""
    return down.dim() == 2 or (down.dim() == 4 and tuple(down.shape[2:]) == (1, 1))


def uniform_alphas(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with one alpha per (part, Linear/1x1 vs 3x3), same deltas.

    The alpha written is the most common one of the group (ties: the first module's), so a
    network with uniform alphas is returned unchanged (same tensors). lora_up of the other
    modules is multiplied by alpha_m / alpha_u in fp32 and cast back to its dtype.
    """
    mods = modules(sd)
    groups: dict[tuple[str, bool], list[str]] = {}
    for stem, t in mods.items():
        if "down" in t and "alpha" in t:
            groups.setdefault((part_of(stem), is_linear_like(t["down"])), []).append(stem)
    out = dict(sd)
    for stems in groups.values():
        alphas = {s: float(mods[s]["alpha"].float()) for s in stems}
        if len(set(alphas.values())) <= 1:
            continue
        uniform = Counter(alphas[s] for s in stems).most_common(1)[0][0]
        for s in stems:
            if alphas[s] == uniform:
                continue
            up, alpha = mods[s]["up"], mods[s]["alpha"]
            out[f"{s}.lora_up.weight"] = (up.float() * (alphas[s] / uniform)).to(up.dtype)
            out[f"{s}.alpha"] = torch.tensor(uniform, dtype=alpha.dtype)
    return out


# Every tensor a LyCORIS file of the algorithms we read may hold (networks/adapters/).
LYCORIS_SUFFIXES = (".lora_mid.weight", ".dora_scale", ".hada_w1_a", ".hada_w1_b",
                    ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1",
                    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b",
                    ".lokr_t1", ".lokr_t2", ".diff", ".diff_b", ".weight", ".on_input")


def is_lycoris(sd: Mapping[str, torch.Tensor]) -> bool:
    """A LyCORIS file: some module is not plain LoRA (LoHa, LoKr, full, (IA)3, DoRA, Tucker)."""
    # (IA)3's `.weight` is told by its `.on_input`; a bare `.weight` is any layout's
    marks = tuple(x for x in LYCORIS_SUFFIXES if x != ".weight")
    return any(k.endswith(marks) for k in sd)


def _is_conv_target(stem: str, use_linear_projection: bool) -> bool:
    if not stem.startswith("lora_unet_"):
        return False
    return bool(_CONV_NAMES.search(stem)) or (not use_linear_projection
                                              and bool(_PROJ.search(stem)))


def rule_problems(sd: Mapping[str, torch.Tensor], family: str,
                  use_linear_projection: bool | None = None) -> list[str]:
    """Every way the state dict breaks LORA_FORMAT.md, one line each (empty: a good file).

    `use_linear_projection` (from the UNet config) says whether proj_in/proj_out are Linear;
    by default SD1.5's are 1x1 convs and SDXL's Linear.
    """
    if use_linear_projection is None:
        use_linear_projection = family == "sdxl"
    problems = []
    lycoris = is_lycoris(sd)
    allowed = SUFFIXES + LYCORIS_SUFFIXES if lycoris else SUFFIXES
    extra = [k for k in sd if not k.endswith(allowed) or not k.startswith(PREFIXES)]
    if extra and lycoris:
        problems.append(f"{len(extra)} tensors that are no LoRA/LyCORIS tensor of a "
                        f"lora_unet_/lora_te module: {sorted(extra)[:5]}")
    elif extra:
        problems.append(f"{len(extra)} extra tensors (only <prefix>_<module>.lora_down.weight, "
                        f".lora_up.weight and .alpha are allowed; one stray key makes diffusers "
                        f"load nothing): {sorted(extra)[:5]}")
    mods = {s: t for s, t in modules(sd).items() if s.startswith(PREFIXES)}
    incomplete = sorted(s for s, t in mods.items() if "down" not in t or "up" not in t)
    if incomplete:
        problems.append(f"{len(incomplete)} modules lack lora_down or lora_up: {incomplete[:5]}")
    bad_alpha = sorted(s for s, t in mods.items() if "alpha" in t and
                       (t["alpha"].dim() != 0 or not float(t["alpha"].float()) > 0))
    if bad_alpha:
        problems.append(f"{len(bad_alpha)} alphas are not a 0-d tensor > 0: {bad_alpha[:5]}")
    wrong_te = ("lora_te_",) if family == "sdxl" else ("lora_te1_", "lora_te2_")
    te_bad = sorted(s for s in mods if s.startswith(wrong_te))
    if te_bad:
        problems.append(f"{len(te_bad)} modules use {'/'.join(wrong_te)} on {family} (SDXL "
                        f"needs lora_te1_/lora_te2_, SD1.5 lora_te_): {te_bad[:3]}")
    wrong_unet = ("input_blocks", "middle_block", "output_blocks") if family == "sd15" else \
        ("down_blocks", "mid_block", "up_blocks")
    names_bad = sorted(s for s in mods if s.startswith(tuple(f"lora_unet_{w}" for w in wrong_unet)))
    if names_bad:
        problems.append(f"{len(names_bad)} UNet modules use "
                        f"{'LDM' if family == 'sd15' else 'diffusers'} names on {family} "
                        f"(SD1.5 files need diffusers names, SDXL files LDM names): "
                        f"{names_bad[:3]}")
    if lycoris:
        # The rest are diffusers' rules for plain LoRA files; diffusers does not load
        # LyCORIS files at all (A1111, Forge and ComfyUI do, per module), and LyCORIS's
        # presets adapt partial text-encoder layers by design.
        return problems
    layers: dict[tuple[str, int], set[str]] = {}
    for s in mods:
        m = _TE_LAYER.match(s)
        if m:
            layers.setdefault((m.group(1), int(m.group(2))), set()).add(m.group(3))
    partial = sorted(f"{p} layer {i} lacks {sorted(set(TE_PROJECTIONS) - have)}"
                     for (p, i), have in layers.items() if set(TE_PROJECTIONS) - have)
    if partial:
        problems.append(f"{len(partial)} partial text-encoder layers (a trained layer needs all "
                        f"six projections, or diffusers drops q/k/v): {partial[:3]}")
    flat = sorted(s for s, t in mods.items() if "down" in t and t["down"].dim() == 2
                  and _is_conv_target(s, use_linear_projection))
    if flat:
        problems.append(f"{len(flat)} conv targets have 2-D tensors (need [r, in, kh, kw] / "
                        f"[out, r, 1, 1]): {flat[:3]}")
    per_part: dict[str, set[float]] = {}
    for s, t in mods.items():
        if "down" in t and "alpha" in t and is_linear_like(t["down"]):
            per_part.setdefault(part_of(s), set()).add(float(t["alpha"].float()))
    for part, alphas in sorted(per_part.items()):
        if len(alphas) > 1:
            problems.append(f"{part}: {len(alphas)} different alphas among Linear/1x1 modules "
                            f"({sorted(alphas)[:5]}); diffusers applies one of them to all "
                            "attention projections (bake the scale into lora_up)")
    return problems
