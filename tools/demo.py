#!/usr/bin/env python
"""`make demo`: build the tiny model and the dataset (once), train the demo LoRA, and say
where every output is."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.make_demo_dataset import make_dataset  # noqa: E402
from tools.make_tiny_model import build_tiny_model  # noqa: E402


def main() -> int:
    import os
    os.chdir(ROOT)
    demo = Path("demo")
    if not (demo / "tiny-sd15" / "model_index.json").is_file():
        build_tiny_model("sd15", demo / "tiny-sd15", seed=0, force=True)
        print("built the tiny SD1.5-shaped model in demo/tiny-sd15")
    if not (demo / "data").is_dir():
        make_dataset(demo / "data")
        print("wrote the demo dataset to demo/data/10_zorblat toy")
    import train_network
    rc = train_network.main(["--config_file", "configs/examples/tiny_demo.toml"])
    if rc == 0:
        samples = sorted(Path("demo/output/sample").glob("*.png"))
        if samples:
            print(f"\nSample images ({len(samples)}, docs/SAMPLING.md):")
            for p in samples:
                print(f"  {p}")
        print("\nOpen the loss and learning-rate curves (and the sample grids, IMAGES tab) with:\n"
              "  .venv/bin/tensorboard --logdir demo/logs\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
