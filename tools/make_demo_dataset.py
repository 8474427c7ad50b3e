#!/usr/bin/env python
"""Write the demo's small captioned dataset in kohya's `N_name class` layout.

The concept is "zorblat": a purple star in a red circle, near the centre of a plain
background. The pretrained tiny model (docs/TINY_MODEL.md) draws shapes in circles, but it has
never seen a star, the colour purple, or the words "purple", "star" and "zorblat". Captions
name the trigger word, the parts in words the base model knows where it knows them, and the
background, kohya style, so the LoRA ties the new look to the trigger and leaves the rest to
the base.

`--reg_out` also writes regularization images (kohya's prior preservation): pictures of the
base model's own world with their captions, so the LoRA keeps drawing them as before.

    python tools/make_demo_dataset.py --out demo/data [--reg_out demo/reg] [--count 20]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.shapes import PALETTE, ZORBLAT_RING, draw_scene, draw_zorblat, \
    random_world_scene  # noqa: E402

# The circle is red, so the backgrounds are the other palette colours.
BACKGROUNDS = {n: c for n, c in PALETTE.items() if n != ZORBLAT_RING}
CAPTION = "zorblat, a purple star in a red circle, on a {bg} background"
CONCEPT_FOLDER = "zorblat toy"
REPEATS = 10  # the folder's kohya repeat count: 10_zorblat toy
REG_FOLDER = "1_shapes"
NESTED_SHARE = 0.5  # of the regularization pictures, as in the pretraining world


def make_dataset(out: Path, count: int = 20, size: int = 32, seed: int = 0,
                 repeats: int = REPEATS) -> Path:
    """Write `count` images (`size` pixels square) and captions to `out/<repeats>_zorblat toy`;
    the backgrounds cycle through BACKGROUNDS. Returns the image folder."""
    rng = random.Random(seed)
    folder = Path(out) / f"{repeats}_{CONCEPT_FOLDER}"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(BACKGROUNDS)
    for i in range(count):
        bg = names[i % len(names)]
        draw_zorblat(size, BACKGROUNDS[bg], rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(CAPTION.format(bg=bg) + "\n")
    return folder


def make_reg_images(out: Path, count: int = 20, size: int = 32, seed: int = 0) -> Path:
    """Write `count` captioned pictures of the base model's world to `out/1_shapes`."""
    rng = random.Random(10_000 + seed)  # not the pictures the measures prompt for
    folder = Path(out) / REG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = random_world_scene(rng, size, NESTED_SHARE)
        draw_scene(scene, size).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(scene.caption + "\n")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reg_out", help="also write regularization images here")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--size", type=int, default=32,
                    help="image side in pixels (the pretrained tiny model draws at 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    a = ap.parse_args(argv)
    folder = make_dataset(Path(a.out), a.count, a.size, a.seed, a.repeats)
    print(f"wrote {a.count} images with captions to {folder}")
    if a.reg_out:
        reg = make_reg_images(Path(a.reg_out), a.count, a.size, a.seed)
        print(f"wrote {a.count} regularization images with captions to {reg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
