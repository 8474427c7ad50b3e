#!/usr/bin/env python
"""Change the rank of a LoRA by SVD: to a fixed rank, or per module by a rule.

    python tools/resize_lora.py --model big.safetensors --save_to small.safetensors \
        --new_rank 32 [--new_conv_rank 16]
    python tools/resize_lora.py --model big.safetensors --save_to dyn.safetensors \
        --new_rank 64 --dynamic_method sv_fro --dynamic_param 0.95

sd-scripts' flags and rules (networks/resize_lora.py): --new_rank caps every module (default
4); with --dynamic_method each module keeps the rank its rule picks (sv_ratio: singular values
above S[0]/param; sv_fro: Frobenius fraction param; sv_cumulative: fraction param of sum S).
Each module's alpha keeps its scale alpha/rank, so the output's effect is the best rank-k
approximation of the input's. Prints the retained Frobenius fraction per part (mean and worst
module). LoRA and LoCon, SD1.5 and SDXL, kohya or diffusers/peft layout, any precision; the
output is a kohya file in the input's precision unless --save_precision. The metadata is kept
with ss_network_dim / ss_network_alpha updated and the resize noted in ss_training_comment.
Exit codes: 0 done, 2 bad input (one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.lora_tools import cli  # noqa: E402
from library.lora_tools.lora_file import read_modules  # noqa: E402
from library.lora_tools.lora_write import (carry_metadata, check_output, file_dtype,  # noqa: E402
                                           kohya_tensors, save_dtype, summary_dims,
                                           write_kohya)
from library.lora_tools.svd import (METHODS, default_device, low_rank,  # noqa: E402
                                    low_rank_of_product)


def resize(modules: dict, new_rank: int, new_conv_rank: int, *, method: str | None = None,
           param: float | None = None, device: str = "cpu", quiet: bool = False
           ) -> tuple[dict, dict[str, float]]:
    """({stem: (up, down, alpha)}, {stem: retained Frobenius fraction})."""
    out, kept = {}, {}
    for stem, m in cli.progress(modules.items(), "resize", len(modules), quiet):
        limit = new_conv_rank if m.is_conv3x3 else new_rank
        if m.is_lora:  # factors known: SVD of an r x r core; alpha keeps the scale
            f = low_rank_of_product(m.up, m.down, limit, method=method, param=param,
                                    device=device)
            out[stem] = (f.up, f.down, m.scale * f.rank)
        else:  # LoHa/LoKr/...: the full delta (scale included) becomes a plain LoRA
            f = low_rank(m.delta(), limit, method=method, param=param, device=device)
            out[stem] = (f.up, f.down, float(f.rank))
        kept[stem] = f.fro_retained
    return out, kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="LoRA file to resize (.safetensors)")
    p.add_argument("--save_to", required=True, help="output .safetensors")
    p.add_argument("--new_rank", type=int, default=4,
                   help="rank of the output (the cap with --dynamic_method); default 4")
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="rank of 3x3 conv modules (LoCon); default --new_rank")
    p.add_argument("--dynamic_method", choices=METHODS, default=None,
                   help="pick each module's rank by a rule (needs --dynamic_param)")
    p.add_argument("--dynamic_param", type=float, default=None,
                   help="sv_ratio: max ratio S[0]/S[k]; sv_fro / sv_cumulative: fraction 0-1")
    p.add_argument("--family", choices=("sd15", "sdxl"),
                   help="family of a diffusers/peft input (default: from its keys)")
    p.add_argument("--verbose", action="store_true", help="one line per module")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_precision(p, "the input's precision")
    cli.add_device(p)
    cli.add_overwrite(p)
    a = p.parse_args(argv)

    def body() -> int:
        if a.new_rank < 1 or (a.new_conv_rank is not None and a.new_conv_rank < 1):
            raise ValueError("--new_rank and --new_conv_rank must be >= 1")
        if a.dynamic_method and a.dynamic_param is None:
            raise ValueError(f"--dynamic_method {a.dynamic_method} needs --dynamic_param")
        if a.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < a.dynamic_param <= 1:
            raise ValueError(f"--dynamic_param {a.dynamic_param}: {a.dynamic_method} takes a "
                             "fraction in (0, 1]")
        if a.dynamic_method == "sv_ratio" and not a.dynamic_param >= 1:
            raise ValueError(f"--dynamic_param {a.dynamic_param}: sv_ratio takes a ratio >= 1")
        out_path = check_output(a.save_to, a.overwrite)
        modules, meta = read_modules(a.model, family=a.family)
        conv_rank = a.new_conv_rank or a.new_rank
        factors, kept = resize(modules, a.new_rank, conv_rank, method=a.dynamic_method,
                               param=a.dynamic_param, device=default_device(a.device),
                               quiet=a.quiet)
        old = max((m.rank for m in modules.values() if m.is_lora), default="?")
        if a.dynamic_method:
            note = (f"dynamic resize with {a.dynamic_method} {a.dynamic_param:g} (max rank "
                    f"{a.new_rank}) from rank {old} by tomlora resize_lora")
        else:
            conv = f" (conv {conv_rank})" if conv_rank != a.new_rank else ""
            note = f"rank resized from {old} to {a.new_rank}{conv} by tomlora resize_lora"
        dtype = save_dtype(a.save_precision, file_dtype(
            t for m in modules.values() for t in m.tensors.values()))
        tensors = kohya_tensors(factors, dtype)
        write_kohya(out_path, tensors, carry_metadata(meta, note, **summary_dims(tensors)))
        if a.verbose:
            for stem in kept:
                rank = tensors[f"{stem}.lora_down.weight"].shape[0]
                print(f"{stem}: rank {rank}, fro retained {kept[stem]:.4f}")
        for line in cli.part_report(kept, "Frobenius retained"):
            print(line)
        print(f"wrote {out_path} ({note})")
        return 0

    return cli.run("resize_lora", body)


if __name__ == "__main__":
    sys.exit(main())
