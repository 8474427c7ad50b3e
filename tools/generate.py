#!/usr/bin/env python
"""Generate images with a base model and any number of LoRAs (kohya or diffusers layout).

    python tools/generate.py --model demo/tiny-sd15 \\
        --lora demo/output/zorblat.safetensors:0.8 --lora other.safetensors:0.5 \\
        --prompt "zorblat, a purple star" --n 4 --seed 1 --out generated/

Each LoRA is applied as our own LoRA modules attached to the loaded model (the same math the
trainer uses, fp32 LoRA weights), with its multiplier; the base weights are never changed.
PNGs carry the generation parameters in the A1111 `parameters` text chunk. `--prompt_file`
takes a sample-prompt file (.txt/.toml/.json, docs/SAMPLING.md) instead of `--prompt`.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from library.train import samplers  # noqa: E402
from library.train.prompts import DEFAULT_SCALE, DEFAULT_STEPS, PromptSpec, \
    a1111_parameters, convert, load_prompts  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Generated:
    spec: PromptSpec          # seed = this image's seed
    array: np.ndarray         # float32 HWC in [0, 1], before quantisation to 8 bits
    path: Path | None = None


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`file.safetensors:0.8` -> (file, 0.8); no number -> multiplier 1.0."""
    path, sep, tail = text.rpartition(":")
    if sep and re.fullmatch(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", tail.strip()):
        return path, float(tail)
    return text, 1.0


def load(model: str, loras: list[tuple[str, float]] = (), *, device: str | None = None,
         dtype: str = "fp32", vae: str | None = None, family: str = "auto"):
    """(components, pipeline, base scheduler config, LoRA networks) ready to render."""
    from library.models.loading import load_components
    from library.train.sampling import make_pipeline
    from networks.from_file import attach_lora_files
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype != "fp32" and not str(device).startswith("cuda"):
        dtype = "fp32"  # half precision matmuls are slow or missing on CPU
    # The VAE stays fp32: SDXL's VAE overflows in fp16.
    c = load_components(model, family=family, vae=vae, weight_dtype=DTYPES[dtype],
                        vae_dtype=torch.float32)
    for m in [c.unet, c.vae, *c.text_encoders]:
        m.requires_grad_(False).eval().to(device)
    networks = attach_lora_files(c, list(loras))
    pipe, base_config = make_pipeline(c)
    return c, pipe, base_config, networks


def checked(field: str, value):
    """A size/steps/scale value validated (and sizes rounded to /8) as in prompt files."""
    try:
        return convert(field, value)
    except ValueError as e:
        raise ValueError(f"--{field} {value!r}: {e}") from None


def next_index(out_dir: Path) -> int:
    """First free image number in `out_dir` (names start with 5 digits), so runs append."""
    used = [int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(used, default=-1) + 1


def generate(model: str, *, loras: list[tuple[str, float]] = (), prompt: str | None = None,
             prompts: list[PromptSpec] | None = None, negative_prompt: str = "",
             steps: int = DEFAULT_STEPS, scale: float = DEFAULT_SCALE, seed: int = 0,
             width: int | None = None, height: int | None = None, sampler: str = "euler_a",
             n: int = 1, batch: int = 1, clip_skip: int = 1, max_token_length: int = 75,
             weighted: bool = False, out_dir: str | Path | None = None,
             device: str | None = None, dtype: str = "fp32", vae: str | None = None,
             loaded=None, progress: bool = False) -> list[Generated]:
    """Render `n` images per prompt (seeds spec.seed, spec.seed+1, ...) in batches of
    `batch`; write PNGs to `out_dir` when given. `prompts` (PromptSpecs) replaces `prompt`
    and the per-prompt options. `loaded` reuses a `load(...)` result. Prompts are encoded as
    training encodes captions: kohya's `clip_skip`, `max_token_length` (75/150/225) and, with
    `weighted`, the `(word:1.2)` syntax of `weighted_captions`."""
    from library.train.sampling import render, save_png, to_uint8
    c, pipe, base_config, networks = loaded or load(model, loras, device=device,
                                                    dtype=dtype, vae=vae)
    native = c.family.native_resolution
    if prompts is None:
        if prompt is None:
            raise ValueError("give a prompt or prompts")
        prompts = [PromptSpec(prompt, negative_prompt, checked("width", width or native),
                              checked("height", height or native), seed,
                              checked("scale", scale), checked("steps", steps),
                              samplers.canonical(sampler))]
    out = Path(out_dir) if out_dir is not None else None
    index = next_index(out) if out is not None and out.is_dir() else 0
    lora_text = ", ".join(f"{Path(p).stem}:{m:g}" for p, m in loras)
    results: list[Generated] = []
    from tqdm.auto import tqdm
    bar = tqdm(total=n * len(prompts), desc="images", disable=not progress)
    for spec in prompts:
        base_seed = spec.seed if spec.seed is not None else seed
        seeds = [base_seed + i for i in range(n)]
        for start in range(0, n, max(1, batch)):
            chunk = seeds[start:start + max(1, batch)]
            arrays = render(pipe, base_config, spec, chunk, c, clip_skip=clip_skip,
                            max_token_length=max_token_length, weighted=weighted)
            for s, arr in zip(chunk, arrays):
                item = Generated(replace(spec, seed=s), arr)
                if out is not None:
                    extra = {"LoRAs": f'"{lora_text}"'} if lora_text else None
                    item.path = save_png(to_uint8(arr), out / f"{index:05d}-{s}.png",
                                         a1111_parameters(item.spec, Path(c.model_path).name,
                                                          extra))
                    index += 1
                results.append(item)
            bar.update(len(chunk))
    bar.close()
    if loaded is None:
        for net in reversed(networks):
            net.detach()
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers model folder (or cached hub id)")
    p.add_argument("--vae", help="replacement VAE folder or .safetensors file")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:MULT]",
                   help="LoRA file with optional multiplier (default 1.0); repeatable")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt_file", help="sample-prompt file (.txt/.toml/.json)")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="CFG scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i "
                   "gets seed + i")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--sampler", default="euler_a", help="one of: "
                   + ", ".join(samplers.SAMPLER_NAMES))
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    p.add_argument("--clip_skip", type=int, default=1, help="kohya's clip_skip (2: the "
                   "penultimate text-encoder layer), as the LoRA was trained")
    p.add_argument("--max_token_length", type=int, choices=(75, 150, 225), default=75,
                   help="prompt length in tokens (150/225: 75-token chunks, as in training)")
    p.add_argument("--weighted_captions", action="store_true",
                   help="parse (word:1.2) / (word) / [word] weights in the prompts")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="UNet/text-encoder dtype on CUDA (the VAE stays fp32)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--out", default="generated", help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.prompt) == bool(args.prompt_file):
        print("error: give exactly one of --prompt and --prompt_file", file=sys.stderr)
        return 2
    from library.models.loading import ModelLoadError
    try:
        sampler = samplers.canonical(args.sampler)
        loras = [parse_lora_arg(t) for t in args.lora]
        for path, _ in loras:
            if not Path(path).is_file():
                raise ValueError(f"--lora: {path} not found")
        prompts = None
        if args.prompt_file:
            from library.models.loading import detect_family, resolve_model_dir
            native = detect_family(resolve_model_dir(args.model)).native_resolution
            prompts = load_prompts(args.prompt_file, width=args.width or native,
                                   height=args.height or native, steps=args.steps,
                                   scale=args.scale, sampler=sampler,
                                   negative_prompt=args.negative_prompt, base_seed=args.seed)
        results = generate(args.model, loras=loras, prompt=args.prompt, prompts=prompts,
                           negative_prompt=args.negative_prompt, steps=args.steps,
                           scale=args.scale, seed=args.seed, width=args.width,
                           height=args.height, sampler=sampler, n=args.n, batch=args.batch,
                           clip_skip=args.clip_skip, max_token_length=args.max_token_length,
                           weighted=args.weighted_captions, out_dir=args.out,
                           device=args.device, dtype=args.dtype, vae=args.vae, progress=True)
    except (ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(r.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
