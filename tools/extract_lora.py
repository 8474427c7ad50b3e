#!/usr/bin/env python
"""Extract a LoRA from the difference between a fine-tuned model and its base.

    python tools/extract_lora.py --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to extracted.safetensors --dim 32 [--conv_dim 16] [--save_precision fp16]

sd-scripts' flags and defaults (networks/extract_lora_from_models.py): --dim 4 for Linear and
1x1 modules, --conv_dim (off by default) also extracts the ResNet and sampler convs (LoCon),
--clamp_quantile 0.99 clamps the SVD factors' outliers (1 = no clamp), and the text encoders
are extracted only when some weight differs by more than --min_diff (0.01). Models are
diffusers folders or single .safetensors checkpoints, SD1.5 or SDXL, in any mix; they are
read module by module, so SDXL needs a few GiB of RAM; SVDs run on CUDA when available.
Prints the retained Frobenius fraction of each part. The output is a kohya LoRA (alpha =
rank) that loads in tomlora, diffusers, A1111, ComfyUI and sd-scripts.
Exit codes: 0 done, 2 bad input (one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.lora_tools import cli  # noqa: E402
from library.lora_tools.lora_write import (PRECISIONS, check_output, kohya_tensors,  # noqa: E402
                                           summary_dims, write_kohya)
from library.lora_tools.svd import default_device  # noqa: E402


def metadata(a, family: str, te: bool) -> dict[str, str]:
    from library.models.loading import FAMILIES
    fam = FAMILIES[family]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": fam.base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": Path(a.model_org).name,
        "ss_network_train_unet_only": str(not te),
        "ss_training_comment": f"extracted by tomlora extract_lora from {Path(a.model_tuned).name}"
                               f" - {Path(a.model_org).name}, dim {a.dim}, conv_dim "
                               f"{a.conv_dim}, clamp_quantile {a.clamp_quantile:g}",
    }
    if not a.no_metadata:
        meta.update({
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": fam.modelspec_architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
            if family == "sdxl" else "diffusers",
            "modelspec.title": Path(a.save_to).stem,
            "modelspec.date": dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.resolution": "1024x1024" if family == "sdxl" else "512x512",
        })
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model_org", required=True, help="base model (folder or .safetensors)")
    p.add_argument("--model_tuned", required=True, help="fine-tuned model")
    p.add_argument("--save_to", required=True, help="output LoRA .safetensors")
    p.add_argument("--dim", type=int, default=4, help="rank of Linear/1x1 modules (default 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="rank of 3x3 convs; also extracts the ResNet/sampler modules (LoCon)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp the factors at this quantile of their values (1 = off)")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="text encoders are extracted only if some weight differs by more")
    p.add_argument("--no_metadata", action="store_true",
                   help="write only the minimum ss_* metadata (no sai modelspec)")
    for flag in ("--sdxl", "--v2", "--v_parameterization"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    # sd-scripts loads whole models and needs these; here tensors stream, so they do nothing
    for flag in ("--load_precision", "--load_original_model_to", "--load_tuned_model_to"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_precision(p, "float (fp32)")
    cli.add_device(p)
    cli.add_overwrite(p)
    a = p.parse_args(argv)

    def body() -> int:
        from library.lora_tools import extract as ex
        from library.lora_tools.model_files import open_model
        if a.v2 or a.v_parameterization:
            raise ValueError("--v2 / --v_parameterization: SD2 models are not supported "
                             "(SD1.5 and SDXL are)")
        if a.dim < 1 or (a.conv_dim is not None and a.conv_dim < 1):
            raise ValueError("--dim and --conv_dim must be >= 1")
        if not 0 < a.clamp_quantile <= 1:
            raise ValueError(f"--clamp_quantile {a.clamp_quantile}: must be in (0, 1]")
        out = check_output(a.save_to, a.overwrite)
        base = open_model(a.model_org, "--model_org")
        tuned = open_model(a.model_tuned, "--model_tuned")
        ex.check_pair(base, tuned)
        if a.sdxl and base.family != "sdxl":
            raise ValueError(f"--sdxl given but --model_org {base.root} is {base.family}")
        stems = ex.targets(base, conv=a.conv_dim is not None)
        te, largest = ex.text_encoders_differ(base, tuned, stems, a.min_diff, a.quiet)
        if not te:
            print(f"text encoders are the same (largest |difference| {largest:.3g} <= "
                  f"--min_diff {a.min_diff:g}): extracting the UNet only")
            stems = [s for s in stems if s.startswith("lora_unet_")]
        q = a.clamp_quantile
        factors, kept = ex.extract(base, tuned, stems, a.dim, a.conv_dim,
                                   clamp_quantile=q if q < 1 else None,
                                   device=default_device(a.device), quiet=a.quiet)
        tensors = kohya_tensors(factors, PRECISIONS[a.save_precision or "float"])
        meta = metadata(a, base.family, te)
        meta.update(summary_dims(tensors))
        if a.conv_dim:
            meta["ss_network_args"] = json.dumps({"conv_dim": str(a.conv_dim),
                                                  "conv_alpha": str(float(a.conv_dim))})
        write_kohya(out, tensors, meta)
        for line in cli.part_report(kept, "Frobenius retained"):
            print(line)
        n = sum(k.endswith(".alpha") for k in tensors)
        print(f"wrote {out} ({base.family}, {n} modules)")
        return 0

    return cli.run("extract_lora", body)


if __name__ == "__main__":
    sys.exit(main())
