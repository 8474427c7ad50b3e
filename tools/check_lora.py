#!/usr/bin/env python
"""Inspect a LoRA file: every module's rank, alpha, scale and weight norm, a summary per part,
modules that never trained, and the rules of the kohya file format it breaks.

    python tools/check_lora.py my_lora.safetensors [--summary] [--family sdxl] [--model DIR]

Per module: part (lora_unet, lora_te, lora_te1, lora_te2), rank, alpha, scale = alpha/rank,
|up@down| (Frobenius norm) and |delta| = scale * |up@down|. A module whose lora_up is all zeros
never trained (LoRA starts with lora_up = 0). Rules (docs/FORMATS.md): no extra tensors, whole
text-encoder layers, lora_te1/lora_te2 on SDXL and lora_te on SD1.5, the right UNet naming,
4-D tensors on conv targets, one alpha for the Linear/1x1 modules of each part.
A diffusers/peft file is read as kohya (alpha = rank) and only listed.
Exit codes: 0 the file follows the rules, 1 it breaks some, 2 it cannot be read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from networks import file_rules, layouts  # noqa: E402
from networks.adapters import algo_of, delta_from_tensors, group_by_module  # noqa: E402
from networks.adapters import spec_from_tensors  # noqa: E402
from networks.from_file import detect_layout, kohya_state_dict_of  # noqa: E402
from networks.kohya_file import read_lora  # noqa: E402


def module_rows(sd: dict) -> list[dict]:
    """One row per module, any algorithm: rank, alpha, scale, the norm of its ΔW (scale
    included; DoRA's renormalisation and (IA)3 need the base model, so they are shown as the
    norm of the low-rank part / of the trained vector)."""
    rows = []
    for stem, t in sorted(group_by_module(sd).items()):
        algo = algo_of(t)
        if algo is None or (algo == "lora" and ("lora_down.weight" not in t or
                                                "lora_up.weight" not in t)):
            continue
        rank, alpha, _ = spec_from_tensors(t)
        alpha = float(alpha) if alpha is not None else float(rank)
        scale = 1.0 if algo in ("full", "ia3") else alpha / rank
        if algo == "lokr" and "lokr_w1" in t and "lokr_w2" in t:
            scale = 1.0
        if algo == "ia3":
            delta = float(t["weight"].float().norm())
        else:
            delta = float(torch.linalg.vector_norm(delta_from_tensors(
                {k: v for k, v in t.items() if k != "dora_scale"}, (-1,))))
        zero = not any(bool(v.float().abs().sum() > 0) for k, v in t.items()
                       if k not in ("alpha", "on_input", "dora_scale"))
        if algo == "lora":  # LoRA starts with lora_up = 0
            zero = not bool(t["lora_up.weight"].float().abs().sum() > 0)
        rows.append({"module": stem, "part": file_rules.part_of(stem) or "?",
                     "algo": algo + ("+dora" if "dora_scale" in t else ""), "rank": rank,
                     "alpha": alpha, "scale": scale,
                     "norm": delta / scale if scale else delta, "delta": delta,
                     "zero_up": zero or delta == 0.0})
    return rows


def summary(rows: list[dict]) -> list[str]:
    lines = []
    parts: dict[str, list[dict]] = {}
    for r in rows:
        parts.setdefault(r["part"], []).append(r)
    for part, rs in parts.items():
        deltas = [r["delta"] for r in rs]
        algos = sorted({r["algo"] for r in rs})
        lines.append(
            f"{part}: {len(rs)} modules"
            + (f" ({', '.join(algos)})" if algos != ["lora"] else "")
            + f", ranks {sorted({r['rank'] for r in rs})}, alphas "
            f"{sorted({r['alpha'] for r in rs})}, |delta| mean {sum(deltas) / len(deltas):.4g} "
            f"max {max(deltas):.4g}, never trained {sum(r['zero_up'] for r in rs)}")
    return lines


def check(path: Path, *, family: str | None = None, model: str | None = None,
          unet_config: str | None = None
          ) -> tuple[list[dict], list[str], list[str], str, str]:
    """(rows, rule problems, warnings, family, layout). ValueError when the file cannot be
    read."""
    if not path.is_file():
        raise ValueError("not found")
    try:
        sd, metadata = read_lora(path)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read as safetensors: {e}") from None
    fam, config = layouts.resolve(sd, metadata, model=model, family=family,
                                  unet_config=unet_config)
    try:
        layout = detect_layout(sd)
    except ValueError:
        layout = "kohya"  # a broken kohya file: list what can be read, and its problems
    problems: list[str] = []
    if layout == "peft":
        sd = kohya_state_dict_of(sd, fam, config)
    else:
        problems = file_rules.rule_problems(sd, fam, config.get("use_linear_projection"))
    rows = module_rows(sd)
    if layout == "kohya" and file_rules.is_lycoris(sd):
        layout = "lycoris"
    warnings = []
    zero = [r["module"] for r in rows if r["zero_up"]]
    if zero:
        what = "lora_up is all zeros" if all(r["algo"] == "lora" for r in rows) else \
            "their delta is zero"
        warnings.append(f"{len(zero)} of {len(rows)} modules never trained ({what}): "
                        f"{zero[:5]}")
    if layout == "peft":
        warnings.append("diffusers/peft layout: listed with alpha = rank; convert it with "
                        "tools/convert_lora.py --to kohya to check the file rules")
    return rows, problems, warnings, fam, layout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--summary", action="store_true", help="only the summary per part")
    p.add_argument("--family", choices=("sd15", "sdxl"))
    p.add_argument("--model", help="diffusers model folder (its UNet config)")
    p.add_argument("--unet_config", help="the UNet's config.json")
    a = p.parse_args(argv)
    try:
        rows, problems, warnings, fam, layout = check(a.file, family=a.family, model=a.model,
                                              unet_config=a.unet_config)
    except ValueError as e:
        print(f"check_lora: {a.file}: {e}", file=sys.stderr)
        return 2
    if not a.summary:
        width = max((len(r["module"]) for r in rows), default=10)
        mixed = any(r["algo"] != "lora" for r in rows)
        print(f"{'module':<{width}}  {'rank':>4}  {'alpha':>8}  {'scale':>8}  "
              f"{'|up@down|':>10}  {'|delta|':>10}" + ("  algo" if mixed else ""))
        for r in rows:
            flag = "  never trained" if r["zero_up"] else ""
            algo = f"  {r['algo']}" if mixed else ""
            print(f"{r['module']:<{width}}  {r['rank']:>4}  {r['alpha']:>8.4g}  "
                  f"{r['scale']:>8.4g}  {r['norm']:>10.4g}  {r['delta']:>10.4g}{algo}{flag}")
        print()
    print(f"{a.file} ({fam}, {len(rows)} modules)")
    for line in summary(rows):
        print(f"  {line}")
    for w in warnings:
        print(f"warning: {w}")
    for prob in problems:
        print(f"RULE BROKEN: {prob}")
    if problems:
        print(f"{len(problems)} rule(s) of the kohya LoRA format broken; see docs/FORMATS.md")
        return 1
    if layout == "lycoris":
        print("ok: a LyCORIS file (A1111, Forge, ComfyUI and LyCORIS load it; diffusers does "
              "not: tools/convert_lora.py --to lora exports a plain LoRA)")
        return 0
    print("ok: follows the kohya LoRA format rules" if layout == "kohya" else
          "format rules not checked (diffusers/peft layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
