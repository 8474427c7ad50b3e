#!/usr/bin/env python
"""Merge LoRAs: bake them into a base model, or combine several into one LoRA.

    # into a model (a diffusers folder or a single .safetensors checkpoint)
    python tools/merge_lora.py --sd_model base.safetensors --models style.safetensors \
        char.safetensors --ratios 0.8 0.5 --save_to merged.safetensors [--save_precision fp16]
    # into one LoRA, exactly (ranks add up)
    python tools/merge_lora.py --models style.safetensors char.safetensors --ratios 0.8 0.5 \
        --save_to both.safetensors
    # into one LoRA of rank 32 by SVD (what sd-scripts' svd_merge_lora.py does)
    python tools/merge_lora.py --models a.safetensors b.safetensors --new_rank 32 \
        --save_to both32.safetensors

Into a model: every LoRA module is matched to the model tensor it changes (UNet and text
encoders, SD1.5 and SDXL, either UNet naming, kohya or diffusers/peft files) and checked
before anything is written; then W + sum(ratio * delta) is computed in fp32 tensor by tensor,
so a full SDXL checkpoint needs a few GiB of RAM. The output has the base's form; a --save_to
ending in .safetensors from a folder writes a single file, any other name from a single file
writes a diffusers folder (this conversion loads the whole model). Precision: the base's,
unless --save_precision.
Into one LoRA: exact (--concat, the default without --new_rank) stacks the modules' factors,
so the result applies exactly as the inputs did; --new_rank (--new_conv_rank for 3x3 convs)
truncates that sum by SVD and prints the relative error per part.
Exit codes: 0 done, 2 bad input (one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.lora_tools import cli  # noqa: E402
from library.lora_tools.lora_write import (PRECISIONS, check_output, file_dtype,  # noqa: E402
                                           kohya_tensors, summary_dims, write_kohya)
from library.lora_tools.svd import default_device  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sd_model", help="base model to merge into: a diffusers folder or a "
                   "single .safetensors checkpoint (omit it to merge LoRAs into one LoRA)")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files")
    p.add_argument("--ratios", nargs="*", type=float, default=None,
                   help="one weight per LoRA (default 1.0 each)")
    p.add_argument("--save_to", required=True, help="output file (or folder, for a model)")
    p.add_argument("--new_rank", type=int, default=None,
                   help="LoRA merge by SVD to this rank (default: exact concatenation)")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="rank of 3x3 conv modules in an SVD merge (default --new_rank)")
    p.add_argument("--concat", action="store_true",
                   help="exact LoRA merge by concatenating ranks (the default without "
                        "--new_rank; kept for sd-scripts command lines)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="SVD merge: clamp the factors at this quantile of their values, as "
                        "sd-scripts does (1 = no clamp); default 0.99")
    p.add_argument("--precision", choices=("float", "fp16", "bf16"), default="float",
                   help="accepted for sd-scripts command lines; merging is always computed "
                        "in fp32")
    p.add_argument("--model_config_dir", help="diffusers folder whose configs and "
                   "tokenizers describe a single-file --sd_model of non-standard shape "
                   "(only needed to write it as a diffusers folder)")
    p.add_argument("--family", choices=("sd15", "sdxl"),
                   help="family of diffusers/peft LoRA files (default: from their keys)")
    p.add_argument("--no_metadata", action="store_true",
                   help="write only the minimum ss_* metadata")
    p.add_argument("--lbws", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_precision(p, "the base model's (merge into a model) or the LoRAs' precision")
    cli.add_device(p)
    cli.add_overwrite(p)
    return p


def _ratios(a) -> list[float]:
    if not a.ratios:
        return [1.0] * len(a.models)
    if len(a.ratios) != len(a.models):
        raise ValueError(f"--ratios has {len(a.ratios)} values for {len(a.models)} --models")
    return a.ratios


def merge_into_model(a, loras) -> int:
    from library.lora_tools.merge_model import plan, write_merged
    from library.lora_tools.model_files import open_model
    model = open_model(a.sd_model, "--sd_model")
    out = Path(a.save_to)
    to_single = out.suffix.lower() == ".safetensors"
    if out.exists() and not a.overwrite:
        raise ValueError(f"--save_to {out}: exists; pass --overwrite or choose another name")
    if not out.parent.exists():
        raise ValueError(f"--save_to {out}: folder {out.parent} does not exist")
    if out.resolve() == Path(a.sd_model).resolve():
        raise ValueError(f"--save_to {out}: is the base model itself; write a new file")
    changes = plan(model, loras)
    dtype = PRECISIONS[a.save_precision] if a.save_precision else None
    note = {"loras": [{"file": Path(p).name, "ratio": r} for p, r in loras]}
    same_form = to_single == (model.kind == "single_file")
    if same_form:
        write_merged(model, changes, out, dtype=dtype, note=note, quiet=a.quiet)
    else:
        _merge_and_convert(a, model, changes, out, dtype, note)
    n = sum(len(v) for v in changes.values())
    print(f"merged {len(loras)} LoRA(s), {n} module deltas, into {model.family} "
          f"{model.kind.replace('_', ' ')} {model.root}")
    print(f"wrote {out}")
    return 0


def _merge_and_convert(a, model, changes, out: Path, dtype, note) -> None:
    """Other form on request: merge in the base's form to a temporary place, then load
    that with the trainer's loaders and write it the other way."""
    import torch
    from library.lora_tools.merge_model import write_merged
    from library.models.loading import load_components
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        name = "merged.safetensors" if model.kind == "single_file" else "merged"
        merged = write_merged(model, changes, tmp / name, dtype=dtype, note=note,
                              quiet=a.quiet)
        config_dir = a.model_config_dir
        c = load_components(str(merged), family=model.family, model_config_dir=config_dir,
                            vae_dtype=torch.float32)
        if out.suffix.lower() == ".safetensors":
            from library.models.export import save_single_file
            save_single_file(c, out, dtype=dtype, metadata={"tomlora_merged_loras":
                                                            json.dumps(note)})
        else:
            pipe = c.family.pipeline(c)
            if dtype is not None:
                pipe.to(dtype)
            staged = tmp / "out"
            pipe.save_pretrained(staged, safe_serialization=True)
            (staged / "tomlora_merged_loras.json").write_text(json.dumps(note, indent=1))
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            shutil.move(str(staged), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_loras(a, loras) -> int:
    from library.lora_tools import merge_loras as ml
    out = check_output(a.save_to, a.overwrite)
    family, by_stem, metas = ml.read_all(loras, a.family)
    device = default_device(a.device)
    if a.new_rank is None:
        factors = ml.merge_exact(by_stem, a.quiet)
        how = "exact (ranks concatenated)"
    else:
        if a.new_rank < 1 or (a.new_conv_rank is not None and a.new_conv_rank < 1):
            raise ValueError("--new_rank and --new_conv_rank must be >= 1")
        q = a.clamp_quantile
        if not 0 < q <= 1:
            raise ValueError(f"--clamp_quantile {q}: must be in (0, 1]")
        factors = ml.merge_svd(by_stem, a.new_rank, a.new_conv_rank or a.new_rank,
                               clamp_quantile=q if q < 1 else None, device=device,
                               quiet=a.quiet)
        how = f"SVD to rank {a.new_rank}" + (f" (conv {a.new_conv_rank})"
                                             if a.new_conv_rank else "")
    dtypes = [t for items in by_stem.values() for m, _, _ in items
              for t in m.tensors.values()]
    dtype = PRECISIONS[a.save_precision] if a.save_precision else file_dtype(dtypes)
    tensors = kohya_tensors(factors, dtype)
    note = f"merged by tomlora merge_lora, {how}: " + ", ".join(
        f"{Path(p).name} x{r:g}" for p, r in loras)
    meta = {} if a.no_metadata else ml.base_metadata(metas, out.stem)
    meta.update({"ss_network_module": "networks.lora", "ss_training_comment": note,
                 "tomlora_merged_loras": json.dumps(
                     [{"file": Path(p).name, "ratio": r} for p, r in loras]),
                 **summary_dims(tensors)})
    write_kohya(out, tensors, meta)
    errs = ml.errors(by_stem, tensors)
    for line in cli.part_report(errs, "relative error", worst="max"):
        print(line)
    n = sum(k.endswith(".alpha") for k in tensors)
    print(f"wrote {out} ({family}, {n} modules, {how})")
    return 0


def main(argv: list[str] | None = None, *, svd_only: bool = False) -> int:
    a = parser().parse_args(argv)

    def body() -> int:
        if svd_only and a.new_rank is None:
            raise ValueError("--new_rank is required (svd_merge_lora merges by SVD; use "
                             "merge_lora.py for an exact merge)")
        if a.concat and a.new_rank is not None:
            raise ValueError("--concat merges exactly; leave out --new_rank, or --concat")
        if a.lbws:
            raise ValueError("--lbws (per-block weights) is not supported; resize or merge "
                             "whole LoRAs, or train with per-block network_args")
        loras = list(zip(a.models, _ratios(a)))
        if a.sd_model:
            if a.new_rank is not None:
                raise ValueError("--new_rank applies to merging LoRAs into one LoRA; leave "
                                 "out --sd_model, or --new_rank")
            return merge_into_model(a, loras)
        return merge_loras(a, loras)

    return cli.run("svd_merge_lora" if svd_only else "merge_lora", body)


if __name__ == "__main__":
    sys.exit(main())
