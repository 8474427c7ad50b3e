#!/usr/bin/env python
"""Whole-run benchmark of a user's own config, as written: tomlora with no speed keys (its
default path) against the diffusers-style reference run (bench/reference_run.py), in one
process tree on one GPU.

- `--config seed`: configs/examples/seed_002_sdxl.toml word for word (full-size SDXL with
  random weights, 1024 px, gradient checkpointing, fp16, AdamW8bit, batch 1 x accumulation 4,
  rank 64 / alpha 32, text encoders trained, cosine_with_restarts with 100 warm-up steps).
- `--config sd15`: bench/configs/sd15_kohya.toml (SD1.5 512 px, batch 2, fp16, AdamW8bit,
  rank 32, text encoder trained).

Only the paths are changed (model, the fp16-fix VAE folder, data, output, sample prompts),
plus `--max_train_steps` and `--sample_every_n_steps` (= steps / 2: two sample rounds of the
seed's 4 prompts, DDIM 30 steps at the native resolution). The model is the full-size random
folder of bench/bench_e2e.py (`--build`); the dataset its coloured shapes in a kohya folder.

Per run: the wall clock from process start to exit; images/s of the training phase, i.e.
optimizer steps 2..N without the intervals that hold a sample round (tomlora: from the
TensorBoard step events; the reference times its own steps the same way); peak GPU memory of
training (torch.cuda.max_memory_allocated at the last step, before the final sample round).

    python3 bench/bench_seed.py --config seed --steps 25 --json $OUT/seed-sdxl.json
    python3 bench/bench_seed.py --config sd15 --steps 100 --json $OUT/seed-sd15.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_e2e import build_model, make_dataset, read_events, run_trainer  # noqa: E402

CONFIGS = {  # name: (config file, family, model path in the file, VAE path in the file)
    "seed": (REPO / "configs" / "examples" / "seed_002_sdxl.toml", "sdxl",
             "./models/stable-diffusion-xl-base-1.0",
             "./models/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors"),
    "sd15": (REPO / "bench" / "configs" / "sd15_kohya.toml", "sd15",
             "./models/stable-diffusion-v1-5", None),
}
PROMPTS = REPO / "configs" / "examples" / "seed_002_sample_prompts.txt"


def rewrite(text: str, swaps: dict[str, str]) -> str:
    for old, new in swaps.items():
        assert old in text, f"{old} not in the config"
        text = text.replace(f'"{old}"', json.dumps(new))
    return text


def ours_row(events: dict, t0: float, exit_s: float, sample_every: int, images_per_step: int,
             peak_key: str = "perf/peak_gpu_gib") -> dict:
    steps = events.get("loss/current", [])
    wall = {e.step: e.wall_time - t0 for e in steps}
    spans = [wall[s] - wall[s - 1] for s in sorted(wall) if s >= 2 and s - 1 in wall
             and (s - 1) % sample_every]  # the interval after step k holds k's sample round
    row = {"variant": "tomlora default", "steps": len(steps), "wall_s": exit_s,
           "first_step_s": min(wall.values()) if wall else None}
    if spans:
        row["train_images_per_s"] = images_per_step * len(spans) / sum(spans)
        row["step_s"] = sum(spans) / len(spans)
    if peak_key in events:
        row["train_peak_gib"] = events[peak_key][-1].value
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--work_dir", default="/tmp/seed-bench")
    ap.add_argument("--kinds", default="ours,reference")
    ap.add_argument("--json")
    ap.add_argument("--model_dir", help="an existing model folder (default: build one)")
    a = ap.parse_args(argv)
    import torch
    cfg_file, family, model_key, vae_key = CONFIGS[a.config]
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    reso = 1024 if family == "sdxl" else 512
    model = Path(a.model_dir) if a.model_dir else work / f"model-{family}"
    build_s = None
    if not (model / "model_index.json").is_file():
        build_s = build_model(family, model)
    vae_dir = None
    if vae_key:  # the seed's separate fp16-fix VAE: the random model's VAE, in its own folder
        vae_dir = work / "sdxl-vae-fp16-fix"
        if not vae_dir.is_dir():
            shutil.copytree(model / "vae", vae_dir)
    data = make_dataset(work / "training_data", a.images, reso)
    prompts = work / "sample_prompts.txt"
    shutil.copy(PROMPTS, prompts)
    sample_every = max(1, a.steps // 2)
    kinds = a.kinds.split(",")
    accum = 4 if a.config == "seed" else 1
    batch = 1 if a.config == "seed" else 2
    rows = []
    for kind in kinds:
        out = work / f"out-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        if kind == "ours":
            swaps = {model_key: str(model), "./output": str(out),
                     "./sample_prompts.txt": str(prompts)}
            if vae_key:
                swaps[vae_key] = str(vae_dir / "diffusion_pytorch_model.safetensors")
            cfg = work / f"{a.config}.toml"
            cfg.write_text(rewrite(cfg_file.read_text(), swaps))
            logs = work / "logs"
            shutil.rmtree(logs, ignore_errors=True)
            cmd = [sys.executable, "train_network.py", "--config_file", str(cfg),
                   "--train_data_dir", str(data), "--logging_dir", str(logs),
                   "--log_with", "tensorboard", "--log_tracker_name", "run",
                   "--max_train_steps", str(a.steps),
                   "--sample_every_n_steps", str(sample_every), "--seed", "0"]
            print("$ " + " ".join(cmd), flush=True)
            t0, exit_s, rc, _ = run_trainer(cmd, work / f"train-{kind}.log")
            events = read_events(logs / "run") if (logs / "run").is_dir() else {}
            row = {**ours_row(events, t0, exit_s, sample_every, batch * accum), "rc": rc}
            speed = [ln for ln in (work / f"train-{kind}.log").read_text().splitlines()
                     if "speed:" in ln]
            row["speed_line"] = speed[0].split("INFO ", 1)[-1] if speed else None
        else:
            js = work / "reference.json"
            cmd = [sys.executable, "bench/reference_run.py", "--model_dir", str(model),
                   "--data_dir", str(data), "--family", family, "--resolution", str(reso),
                   "--batch", str(batch), "--accum", str(accum), "--steps", str(a.steps),
                   "--sample_every", str(sample_every), "--prompts", str(prompts),
                   "--out", str(out), "--json", str(js), "--train_te"]
            cmd += (["--rank", "64", "--alpha", "32", "--warmup", "100", "--checkpointing",
                     "--vae", str(vae_dir)] if a.config == "seed" else
                    ["--rank", "32", "--alpha", "16", "--warmup", "50", "--lr_scheduler",
                     "cosine"])
            print("$ " + " ".join(cmd), flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO)
            row = {"wall_s": time.time() - t0, "rc": proc.returncode}
            if js.is_file():
                row.update(json.loads(js.read_text()))
        row.update(kind=kind, config=a.config, steps_asked=a.steps, images_per_step=batch * accum)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["kind"]: r for r in rows}
    if "ours" in by and "reference" in by:
        o, r = by["ours"], by["reference"]
        for key in ("train_images_per_s", "wall_s"):
            if o.get(key) and r.get(key):
                ratio = o[key] / r[key] if key != "wall_s" else r[key] / o[key]
                print(f"{key}: ours {o[key]:.2f}, reference {r[key]:.2f}: {ratio:.2f}x")
        if o.get("train_peak_gib") and r.get("train_peak_gib"):
            print(f"train peak GiB: ours {o['train_peak_gib']:.2f}, reference "
                  f"{r['train_peak_gib']:.2f}")
    if a.json:
        env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "date": dt.date.today().isoformat(),
               "build_s": build_s}
        Path(a.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
