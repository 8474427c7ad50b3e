"""Export any adapter file (LoHa, LoKr, DoRA, full, (IA)3, Tucker LoCon ...) to a plain kohya
LoRA of rank N: each module's ΔW is computed from the file's tensors
(`networks.adapters.delta_from_tensors`) and truncated by SVD, ΔW ≈ U_N S_N V_Nᵀ, with
lora_up = U_N √S_N and lora_down = √S_N V_Nᵀ (conv: down [N, in, kh, kw], up [out, N, 1, 1])
and alpha = N (scale 1), so diffusers, peft and every LoRA loader take it. The relative
Frobenius error ‖ΔW − ΔW_N‖ / ‖ΔW‖ is returned per module.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from networks.adapters import algo_of, delta_from_tensors, group_by_module
from networks.file_rules import _is_conv_target, part_of, uniform_alphas

_ONE_BY_ONE = ("_conv_shortcut", "_skip_connection", "_proj_in", "_proj_out")
# 3x3 convs outside the blocks (diffusers / LDM names) that the conv-name rule misses.
_TOP_CONVS = ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_input_blocks_0_0",
              "lora_unet_out_2")


def needs_base(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ΔW depends on the base weights (DoRA, (IA)3)."""
    return any(k.endswith((".dora_scale", ".on_input")) for k in sd)


def svd_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_up, lora_down, relative error) of the best rank-`rank` approximation."""
    out_dim = delta.shape[0]
    flat = delta.reshape(out_dim, -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()
    down = (root[:, None] * vh[:r]).float()
    total = float(flat.norm())
    err = float(s[r:].square().sum().sqrt()) / total if total > 0 else 0.0
    if delta.dim() == 4:
        down = down.reshape(r, *delta.shape[1:])
        up = up.reshape(out_dim, r, 1, 1)
    return up, down, err


def export_lora(sd: Mapping[str, torch.Tensor], rank: int,
                base_weight: Callable[[str], torch.Tensor] | None = None,
                shape_of: Callable[[str, Mapping], tuple] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
    """(kohya LoRA tensors in fp32, relative error per module, notes). `base_weight(stem)`
    gives a module's base weight (needed for DoRA and (IA)3); `shape_of(stem, tensors)` its
    weight shape (else the base weight's, or the shape the tensors imply)."""
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    notes: list[str] = []
    for stem, t in sorted(group_by_module(sd).items()):
        if algo_of(t) is None:
            raise ValueError(f"{stem}: no adapter tensors ({sorted(t)[:4]})")
        base = base_weight(stem) if base_weight is not None else None
        shape = tuple(base.shape) if base is not None else \
            (shape_of(stem, t) if shape_of is not None else implied_shape(t))
        delta = delta_from_tensors(t, shape, base)
        up, down, err = svd_lora(delta, rank)
        out[f"{stem}.lora_down.weight"] = down.contiguous()
        out[f"{stem}.lora_up.weight"] = up.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]))
        errors[stem] = err
        if "diff_b" in t:
            notes.append(f"{stem}: the bias difference (diff_b) has no place in a LoRA and "
                         "is left out")
    return uniform_alphas(out), errors, notes


def stock_shape(stem: str, implied: tuple, use_linear_projection: bool) -> tuple:
    """A conv target's 4-D weight shape from the 2-D one LoHa/LoKr store (in·kh·kw flattened):
    in SD1.5/SDXL UNets the shortcut and projection convs are 1x1, the others 3x3."""
    if len(implied) != 2 or not (_is_conv_target(stem, use_linear_projection)
                                 or stem in _TOP_CONVS):
        return implied
    k = 1 if stem.endswith(_ONE_BY_ONE) else 3
    if implied[1] % (k * k):
        raise ValueError(f"{stem}: width {implied[1]} is not a {k}x{k} conv's")
    return (implied[0], implied[1] // (k * k), k, k)


def implied_shape(t: Mapping[str, torch.Tensor]) -> tuple:
    """The base weight's shape from a module's own tensors (no model at hand)."""
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        if "lora_mid.weight" in t:
            return (up.shape[0], down.shape[1], *t["lora_mid.weight"].shape[2:])
        return (up.shape[0], *down.shape[1:])
    if "diff" in t:
        return tuple(t["diff"].shape)
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1],
                    *t["hada_t1"].shape[2:])
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
    if "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else \
            (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = tuple(t["lokr_w2"].shape)
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    raise ValueError("cannot tell the weight shape without the model; pass --model DIR")


def errors_per_part(errors: Mapping[str, float]) -> dict[str, tuple[int, float, float]]:
    """part -> (modules, mean relative error, max relative error)."""
    parts: dict[str, list[float]] = {}
    for stem, e in errors.items():
        parts.setdefault(part_of(stem) or "?", []).append(e)
    return {p: (len(v), sum(v) / len(v), max(v)) for p, v in sorted(parts.items())}
