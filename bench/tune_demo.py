"""Explore the demo LoRA's settings (issue 10): train the demo config with variations through
train_network.main and measure each with tools.learning_report.lora_effect.

    python bench/tune_demo.py --device cuda --n_trigger 24 --n_plain 12 \
        "big --max_train_steps 100 --network_args conv_dim=8 conv_alpha=8" ...

Each argument is `<variant> <extra CLI flags>`; variant `orig` is tools/make_demo_dataset.py
as committed, `big` a larger star in a thicker ring; a `+reg` suffix (`big+reg`) adds 20
shapes-world pictures as regularization images. Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_network  # noqa: E402
import tools.make_demo_dataset as mdd  # noqa: E402
from tools import shapes  # noqa: E402
from tools.learning_report import lora_effect  # noqa: E402

ORIGINAL = mdd.draw_zorblat


def big(size, background, rng):
    c = shapes.Canvas(size, background)
    r = size * rng.uniform(0.38, 0.44)
    j = size * 0.06
    cx, cy = size / 2 + rng.uniform(-j, j), size / 2 + rng.uniform(-j, j)
    c.ring(cx, cy, r, 4.5, shapes.ORANGE)
    c.shape("star", cx, cy, r * 0.85, shapes.PURPLE)
    return c.image()


def write_reg_scenes(root: Path, seed: int, count: int = 20) -> Path:
    """`count` captioned shapes-world pictures as regularization images (`1_scene`)."""
    folder = root / "1_scene"
    folder.mkdir(parents=True)
    rng = random.Random(seed + 99)
    for i in range(count):
        scene = shapes.random_scene(rng, 32)
        shapes.draw_scene(scene, 32).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(scene.caption + "\n")
    return root


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n_trigger", type=int, default=12)
    ap.add_argument("--n_plain", type=int, default=6)
    ap.add_argument("--seeds", default="0")
    a = ap.parse_args()
    model = ROOT / "models" / "tiny-sd15-pretrained"
    for spec in a.runs:
        variant, *extra = shlex.split(spec)
        mdd.draw_zorblat = big if variant.startswith("big") else ORIGINAL
        for seed in [int(s) for s in a.seeds.split(",")]:
            tmp = Path(tempfile.mkdtemp())
            mdd.make_dataset(tmp / "data", size=32, seed=seed)
            reg = write_reg_scenes(tmp / "reg", seed) if variant.endswith("+reg") else None
            extra_reg = ["--reg_data_dir", str(reg)] if reg else []
            t = time.time()
            rc = train_network.main([
                "--config_file", str(ROOT / "configs/examples/tiny_demo.toml"),
                "--pretrained_model_name_or_path", str(model),
                "--train_data_dir", str(tmp / "data"), "--output_dir", str(tmp / "out"),
                "--logging_dir", str(tmp / "logs"), "--sample_every_n_steps", "100000",
                "--save_every_n_steps", "100000", "--seed", str(seed), *extra_reg, *extra])
            train_s = time.time() - t
            if rc != 0:
                print(json.dumps({"spec": spec, "seed": seed, "rc": rc}), flush=True)
                continue
            e = lora_effect(model, tmp / "out" / "zorblat.safetensors", n_trigger=a.n_trigger,
                            n_plain=a.n_plain, seed=1000 + 100 * seed, device=a.device)
            print("RESULT " + json.dumps({
                "spec": spec, "seed": seed, "train_s": round(train_s, 1),
                "before": e.concept_before, "after": e.concept_after,
                "plain_diff": round(e.plain_diff, 4), "unrelated": round(e.unrelated_diff, 4),
                "agree": e.plain_agreement}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
