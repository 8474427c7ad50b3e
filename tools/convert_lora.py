#!/usr/bin/env python
"""Convert a LoRA between the kohya layout and the diffusers/peft layout, keeping alpha.

    python tools/convert_lora.py my_lora.safetensors out_dir --to diffusers [--family sdxl]
    python tools/convert_lora.py out_dir/pytorch_lora_weights.safetensors back.safetensors \
        --to kohya

kohya -> diffusers: `unet.<module>.lora_A/lora_B` keys; the peft layout has no alpha, so
alpha/rank is baked into lora_B (every loader then computes the same delta; lora_B of such
modules is kept in fp32 so nothing rounds away), and the alphas are kept in the metadata key
`tomlora_alphas` (never `lora_adapter_metadata`, which diffusers would apply on top).
diffusers -> kohya: alphas come from `--alpha` when given, else from `tomlora_alphas`, so a
round trip gives the original file back bit for bit, else alpha = rank. An OUT folder gets
`pytorch_lora_weights.safetensors` (diffusers) or the input's name (kohya).

--to lora --rank N exports any LyCORIS file (LoHa, LoKr, DoRA, full, (IA)3, Tucker LoCon) to a
plain kohya LoRA that diffusers loads: each module's ΔW truncated by SVD to rank N, printing
the relative error per part (networks/export.py). DoRA and (IA)3 need the base weights:
give --model DIR.

The key maps need the UNet's layout: `--model DIR` (a diffusers folder) or `--family` with the
stock SD1.5/SDXL layout, optionally `--unet_config unet/config.json`. Without them the family
is read from the file. Exit codes: 0 done, 2 bad input (message on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from networks import file_rules, formats, layouts  # noqa: E402
from networks.from_file import detect_layout  # noqa: E402
from networks.kohya_file import read_lora, write_lora  # noqa: E402

ALPHAS_KEY = "tomlora_alphas"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _upcast_scaled_ups(sd: dict) -> dict:
    """lora_up of modules with alpha != rank in fp32: baking alpha/rank into an fp16/bf16
    lora_B would round (and underflow near the subnormal range), so the way back could not
    restore the original bits. lora_A keeps the source dtype and tells it on the way back."""
    out = dict(sd)
    for key, up in sd.items():
        if not key.endswith(".lora_up.weight") or up.dtype == torch.float32:
            continue
        stem = key[: -len(".lora_up.weight")]
        alpha = sd.get(f"{stem}.alpha")
        rank = sd[f"{stem}.lora_down.weight"].shape[0] if f"{stem}.lora_down.weight" in sd \
            else None
        if alpha is not None and rank is not None and float(alpha.float()) != rank:
            out[key] = up.float()
    return out


def to_diffusers(sd: dict, metadata: dict, family: str, unet_config: dict
                 ) -> tuple[dict, dict]:
    peft, alphas = formats.kohya_to_peft(_upcast_scaled_ups(sd), family, unet_config)
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    meta[ALPHAS_KEY] = json.dumps(alphas, sort_keys=True)
    return peft, meta


def to_kohya(sd: dict, metadata: dict, family: str, unet_config: dict,
             alpha: float | None = None) -> tuple[dict, dict]:
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != ALPHAS_KEY}
    if metadata.get(ALPHAS_KEY) and alpha is None:
        try:
            alphas = json.loads(metadata[ALPHAS_KEY])
        except json.JSONDecodeError:
            raise ValueError(f"metadata {ALPHAS_KEY} is not JSON") from None
        out = formats.peft_to_kohya(sd, family, unet_config, alpha=alphas)
    else:
        out = formats.peft_to_kohya(sd, family, unet_config, alpha=alpha)
    # lora_up back in lora_down's dtype (see _upcast_scaled_ups)
    return {k: v.to(out[k.replace(".lora_up.", ".lora_down.")].dtype)
            if k.endswith(".lora_up.weight") else v for k, v in out.items()}, meta


def base_weights(model: str, family: str, sd: dict):
    """stem -> base weight, from the diffusers model folder (DoRA and (IA)3 need it)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from networks.from_file import targets_from_state_dict
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    tes = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder")]
    prefixes = ("lora_te",)
    if family == "sdxl":
        tes.append(CLIPTextModelWithProjection.from_pretrained(model,
                                                               subfolder="text_encoder_2"))
        prefixes = ("lora_te1", "lora_te2")
    targets = targets_from_state_dict(sd, unet, tes, prefixes, family)
    weights = {t.name: t.module.weight.detach().float() for t in targets}
    return weights.__getitem__


def to_lora(sd: dict, metadata: dict, family: str, unet_config: dict, rank: int,
            model: str | None) -> tuple[dict, dict]:
    """A LyCORIS file as a plain kohya LoRA of rank `rank` (SVD); prints the error per part."""
    from networks.export import errors_per_part, export_lora, needs_base, stock_shape
    from networks.export import implied_shape
    if needs_base(sd) and not model:
        raise ValueError("DoRA / (IA)3 modules: their ΔW depends on the base weights; give "
                         "--model DIR (the diffusers model the file was trained on)")
    weight = base_weights(model, family, sd) if model else None
    ulp = bool(unet_config.get("use_linear_projection", family == "sdxl"))
    out, errors, notes = export_lora(
        sd, rank, weight, lambda stem, t: stock_shape(stem, implied_shape(t), ulp))
    for part, (n, mean, worst) in errors_per_part(errors).items():
        print(f"{part}: {n} modules, rank {rank}, relative error mean {mean:.4f} "
              f"max {worst:.4f}")
    for note in notes:
        print(f"note: {note}")
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                 "ss_network_alpha": str(rank), "ss_network_args": "{}",
                 "tomlora_exported_from": metadata.get("ss_network_args", "")})
    return out, meta


def convert(src: Path, dst: Path, to: str, *, model: str | None = None,
            family: str | None = None, unet_config: str | None = None,
            alpha: float | None = None, precision: str = "keep",
            overwrite: bool = False, rank: int | None = None) -> Path:
    """Convert one file; returns the written path. ValueError on bad input."""
    if not src.is_file():
        raise ValueError(f"{src}: not found")
    sd, metadata = read_lora(src)
    try:
        layout = detect_layout(sd)
        if to == "lora":
            if layout != "kohya":
                raise ValueError("--to lora exports kohya/LyCORIS files (this is peft)")
            if rank is None:
                raise ValueError("--to lora needs --rank N")
            fam, config = layouts.resolve(sd, metadata, model=model, family=family,
                                          unet_config=unet_config)
            out, meta = to_lora(sd, metadata, fam, config, rank, model)
            return _write(src, dst, out, meta, to, precision, overwrite)
        if file_rules.is_lycoris(sd):
            raise ValueError("a LyCORIS file (LoHa/LoKr/DoRA...): diffusers cannot load it; "
                             "export it with --to lora --rank N")
        want = "kohya" if to == "diffusers" else "peft"
        if layout != want:
            raise ValueError(f"is already in the {layout} layout (--to {to} converts a "
                             f"{want} file)")
        fam, config = layouts.resolve(sd, metadata, model=model, family=family,
                                      unet_config=unet_config)
        if to == "diffusers":
            out, meta = to_diffusers(sd, metadata, fam, config)
        else:
            out, meta = to_kohya(sd, metadata, fam, config, alpha)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    return _write(src, dst, out, meta, to, precision, overwrite)


def _write(src, dst, out, meta, to, precision, overwrite) -> Path:
    if precision != "keep":
        out = {k: v.to(DTYPES[precision]) for k, v in out.items()}
    if dst.is_dir():
        dst = dst / ("pytorch_lora_weights.safetensors" if to == "diffusers" else src.name)
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst} exists; pass --overwrite or choose another output")
    write_lora(dst, {k: v.contiguous() for k, v in out.items()}, meta)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="LoRA .safetensors to convert")
    p.add_argument("dst", type=Path, help="output file, or a folder")
    p.add_argument("--to", required=True, choices=("diffusers", "kohya", "lora"),
                   help="lora: a plain kohya LoRA of rank --rank from any LyCORIS file")
    p.add_argument("--rank", type=int, help="rank of the --to lora export")
    p.add_argument("--model", help="diffusers model folder the LoRA belongs to")
    p.add_argument("--family", choices=("sd15", "sdxl"), help="model family (default: from "
                   "the file)")
    p.add_argument("--unet_config", help="the UNet's config.json (non-standard layouts)")
    p.add_argument("--alpha", type=float, help="alpha for a diffusers file without "
                   f"{ALPHAS_KEY} (default alpha = rank)")
    p.add_argument("--precision", default="keep", choices=("keep", *DTYPES))
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        out = convert(a.src, a.dst, a.to, model=a.model, family=a.family,
                      unet_config=a.unet_config, alpha=a.alpha, precision=a.precision,
                      overwrite=a.overwrite, rank=a.rank)
    except ValueError as e:
        print(f"convert_lora: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
