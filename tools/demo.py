#!/usr/bin/env python
"""`make demo`: train the demo LoRA on the committed tiny model, then show that it learned.

1. The base model is models/tiny-sd15-pretrained (committed; rebuilt with
   `make_tiny_model.py --pretrain` if it is missing, which takes a while on a CPU).
2. The dataset: 20 pictures of "zorblat" in demo/data and 20 regularization pictures of the
   base model's world in demo/reg (tools/make_demo_dataset.py).
3. `train_network.py --config_file configs/examples/tiny_demo.toml`.
4. The two figures of tools/learning_report.py (learned concept, base preservation) and a
   before/after grid in demo/output/before_after.png.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.make_demo_dataset import BACKGROUNDS, CAPTION, CONCEPT_FOLDER, REG_FOLDER, \
    REPEATS, make_dataset, make_reg_images  # noqa: E402
from tools.make_tiny_model import build_tiny_model  # noqa: E402

CONFIG = "configs/examples/tiny_demo.toml"
MODEL = Path("models/tiny-sd15-pretrained")  # what CONFIG's pretrained_model_name_or_path names
DATA = Path("demo/data")
REG = Path("demo/reg")  # CONFIG's reg_data_dir
OUTPUT = Path("demo/output")
IMAGE_SIZE = 32  # the tiny model's resolution (CONFIG's resolution)


def ensure_model() -> None:
    if (MODEL / "model_index.json").is_file():
        return
    print(f"{MODEL} is missing: pretraining the tiny model on the CPU (see docs/TINY_MODEL.md; "
          "this takes several minutes) ...")
    build_tiny_model("sd15", MODEL, seed=0, force=True, pretrain=True)


def ensure_dataset() -> None:
    """(Re)write the dataset and the regularization images unless they are already there as
    this version writes them (the first caption and picture size tell)."""
    from PIL import Image
    first = DATA / f"{REPEATS}_{CONCEPT_FOLDER}" / "000.png"
    caption = first.with_suffix(".txt")
    if first.is_file() and (REG / REG_FOLDER / "000.png").is_file() and caption.is_file() \
            and caption.read_text().strip() == CAPTION.format(bg=next(iter(BACKGROUNDS))):
        with Image.open(first) as im:
            if im.size == (IMAGE_SIZE, IMAGE_SIZE):
                return
    data = make_dataset(DATA, size=IMAGE_SIZE)
    reg = make_reg_images(REG, size=IMAGE_SIZE)
    print(f"wrote the demo dataset to {data} and its regularization images to {reg}")


def report(lora: Path) -> None:
    from tools.learning_report import before_after_grid, lora_effect
    started = time.time()
    print("\nMeasuring the LoRA against the base model (docs/TINY_MODEL.md) ...")
    effect = lora_effect(MODEL, lora)
    grid = before_after_grid(effect, OUTPUT / "before_after.png")
    for line in effect.lines():
        print(f"  {line}")
    print(f"  before/after grid: {grid}  ({time.time() - started:.0f} s)")


def main() -> int:
    os.chdir(ROOT)
    ensure_model()
    ensure_dataset()
    import train_network
    rc = train_network.main(["--config_file", CONFIG])
    if rc != 0:
        return rc
    samples = sorted((OUTPUT / "sample").glob("*.png"))
    if samples:
        print(f"\nSample images during training ({len(samples)}, docs/SAMPLING.md): "
              f"{OUTPUT / 'sample'}")
    report(OUTPUT / "zorblat.safetensors")
    print("\nOpen the loss and learning-rate curves (and the sample grids, IMAGES tab) with:\n"
          "  .venv/bin/tensorboard --logdir demo/logs\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
