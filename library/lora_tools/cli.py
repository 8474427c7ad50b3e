"""What the LoRA tools share on the command line: sd-scripts' flag names, the progress bar,
one-line errors (exit 2, nothing written), and the per-part report."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable

from networks.file_rules import part_of

PRECISION_CHOICES = ("float", "fp32", "fp16", "bf16")


def add_precision(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                   help=f"dtype of the output (float = fp32); default: {default_help}")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda or cpu "
                   "(default: cuda when available)")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")


def progress(items: Iterable, desc: str, total: int | None = None, quiet: bool = False):
    from tqdm import tqdm
    return tqdm(items, desc=desc, total=total, unit="module", disable=quiet or None,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def run(tool: str, fn: Callable[[], int]) -> int:
    """Run a tool's body; ValueError/FileNotFoundError become one line on stderr, exit 2."""
    try:
        return fn()
    except (ValueError, FileNotFoundError) as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{tool}: interrupted; nothing written", file=sys.stderr)
        return 130


def part_report(values: dict[str, float], what: str, worst: str = "min") -> list[str]:
    """'lora_unet: 140 modules, <what> mean 0.981 worst 0.902 (module)' per part."""
    parts: dict[str, list[tuple[float, str]]] = {}
    for stem, v in values.items():
        parts.setdefault(part_of(stem) or "other", []).append((v, stem))
    lines = []
    for part, vals in sorted(parts.items()):
        mean = sum(v for v, _ in vals) / len(vals)
        w = min(vals) if worst == "min" else max(vals)
        lines.append(f"{part}: {len(vals)} modules, {what} mean {mean:.4f}, worst {w[0]:.4f} "
                     f"({w[1]})")
    return lines
