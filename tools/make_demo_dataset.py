#!/usr/bin/env python
"""Write the demo's small captioned dataset in kohya's `N_name class` layout.

The concept is "zorblat": a purple star with an orange ring, on varied plain backgrounds,
drawn at random positions and sizes. Captions name the trigger word and the background.

    python tools/make_demo_dataset.py --out demo/data [--count 20] [--size 64] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "green": (40, 160, 60),
               "blue": (40, 70, 200), "yellow": (235, 215, 40), "red": (200, 40, 40)}


def star(cx: float, cy: float, r_out: float, r_in: float, points: int = 5) -> list:
    pts = []
    for k in range(points * 2):
        r = r_out if k % 2 == 0 else r_in
        a = math.pi * k / points - math.pi / 2
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def draw_zorblat(size: int, background: tuple, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.28, 0.4)
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 140, 0), width=max(2, size // 20))
    d.polygon(star(cx, cy, r * 0.8, r * 0.35), fill=(150, 40, 200))
    return img


def make_dataset(out: Path, count: int = 20, size: int = 64, seed: int = 0,
                 repeats: int = 10) -> Path:
    rng = random.Random(seed)
    folder = out / f"{repeats}_zorblat toy"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(BACKGROUNDS)
    for i in range(count):
        bg = names[i % len(names)]
        img = draw_zorblat(size, BACKGROUNDS[bg], rng)
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"zorblat, a purple star, on a {bg} background\n")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    folder = make_dataset(Path(a.out), a.count, a.size, a.seed)
    print(f"wrote {a.count} images with captions to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
