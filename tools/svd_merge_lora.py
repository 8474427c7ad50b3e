#!/usr/bin/env python
"""Merge LoRAs into one LoRA of a chosen rank by SVD (sd-scripts' svd_merge_lora.py flags).

    python tools/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.7 \
        --new_rank 32 [--new_conv_rank 16] --save_to merged.safetensors

The same as `tools/merge_lora.py --new_rank`: the exact sum of ratio * delta of every module,
truncated by SVD (alpha = rank), with the relative Frobenius error printed per part. See
`tools/merge_lora.py --help` for every flag.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import merge_lora  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return merge_lora.main(argv, svd_only=True)


if __name__ == "__main__":
    sys.exit(main())
