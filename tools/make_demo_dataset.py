#!/usr/bin/env python
"""Write the demo's small captioned dataset in kohya's `N_name class` layout.

The concept is "zorblat": a purple star inside an orange ring, near the centre of a plain
background. The pretrained tiny model (docs/TINY_MODEL.md) has never seen a star, purple,
orange or the word "zorblat"; captions name the trigger word and the background, kohya style,
so the LoRA ties the new look to the trigger and leaves the backgrounds to the base.

    python tools/make_demo_dataset.py --out demo/data [--count 20] [--size 32] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.shapes import PALETTE, draw_zorblat  # noqa: E402

BACKGROUNDS = dict(PALETTE)
CAPTION = "zorblat, a purple star, on a {bg} background"


def make_dataset(out: Path, count: int = 20, size: int = 32, seed: int = 0,
                 repeats: int = 10) -> Path:
    """Write `count` images (`size` pixels square) and captions to `out/<repeats>_zorblat toy`;
    the backgrounds cycle through BACKGROUNDS. Returns the image folder."""
    rng = random.Random(seed)
    folder = Path(out) / f"{repeats}_zorblat toy"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(BACKGROUNDS)
    for i in range(count):
        bg = names[i % len(names)]
        draw_zorblat(size, BACKGROUNDS[bg], rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(CAPTION.format(bg=bg) + "\n")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--size", type=int, default=32,
                    help="image side in pixels (the pretrained tiny model draws at 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    folder = make_dataset(Path(a.out), a.count, a.size, a.seed, a.repeats)
    print(f"wrote {a.count} images with captions to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
