#!/usr/bin/env python
"""Generate regularization (class) images with the base model, resumably.

    python tools/generate_reg_images.py --model demo/tiny-sd15 --class_prompt "person" \\
        --n 50 --out reg/1_person [--steps 30 --seed 0 --sampler euler_a --batch 4]

Writes `000000.png`, `000001.png`, ... and a `.txt` caption with the class prompt beside each.
Image i always uses seed + i, and indices whose PNG already exists are skipped, so an
interrupted run (or a later run with a larger --n) fills in only what is missing and never
writes duplicates. Point `reg_data_dir` at the folder above `1_person`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.train import samplers  # noqa: E402
from library.train.prompts import DEFAULT_SCALE, DEFAULT_STEPS, PromptSpec, \
    a1111_parameters  # noqa: E402
from tools.generate import checked, load  # noqa: E402


def missing_indices(out: Path, n: int) -> list[int]:
    return [i for i in range(n) if not (out / f"{i:06d}.png").is_file()]


def generate_reg_images(model: str, class_prompt: str, n: int, out: str | Path, *,
                        negative_prompt: str = "", steps: int = DEFAULT_STEPS,
                        scale: float = DEFAULT_SCALE, seed: int = 0, sampler: str = "euler_a",
                        width: int | None = None, height: int | None = None, batch: int = 1,
                        device: str | None = None, dtype: str = "fp32",
                        progress: bool = True) -> list[Path]:
    """Write the missing images 0..n-1 of `out`; returns the PNGs written by this call."""
    from tqdm.auto import tqdm

    from library.train.sampling import render, save_png, to_uint8
    out = Path(out)
    todo = missing_indices(out, n)
    if not todo:
        return []
    sampler = samplers.canonical(sampler)
    c, pipe, base_config, _ = load(model, device=device, dtype=dtype)
    native = c.family.native_resolution
    spec = PromptSpec(class_prompt, negative_prompt, checked("width", width or native),
                      checked("height", height or native), seed, checked("scale", scale),
                      checked("steps", steps), sampler)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    model_name = Path(c.model_path).name
    with tqdm(total=len(todo), desc=f"reg images -> {out}", disable=not progress) as bar:
        for start in range(0, len(todo), max(1, batch)):
            chunk = todo[start:start + max(1, batch)]
            arrays = render(pipe, base_config, spec, [seed + i for i in chunk], c)
            for i, arr in zip(chunk, arrays):
                png = out / f"{i:06d}.png"
                # caption first: a PNG on disk always has its caption
                png.with_suffix(".txt").write_text(class_prompt + "\n", encoding="utf-8")
                text = a1111_parameters(replace(spec, seed=seed + i), model_name)
                written.append(save_png(to_uint8(arr), png, text))
            bar.update(len(chunk))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers model folder (or cached hub id)")
    p.add_argument("--class_prompt", required=True, help='e.g. "person" or "a photo of a dog"')
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--n", type=int, required=True, help="images wanted in the folder")
    p.add_argument("--out", required=True, help="folder, e.g. reg/1_person")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--sampler", default="euler_a",
                   help="one of: " + ", ".join(samplers.SAMPLER_NAMES))
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--device")
    args = p.parse_args(argv)
    from library.models.loading import ModelLoadError
    try:
        written = generate_reg_images(
            args.model, args.class_prompt, args.n, args.out,
            negative_prompt=args.negative_prompt, steps=args.steps, scale=args.scale,
            seed=args.seed, sampler=args.sampler, width=args.width, height=args.height,
            batch=args.batch, device=args.device, dtype=args.dtype)
    except (ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(written)} new image(s) in {args.out} ({args.n} wanted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
