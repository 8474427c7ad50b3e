"""Explore the demo (issue 10): optionally pretrain a tiny base, then train the demo LoRA with
variations through train_network.main and measure each with tools.learning_report.

    python bench/tune_demo.py --device cuda --pretrain /tmp/base --set unet_steps=1500 \\
        --seeds 0,1,2 "reg --max_train_steps 150" "plain --max_train_steps 150"

`--pretrain DIR` builds a base there first (tools/make_tiny_model.build_tiny_model on
`--device`, keeping the committed model's VAE unless `--train_vae`), with PretrainSettings
fields overridden by `--set key=value`; otherwise `--model` (default: the committed model) is
used. Each run is `<name> <extra CLI flags>`; a name containing `reg` adds the demo's
regularization images (tools/make_demo_dataset.make_reg_images). `--star R,G,B` recolours the
concept's star (and the measure's "purple"). Prints one RESULT JSON line per run and seed, and
writes grids under `--grids`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
from tools import learning_report as lr  # noqa: E402

COMMITTED = ROOT / "models" / "tiny-sd15-pretrained"


def pretrain(out: Path, device: str, overrides: list[str], train_vae: bool) -> Path:
    from tools.make_tiny_model import build_tiny_model
    from tools.pretrain_tiny import PretrainSettings
    fields = {f.name: f.type for f in dataclasses.fields(PretrainSettings)}
    kw = {}
    for item in overrides:
        k, v = item.split("=", 1)
        kw[k] = float(v) if "float" in str(fields[k]) else int(v)
    t = time.time()
    build_tiny_model("sd15", out, force=True, pretrain=True,
                     pretrain_settings=PretrainSettings(**kw), device=device,
                     vae_from=None if train_vae else COMMITTED)
    print(f"PRETRAIN {json.dumps({'out': str(out), 'settings': kw, 's': round(time.time() - t)})}",
          flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=str(COMMITTED))
    ap.add_argument("--pretrain")
    ap.add_argument("--train_vae", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--star")
    ap.add_argument("--n_trigger", type=int, default=6)
    ap.add_argument("--n_plain", type=int, default=6)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--grids", default="")
    a = ap.parse_args()
    if a.star:
        shapes.PURPLE = tuple(int(x) for x in a.star.split(","))
    model = pretrain(Path(a.pretrain), a.device, a.set, a.train_vae) if a.pretrain \
        else Path(a.model)
    loaded = lr.load(model, device=a.device)
    pf = lr.prompt_following(model, n=24, seed=0, loaded=loaded)
    nf = lr.nested_following(model, n=24, seed=0, loaded=loaded)
    print("BASE " + json.dumps({"model": str(model),
                                "single": {k: pf[k] for k in ("background", "colour", "shape")},
                                "nested": {k: nf[k] for k in ("centre", "circle", "background",
                                                              "all")}}), flush=True)
    if a.grids:
        lr.write_grid(Path(a.grids) / "base.png", [("single", pf["images"][:6]),
                                                    ("single", pf["images"][6:12]),
                                                    ("nested", nf["images"][:6]),
                                                    ("nested", nf["images"][6:12])])
    for spec in a.runs:
        name, *extra = shlex.split(spec)
        for seed in [int(s) for s in a.seeds.split(",")]:
            tmp = Path(tempfile.mkdtemp())
            mdd.make_dataset(tmp / "data", size=32, seed=seed)
            reg = []
            if "reg" in name:
                mdd.make_reg_images(tmp / "reg", seed=seed)
                reg = ["--reg_data_dir", str(tmp / "reg")]
            t = time.time()
            rc = train_network.main([
                "--config_file", str(ROOT / "configs/examples/tiny_demo.toml"),
                "--pretrained_model_name_or_path", str(model),
                "--train_data_dir", str(tmp / "data"), "--output_dir", str(tmp / "out"),
                "--logging_dir", str(tmp / "logs"), "--sample_every_n_steps", "100000",
                "--save_every_n_steps", "100000", "--seed", str(seed), *reg, *extra])
            train_s = time.time() - t
            if rc != 0:
                print(json.dumps({"spec": spec, "seed": seed, "rc": rc}), flush=True)
                continue
            e = lr.lora_effect(model, tmp / "out" / "zorblat.safetensors",
                               n_trigger=a.n_trigger, n_plain=a.n_plain,
                               seed=1000 + 100 * seed, device=a.device)
            from tools import measure
            layouts = {k: ["/".join(dataclasses.astuple(measure.read_layout(im)))
                           for im in e.images[k]] for k in ("base_trigger", "lora_trigger")}
            print("RESULT " + json.dumps({
                "spec": spec, "seed": seed, "train_s": round(train_s, 1),
                "before": e.concept_before, "after": e.concept_after,
                "plain_diff": round(e.plain_diff, 4), "unrelated": round(e.unrelated_diff, 4),
                "agree": e.plain_agreement, "layouts": layouts}), flush=True)
            if a.grids:
                lr.before_after_grid(e, Path(a.grids) / f"{name}-s{seed}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
