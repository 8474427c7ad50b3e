#!/usr/bin/env python
"""Compare training variants of the demo LoRA on the tiny model, several seeds each.

    python tools/compare_variants.py --seeds 0 1 2 --jobs 8 --out variants.json

Each (variant, seed) trains `configs/examples/tiny_demo.toml` through `train_network.py`
(a subprocess, so runs go in parallel) on the demo dataset made with that seed, with the
variant's flags on top, then measures the LoRA against the base model with
tools/learning_report.lora_effect (docs/TINY_MODEL.md): learned concept, the mean absolute
pixel difference of plain prompts from the base, and the share of plain samples whose
measured reading is unchanged. Prints a markdown table of the means (and the per-seed
figures) and writes every figure to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = "configs/examples/tiny_demo.toml"
MODEL = "models/tiny-sd15-pretrained"

# name -> (flags on top of the demo config, what it tests). The demo config itself trains
# with regularization images, uniform timesteps and no EMA: "plain".
NO_REG = ["--reg_data_dir", ""]
VARIANTS: dict[str, tuple[list[str], str]] = {
    "plain": ([], "the demo config: reg images, uniform timesteps"),
    "ema": (["--ema_decay", "0.99"], "plain + EMA of the LoRA weights (decay 0.99)"),
    "neither": (NO_REG, "no reg images, no preservation"),
    "preservation": (NO_REG + ["--preservation_weight", "1.0"],
                     "no reg images, preservation_weight 1 (class prompt: trigger -> 'toy')"),
    "preservation_w4": (NO_REG + ["--preservation_weight", "4.0"],
                        "no reg images, preservation_weight 4"),
    "logit_normal": (["--timestep_sampling", "logit_normal"], "plain, logit_normal(0, 1)"),
    "mode": (["--timestep_sampling", "mode"], "plain, mode (scale 1.29)"),
    "sigmoid": (["--timestep_sampling", "sigmoid", "--sigmoid_scale", "2.0"],
                "plain, sigmoid (scale 2)"),
    "shift": (["--timestep_sampling", "shift"], "plain, shift (sigmoid scale 1, shift 3)"),
    "cosmap": (["--timestep_sampling", "cosmap"], "plain, cosmap"),
}


def make_data(work: Path, seed: int) -> tuple[Path, Path]:
    from tools.make_demo_dataset import make_dataset, make_reg_images
    data, reg = work / f"data-s{seed}" / "data", work / f"data-s{seed}" / "reg"
    if not data.exists():
        make_dataset(data, size=32, seed=seed)
        make_reg_images(reg, size=32, seed=seed)
    return data, reg


def train_command(variant: str, seed: int, data: Path, reg: Path, out: Path, steps: int,
                  model: str) -> list[str]:
    flags = VARIANTS[variant][0]
    base = [sys.executable, str(ROOT / "train_network.py"), "--config_file", CONFIG,
            "--pretrained_model_name_or_path", model, "--train_data_dir", str(data),
            "--reg_data_dir", "" if "--reg_data_dir" in flags else str(reg),
            "--output_dir", str(out / "out"),
            "--logging_dir", str(out / "logs"), "--sample_every_n_steps", "100000",
            "--save_every_n_steps", "100000", "--seed", str(seed),
            "--max_train_steps", str(steps), "--overwrite"]
    return base + [f for i, f in enumerate(flags) if f != "--reg_data_dir" and
                   (i == 0 or flags[i - 1] != "--reg_data_dir")]


def run_one(job: dict) -> dict:
    """Train one (variant, seed) and measure it; runs in a worker process."""
    import torch
    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    if job["device"] == "cpu":  # train on the CPU too: many tiny runs share one GPU badly
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.time()
    with open(out / "train.log", "w") as log:
        rc = subprocess.run(job["cmd"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    trained = time.time() - started
    result = {"variant": job["variant"], "seed": job["seed"], "rc": rc,
              "train_s": round(trained, 1)}
    if rc != 0:
        result["log_tail"] = (out / "train.log").read_text()[-2000:]
        return result
    from tools.learning_report import lora_effect, prediction_shift
    lora = out / "out" / "zorblat.safetensors"
    shift = prediction_shift(job["model"], lora, device=job["device"])
    e = lora_effect(job["model"], out / "out" / "zorblat.safetensors",
                    n_trigger=job["n"], n_plain=job["n"], seed=1000 + 100 * job["seed"],
                    device=job["device"])
    result.update(concept_before=e.concept_before, concept_after=e.concept_after,
                  plain_diff=e.plain_diff, unrelated_diff=e.unrelated_diff,
                  plain_agreement=e.plain_agreement, n=job["n"],
                  shift_plain=shift["plain"], shift_class=shift["class"],
                  measure_s=round(time.time() - started - trained, 1))
    return result


def summarise(results: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for v in variants:
        rs = sorted((r for r in results if r["variant"] == v and r["rc"] == 0),
                    key=lambda r: r["seed"])
        if not rs:
            rows.append({"variant": v, "runs": 0})
            continue
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        rows.append({"variant": v, "runs": len(rs), "seeds": [r["seed"] for r in rs],
                     **{k: mean(k) for k in ("concept_before", "concept_after", "plain_diff",
                                             "unrelated_diff", "plain_agreement", "shift_plain",
                                             "shift_class")},
                     "per_seed": {k: [r[k] for r in rs] for k in
                                  ("concept_after", "plain_diff", "plain_agreement",
                                   "shift_plain")}})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | learned concept (per seed) | plain difference (unrelated) | "
             "readings unchanged (per seed) | prediction shift, plain (class) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if not r["runs"]:
            lines.append(f"| {r['variant']} | failed | | | |")
            continue
        pct = lambda xs: " / ".join(f"{x:.0%}" for x in xs)  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['concept_after']:.0%} ({pct(r['per_seed']['concept_after'])})"
            f" | {r['plain_diff']:.3f} ({r['unrelated_diff']:.3f}) | "
            f"{r['plain_agreement']:.0%} ({pct(r['per_seed']['plain_agreement'])}) | "
            f"{r['shift_plain']:.4f} ({r['shift_class']:.4f}) |")
    return "\n".join(lines)


def print_recorded(files: list[str], variants: list[str]) -> int:
    """The table of runs recorded earlier (several batches, e.g. seeds on separate calls)."""
    results = []
    for name in files:
        try:
            lines = Path(name).read_text().splitlines()
        except OSError as e:
            print(f"--summarise: cannot read {name}: {e.strerror}", file=sys.stderr)
            return 2
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"--summarise: {name} line {i} is not a JSON run record", file=sys.stderr)
                return 2
    seen = {r.get("variant") for r in results}
    print(markdown(summarise(results, [v for v in variants if v in seen])))
    print(f"\n{len(results)} runs from {', '.join(files)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help=f"which variants (default all: {', '.join(VARIANTS)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="training steps (the demo's 300)")
    ap.add_argument("--n", type=int, default=12, help="trigger and plain samples per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    ap.add_argument("--device", default="cpu", help="cpu: train and measure on the CPU "
                    "(default; hides the GPUs from the runs); cuda: training and measurement "
                    "on the GPU (14 parallel tiny runs on one H100 trained slower than the "
                    "CPU does)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--work", default="variants", help="folder for datasets and runs")
    ap.add_argument("--out", default=None, help="JSON file for every figure")
    ap.add_argument("--summarise", nargs="+", metavar="JSONL", default=None,
                    help="train nothing: print the table of the runs recorded in these "
                    "files (the .jsonl that --out writes beside it, one run per line)")
    a = ap.parse_args(argv)
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        print(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if a.summarise:
        return print_recorded(a.summarise, a.variants)
    os.chdir(ROOT)
    work = Path(a.work).resolve()
    jobs = []
    for seed in a.seeds:
        data, reg = make_data(work, seed)
        for v in a.variants:
            out = work / f"{v}-s{seed}"
            jobs.append({"variant": v, "seed": seed, "out": str(out), "threads": a.threads,
                         "model": a.model, "n": a.n, "device": a.device,
                         "cmd": train_command(v, seed, data, reg, out, a.steps, a.model)})
    started = time.time()
    import multiprocessing
    from concurrent.futures import as_completed
    partial = Path(a.out).with_suffix(".jsonl") if a.out else None
    if partial:
        partial.write_text("")
    results = []
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        for fut in as_completed([ex.submit(run_one, j) for j in jobs]):
            r = fut.result()
            results.append(r)
            if partial:  # every finished run at once, so a cut-off batch keeps its figures
                with open(partial, "a") as f:
                    f.write(json.dumps(r) + "\n")
            state = "failed" if r["rc"] else \
                f"concept {r['concept_after']:.0%}, diff {r['plain_diff']:.3f}, " \
                f"unchanged {r['plain_agreement']:.0%}"
            print(f"{r['variant']} seed {r['seed']}: {state} ({r['train_s']} s training, "
                  f"{time.time() - started:.0f} s since start)", flush=True)
            if r["rc"]:
                print(r.get("log_tail", ""), file=sys.stderr)
    rows = summarise(results, a.variants)
    table = markdown(rows)
    print(f"\n{table}\n\n{len(jobs)} runs in {time.time() - started:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({
            "args": vars(a), "variants": {v: VARIANTS[v][1] for v in a.variants},
            "results": results, "summary": rows, "markdown": table}, indent=1))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
