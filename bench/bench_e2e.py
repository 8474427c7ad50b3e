#!/usr/bin/env python
"""End-to-end benchmark: one whole training run of train_network.py, timed from outside.

Issue 11: time to first step for SDXL (weights on local disk, caches built, compile
included) <= 60 s; a whole 1500-step SDXL batch-1 run on 30 images (load, caching, compile,
training, saves) timed end to end. The real CLI runs as a subprocess; reported: wall time
from its start to its exit; time to first step (wall_time of the first `loss/current`
TensorBoard event minus the start); the last step's time; steady images/s over the last 80%
of step events (the step saves fall inside, as in a real run); peak GPU memory; and setup
phases, from when the trainer's own log lines ("Data plan", "LoRA on", "latent cache:",
"text-encoder cache:") arrive on the pipe.

`--build sd15|sdxl` writes a full-size diffusers folder with random weights (speed does not
depend on the values) from configs/models/<family>/, built on the GPU when there is one, saved
as fp16 safetensors; an existing folder is reused unless `--rebuild`. No full-size CLIP
tokenizer ships with the repo and the GPU machine has no network, so the tokenizer of
models/tiny-sd15-pretrained is copied as `tokenizer` (and `tokenizer_2` for SDXL): its
word-level ids are < 905, valid in the 49408-entry CLIP embedding, and captions are padded
to 77 tokens either way, so text encoding costs the same. `--tiny` uses `--model_dir` as it
is. The dataset: `--images` pictures of coloured shapes (tools/shapes.py, drawn at <= 256 px,
scaled to `--resolution`) with captions, in a kohya `1_subject person` folder.

The reference is not run here: its whole-run time is extrapolated from bench/bench_step.py
(its step rate times the steps, plus its build-to-first-step time).

Device command lines (arguments after `--` go to train_network.py unchanged):

    python3 bench/bench_e2e.py --build sdxl --max_train_steps 1500 --variant fast -- --cuda_graphs
    python3 bench/bench_e2e.py --build sdxl --variant eager --json $OUT/e2e-sdxl-eager.json
    python3 bench/bench_e2e.py --build sdxl --max_train_steps 1500 --variant compile \
        --json $OUT/e2e-sdxl-compile.json -- --set training.compile=true

CPU smoke test:

    python bench/bench_e2e.py --tiny --model_dir models/tiny-sd15-pretrained --family sd15 \
        --resolution 32 --images 6 --max_train_steps 20
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TINY = REPO / "models" / "tiny-sd15-pretrained"
# (phase that ends when the line arrives, text of the trainer's line), in the trainer's order
MARKERS = [("imports + config + data scan", "Data plan"),
           ("model load + LoRA attach", "LoRA on "), ("latent cache", "latent cache:"),
           ("text-encoder cache", "text-encoder cache:")]


def build_model(family: str, out: Path) -> float:
    """Full-size random-weight diffusers folder for `family` under `out`; seconds taken."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    src, t0 = REPO / "configs" / "models" / family, time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    parts = [("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
             ("text_encoder", CLIPTextModel)]
    if family == "sdxl":
        parts.append(("text_encoder_2", CLIPTextModelWithProjection))
    for name, cls in parts:
        te = name.startswith("text_encoder")
        with torch.device(device):
            model = cls(CLIPTextConfig.from_pretrained(src / name)) if te else \
                cls.from_config(cls.load_config(src / name))
        # transformers writes safetensors by default (v5 has no safe_serialization argument)
        model.to(torch.float16).save_pretrained(
            out / name, **({} if te else {"safe_serialization": True}))
        del model
        print(f"built {name} ({time.time() - t0:.0f} s)", flush=True)
    if device == "cuda":  # give the cached blocks back before the trainer starts
        torch.cuda.empty_cache()
    shutil.copytree(src / "scheduler", out / "scheduler")
    for tok in ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else []):
        shutil.copytree(TINY / "tokenizer", out / tok)  # see the module docstring
    shutil.copy(src / "model_index.json", out / "model_index.json")
    return time.time() - t0


def check_folder(model_dir: Path) -> str:
    """The trainer's own pre-flight recognises the folder; returns the family name."""
    from library.models.loading import check_weights_present, detect_family, \
        resolve_model_path
    path = resolve_model_path(str(model_dir))
    fam = detect_family(path)
    check_weights_present(path, fam)
    return fam.name


def make_dataset(root: Path, count: int, reso: int, seed: int = 0) -> Path:
    from PIL import Image

    from tools.shapes import draw_scene, random_scene
    if root.exists():
        shutil.rmtree(root)
    sub = root / "1_subject person"
    sub.mkdir(parents=True)
    rng, base = random.Random(seed), min(reso, 256)
    for i in range(count):
        scene = random_scene(rng, base)
        img = draw_scene(scene, base)
        if base != reso:
            img = img.resize((reso, reso), Image.BICUBIC)
        img.save(sub / f"{i:03d}.png")
        (sub / f"{i:03d}.txt").write_text(f"subject person, {scene.caption}")
    return root


def write_config(path: Path, a, model_dir: Path, data: Path, out: Path, logs: Path,
                 mixed_precision: str) -> None:
    q = json.dumps  # a TOML basic string is a JSON string
    path.write_text(f"""[model]
pretrained_model_name_or_path = {q(str(model_dir))}
[dataset]
train_data_dir = {q(str(data))}
resolution = {a.resolution}
train_batch_size = {a.batch}
cache_latents = true
cache_text_encoder_outputs = true
[training]
max_train_steps = {a.max_train_steps}
mixed_precision = "{mixed_precision}"
seed = {a.seed}
[lora]
network_dim = 32
network_train_unet_only = true
[optimizer]
optimizer_type = "AdamW"
learning_rate = 1e-4
[saving]
output_dir = {q(str(out))}
output_name = "e2e"
save_every_n_steps = {a.save_every_n_steps}
overwrite = true
[logging]
logging_dir = {q(str(logs))}
log_tracker_name = "run"
""")  # [sample] is left out: no sample_prompts, no sampling


def run_trainer(cmd: list[str], log_path: Path) -> tuple[float, float, int, dict]:
    """Run `cmd`, stamping each output line; (start time, seconds to exit, rc, marks)."""
    marks: dict[str, float] = {}
    last_echo = 0.0
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    with open(log_path, "w") as log:
        for line in proc.stdout:  # text mode: tqdm's \r updates arrive as lines too
            now, line = time.time(), line.rstrip()
            if not line:
                continue
            log.write(f"{now - t0:9.3f} {line}\n")
            for phase, text in MARKERS:
                if text in line and phase not in marks:
                    marks[phase] = now - t0
            progress = line.startswith("steps:")
            if not progress or now - last_echo > 10:  # the progress bar every 10 s
                print(f"[{now - t0:7.1f} s] {line}", flush=True)
                last_echo = now if progress else last_echo
    rc = proc.wait()
    return t0, time.time() - t0, rc, marks


def read_events(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})  # keep every event
    acc.Reload()
    tags = acc.Tags()["scalars"]
    return {t: acc.Scalars(t) for t in ("loss/current", "perf/peak_gpu_gib") if t in tags}


def measure(a, t0: float, exit_s: float, marks: dict, events: dict) -> dict:
    steps = events.get("loss/current", [])
    row = {"steps": len(steps), "wall_s": exit_s}
    if not steps:
        return row
    wall = [e.wall_time - t0 for e in steps]
    row.update(first_step_s=wall[0], last_step_s=wall[-1], train_s=wall[-1] - wall[0],
               tail_s=exit_s - wall[-1])
    i0 = len(wall) - max(2, math.ceil(0.8 * len(wall)))
    if i0 >= 0 and wall[-1] > wall[i0]:
        n = steps[-1].step - steps[i0].step
        row["steady_images_per_s"] = n * a.batch / (wall[-1] - wall[i0])
        row["steady_step_ms"] = 1000 * (wall[-1] - wall[i0]) / n
    if "perf/peak_gpu_gib" in events:
        row["peak_gpu_gib"] = events["perf/peak_gpu_gib"][-1].value
    # phases: each ends at its marker; then step 1, steps 2..N, final save + exit
    ends = [(p, marks[p]) for p, _ in MARKERS if p in marks]
    ends += [("first step (compile / graph capture)", wall[0]),
             (f"steps 2..{steps[-1].step}", wall[-1]), ("final save + exit", exit_s)]
    prev, row["phases"] = 0.0, {}
    for phase, end in ends:
        row["phases"][phase] = end - prev
        prev = end
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--build", choices=("sd15", "sdxl"), help="random full-size model")
    how.add_argument("--tiny", action="store_true", help="use --model_dir as it is")
    ap.add_argument("--family", choices=("sd15", "sdxl"), help="default: --build / detected")
    ap.add_argument("--model_dir", help="default /tmp/e2e-<family>")
    ap.add_argument("--rebuild", action="store_true", help="rebuild an existing --model_dir")
    ap.add_argument("--work_dir", default="/tmp/e2e-run", help="dataset, outputs, logs")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--resolution", type=int, help="default 1024 sdxl, 512 sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max_train_steps", type=int, default=1500)
    ap.add_argument("--save_every_n_steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", default="default", help="name of this run in the JSON row")
    ap.add_argument("--json", help="write {env, rows: [row]} here")
    a = ap.parse_args(argv)
    if a.tiny and not a.model_dir:
        ap.error("--tiny needs --model_dir")
    import torch
    cuda = torch.cuda.is_available()
    family = a.build or a.family
    model_dir = Path(a.model_dir or f"/tmp/e2e-{family}").resolve()
    build_s = None
    if a.build and (a.rebuild or not (model_dir / "model_index.json").is_file()):
        build_s = build_model(a.build, model_dir)
    detected = check_folder(model_dir)
    family = family or detected
    if detected != family:
        ap.error(f"{model_dir} holds a {detected} model, not {family}")
    a.resolution = a.resolution or (1024 if family == "sdxl" else 512)
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = make_dataset(work / "data", a.images, a.resolution, a.seed)
    out, logs, cfg_path = work / "out", work / "logs", work / "e2e.toml"
    for old in (out, logs):
        shutil.rmtree(old, ignore_errors=True)
    write_config(cfg_path, a, model_dir, data, out, logs, "bf16" if cuda else "no")
    cmd = [sys.executable, "train_network.py", "--config_file", str(cfg_path), *extra]
    print("$ " + " ".join(cmd), flush=True)
    t0, exit_s, rc, marks = run_trainer(cmd, work / "train.log")
    events = read_events(logs / "run") if (logs / "run").is_dir() else {}
    row = {"variant": a.variant, "family": family, "resolution": a.resolution,
           "images": a.images, "batch": a.batch, "max_train_steps": a.max_train_steps,
           "extra_args": extra, "rc": rc, "build_s": build_s,
           "saves": len(list(out.glob("*.safetensors"))) if out.is_dir() else 0,
           **measure(a, t0, exit_s, marks, events)}
    print(f"\n{a.variant}: {family} {a.resolution}px, {a.images} images, batch {a.batch}, "
          f"rc {rc}, {row['steps']} steps, {row['saves']} LoRA files")
    for phase, s in row.get("phases", {}).items():
        print(f"  {phase:<40} {s:9.2f} s")
    for key, unit in [("first_step_s", "s"), ("last_step_s", "s"), ("wall_s", "s"),
                      ("steady_images_per_s", "images/s"), ("steady_step_ms", "ms"),
                      ("peak_gpu_gib", "GiB")]:
        if key in row:
            print(f"  {key:<40} {row[key]:9.2f} {unit}")
    if a.json:
        env = {"device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "date": dt.date.today().isoformat()}
        Path(a.json).write_text(json.dumps({"env": env, "rows": [row]}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
