"""Several LoRAs into one: exactly (ranks concatenated) or by SVD to a new rank.

Exact: module by module, the downs are stacked and each up is scaled by ratio * alpha/rank of
its file, so up_cat @ down_cat = sum(ratio_i * delta_i) with alpha = the summed rank (scale 1):
the file applies exactly as the LoRAs did one after another. (sd-scripts' merge_lora.py
without --concat adds the factors themselves, which is not the sum of the deltas.)
SVD (sd-scripts' svd_merge_lora.py): the same sum, truncated to --new_rank (--new_conv_rank for
3x3 convs) through an SVD of the concatenated factors, alpha = rank, and the relative
Frobenius error of every module measured on the tensors written.
"""
from __future__ import annotations

from typing import Mapping

import torch

from library.lora_tools import cli
from library.lora_tools.lora_file import Module, family_of, read_modules
from library.lora_tools.svd import low_rank, low_rank_of_product
from networks import formats, layouts

NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def normal_stem(stem: str, family: str, config: Mapping) -> str:
    """A UNet stem in the family's naming whichever naming the file used (as is if unknown)."""
    if not stem.startswith(formats.UNET_PREFIX):
        return stem
    for naming in (family, "sdxl" if family == "sd15" else "sd15"):
        try:
            return formats.unet_module_to_kohya(
                formats.kohya_to_unet_module(stem, naming, config), family, config)
        except ValueError:
            continue
    return stem


def read_all(loras: list[tuple[str, float]], family: str | None
             ) -> tuple[str, dict[str, list[tuple[Module, float, str]]], list[dict]]:
    """(family, {stem: [(module, ratio, file)]}, metadata of each file); all one family."""
    found: list[tuple[str, dict, dict, float]] = []
    for path, ratio in loras:
        modules, meta = read_modules(path, family=family)
        found.append((path, modules, meta, ratio))
    fams = {p: family_of(m, meta) for p, m, meta, _ in found}
    known = {f for f in fams.values() if f}
    if len(known) > 1:
        a = next(p for p, f in fams.items() if f == "sd15")
        b = next(p for p, f in fams.items() if f == "sdxl")
        raise ValueError(f"{b} is an SDXL LoRA but {a} is an SD1.5 LoRA: they cannot merge")
    fam = family or (known.pop() if known else "sd15")
    if family and known and known != {family}:
        raise ValueError(f"{next(iter(fams))}: an {NAMES[known.pop()]} LoRA, not {NAMES[family]}")
    config = layouts.STANDARD_UNET[fam]
    by_stem: dict[str, list] = {}
    for path, modules, _, ratio in found:
        for stem, m in modules.items():
            by_stem.setdefault(normal_stem(stem, fam, config), []).append((m, ratio, path))
    for stem, items in by_stem.items():
        shapes = {tuple(m.out_shape) if m.is_lora else None for m, _, _ in items} - {None}
        if len(shapes) > 1:
            desc = ", ".join(f"{p} {list(m.out_shape)}" for m, _, p in items if m.is_lora)
            raise ValueError(f"module {stem}: shapes differ ({desc}); LoRAs of different "
                             "base models cannot merge")
    return fam, by_stem, [meta for _, _, meta, _ in found]


def stacked(items: list[tuple[Module, float, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up_cat, down_cat) in fp32 with up_cat @ down_cat = sum(ratio * delta)."""
    ups = [m.up.float() * (ratio * m.scale) for m, ratio, _ in items]
    downs = [m.down.float() for m, _, _ in items]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def exact_delta(items) -> torch.Tensor:
    if all(m.is_lora for m, _, _ in items):
        up, down = stacked(items)
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return sum(ratio * m.delta() for m, ratio, _ in items)


def merge_exact(by_stem: dict, quiet: bool = False) -> dict[str, tuple]:
    """{stem: (up, down, alpha)} of the concatenated LoRA."""
    out = {}
    for stem, items in cli.progress(by_stem.items(), "concat", len(by_stem), quiet):
        odd = [(p, m) for m, _, p in items if not m.is_lora]
        if odd:
            p, m = odd[0]
            raise ValueError(f"{p}: module {stem} is {m.algorithm.name}, which has no LoRA "
                             "factors to concatenate; merge by SVD with --new_rank")
        up, down = stacked(items)
        out[stem] = (up, down, float(down.shape[0]))
    return out


def merge_svd(by_stem: dict, new_rank: int, new_conv_rank: int, *,
              clamp_quantile: float | None, device: str, quiet: bool = False
              ) -> dict[str, tuple]:
    out = {}
    for stem, items in cli.progress(by_stem.items(), "svd merge", len(by_stem), quiet):
        first = next((m for m, _, _ in items if m.is_lora), None)
        conv = first is not None and first.is_conv3x3
        limit = new_conv_rank if conv else new_rank
        if all(m.is_lora for m, _, _ in items):
            up, down = stacked(items)
            f = low_rank_of_product(up, down, limit, clamp_quantile=clamp_quantile,
                                    device=device)
        else:
            delta = exact_delta(items)
            f = low_rank(delta, new_conv_rank if delta.dim() == 4 and delta.shape[2:] != (1, 1)
                         else new_rank, clamp_quantile=clamp_quantile, device=device)
        out[stem] = (f.up, f.down, float(f.rank))
    return out


def _gram(u1, d1, u2, d2) -> float:
    """<u1 @ d1, u2 @ d2> (Frobenius) from r x r products, in float64."""
    return float(((u1.T @ u2) * (d1 @ d2.T)).sum())


def errors(by_stem: dict, written: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Relative Frobenius error of each written module against the exact sum of deltas.
    For LoRA modules it is computed from the factors (||A - B||^2 = ||A||^2 + ||B||^2 -
    2 <A, B>, each an r x r product), never forming the full matrices."""
    from library.lora_tools.svd import relative_error
    out = {}
    for stem, items in by_stem.items():
        down = written[f"{stem}.lora_down.weight"]
        up = written[f"{stem}.lora_up.weight"]
        scale = float(written[f"{stem}.alpha"].float()) / down.shape[0]
        if not all(m.is_lora for m, _, _ in items):
            out[stem] = relative_error(exact_delta(items), up, down, scale)
            continue
        ua, da = (t.double().flatten(1) for t in stacked(items))
        ub, db = up.double().flatten(1) * scale, down.double().flatten(1)
        aa, bb, ab = _gram(ua, da, ua, da), _gram(ub, db, ub, db), _gram(ua, da, ub, db)
        err = max(aa + bb - 2 * ab, 0.0) ** 0.5
        out[stem] = err / aa ** 0.5 if aa > 0 else err
    return out


def base_metadata(metas: list[dict], title: str) -> dict[str, str]:
    """What describes the base model, from the first file that says it; the merged file's
    training details would be the first LoRA's only, so they are left out."""
    keep = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "modelspec.sai_model_spec",
            "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
            "modelspec.prediction_type")
    out: dict[str, str] = {}
    for meta in metas:
        for k in keep:
            if k in meta and k not in out:
                out[k] = meta[k]
    if "modelspec.sai_model_spec" in out:
        out["modelspec.title"] = title
    return out
