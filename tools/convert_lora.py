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

from networks import formats, layouts  # noqa: E402
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


def convert(src: Path, dst: Path, to: str, *, model: str | None = None,
            family: str | None = None, unet_config: str | None = None,
            alpha: float | None = None, precision: str = "keep",
            overwrite: bool = False) -> Path:
    """Convert one file; returns the written path. ValueError on bad input."""
    if not src.is_file():
        raise ValueError(f"{src}: not found")
    sd, metadata = read_lora(src)
    try:
        layout = detect_layout(sd)
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
    p.add_argument("--to", required=True, choices=("diffusers", "kohya"))
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
                      overwrite=a.overwrite)
    except ValueError as e:
        print(f"convert_lora: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
