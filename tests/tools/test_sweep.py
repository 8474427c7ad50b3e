"""tools/sweep.sh end to end on the tiny SD1.5 model: a 2x2 sweep of real trainings (run once
per module), its summary against the runs' own TensorBoard events, the comparison grid, the
re-run that skips finished runs, a failing run, and Ctrl-C."""
from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image

from library.sweep.grid import PAD
from tools.make_demo_dataset import make_dataset

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ["bash", str(ROOT / "tools" / "sweep.sh")]
RUNS = ["network_dim=2__learning_rate=1e-3", "network_dim=2__learning_rate=2e-3",
        "network_dim=4__learning_rate=1e-3", "network_dim=4__learning_rate=2e-3"]


def sweep(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def tb_scalars(run_logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_sd15_dir) -> dict:
    """A base config (paths with spaces), 2 images, 2 sample prompts of one step each."""
    root = tmp_path_factory.mktemp("sweep")
    data = root / "data set"
    make_dataset(data, count=2, size=64, seed=0, repeats=1)
    prompts = root / "prompts.txt"
    prompts.write_text("zorblat, a purple star --w 64 --h 64 --s 1 --d 1\n"
                       "a blue square --w 64 --h 64 --s 1 --d 2\n", encoding="utf-8")
    base = root / "base config.toml"
    base.write_text(tomli_w.dumps({
        "model": {"pretrained_model_name_or_path": str(tiny_sd15_dir)},
        "dataset": {"train_data_dir": str(data), "resolution": 64, "train_batch_size": 1},
        "training": {"max_train_steps": 2, "seed": 0, "mixed_precision": "no"},
        "lora": {"network_dim": 2},
        "optimizer": {"learning_rate": 1e-3, "lr_scheduler": "constant"},
        "sample": {"sample_every_n_steps": 2, "sample_prompts": str(prompts)},
        "saving": {"output_name": "t"}}), encoding="utf-8")
    return {"root": root, "base": base}


@pytest.fixture(scope="module")
def grid_sweep(env) -> dict:
    """The 2x2 sweep: four trainings, run once for the module."""
    out = env["root"] / "swéep runs" / "2x2"
    r = sweep(str(env["base"]), "network_dim=2,4", "learning_rate=1e-3,2e-3", "--out", str(out))
    # Read now: later tests run more sweeps into the same folder.
    summary = read_csv(out / "sweep_summary.csv") if r.returncode == 0 else []
    return {"out": out, "result": r, "rows": summary,
            "md": (out / "sweep_summary.md").read_text(encoding="utf-8") if summary else ""}


def test_four_runs_and_the_summary_matches_their_tensorboard(grid_sweep):
    out, r = grid_sweep["out"], grid_sweep["result"]
    assert r.returncode == 0, r.stdout + r.stderr
    rows = grid_sweep["rows"]
    assert [row["run"] for row in rows] == RUNS
    assert [(row["network_dim"], row["learning_rate"]) for row in rows] == [
        ("2", "1e-3"), ("2", "2e-3"), ("4", "1e-3"), ("4", "2e-3")]
    for row in rows:
        run_dir = out / row["run"]
        assert row["status"] == "done" and row["exit_code"] == "0"
        assert Path(row["output"]) == run_dir / "t.safetensors" and (run_dir / "t.safetensors"
                                                                    ).is_file()
        assert Path(row["log"]) == run_dir / "train.log" and (run_dir / ".done").is_file()
        avg = tb_scalars(out / "logs" / row["run"], "loss/average")
        assert float(row["loss_average"]) == pytest.approx(avg[-1][1], rel=1e-12)
        assert int(row["steps"]) == avg[-1][0] == 2
        assert row["loss_validation"] == "n/a" and row["peak_gpu_gib"] == "n/a"  # CPU
        assert float(row["wall_s"]) > 0 and float(row["peak_rss_gib"]) > 0
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(RUNS)
    md = grid_sweep["md"].splitlines()
    assert md[0].startswith("| run | network_dim | learning_rate | status |")
    assert len([line for line in md if line.startswith("| network_dim=")]) == 4
    losses = {float(row["loss_average"]) for row in rows}
    assert len(losses) > 1 and all(math.isfinite(v) for v in losses)


def test_grid_shows_each_runs_last_samples_in_prompt_order(grid_sweep):
    out = grid_sweep["out"]
    grid = np.asarray(Image.open(out / "sweep_grid.png").convert("RGB"))
    cell, cols = 64, 2
    row_h = cell + PAD
    assert grid.shape[0] == 4 * row_h + PAD
    label_w = grid.shape[1] - cols * (cell + PAD)
    for r, run in enumerate(RUNS):
        for c in range(cols):
            sample = np.asarray(Image.open(
                out / run / "sample" / f"t_s000002_e001_{c:02d}.png").convert("RGB"))
            x, y = label_w + c * (cell + PAD), PAD + r * row_h
            assert np.array_equal(grid[y:y + cell, x:x + cell], sample), (run, c)


def test_rerun_skips_finished_runs(grid_sweep, env):
    out = grid_sweep["out"]
    assert grid_sweep["result"].returncode == 0
    before = grid_sweep["rows"]
    watched = [p for run in RUNS for p in (out / run / "train.log", out / run / "t.safetensors")]
    watched += list((out / "logs").rglob("events.*"))
    mtimes = {p: p.stat().st_mtime_ns for p in watched}
    r = sweep(str(env["base"]), "network_dim=2,4", "learning_rate=1e-3,2e-3", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done earlier, skipped") == 4
    after = read_csv(out / "sweep_summary.csv")
    assert [row["status"] for row in after] == ["skipped-done"] * 4
    assert {p: p.stat().st_mtime_ns for p in watched} == mtimes
    keep = ("loss_average", "steps", "wall_s", "peak_rss_gib", "output")
    assert [[row[k] for k in keep] for row in after] == [[row[k] for k in keep]
                                                         for row in before]


def test_failed_run_is_recorded_and_the_sweep_goes_on(grid_sweep, env):
    """A model folder without model_index.json passes config validation (the path is only
    checked when the run starts) and fails at run time with exit 2. The sweep TOML lists it
    first, then the 2x2 runs as explicit [[runs]]: the same names and resolved configs as
    the command-line product, so the sweep goes on to them and finds them done."""
    out = grid_sweep["out"]
    assert grid_sweep["result"].returncode == 0
    empty = env["root"] / "not a model"
    empty.mkdir()
    spec = env["root"] / "sweep.toml"
    grid = [{"network_dim": d, "learning_rate": lr} for d in (2, 4) for lr in ("1e-3", "2e-3")]
    spec.write_text(tomli_w.dumps({
        "base": env["base"].name, "out": str(out),
        "runs": [{**grid[0], "model": {"pretrained_model_name_or_path": str(empty)}}, *grid]}),
        encoding="utf-8")
    r = sweep(str(spec))
    assert r.returncode == 1, r.stdout + r.stderr
    failed, *others = read_csv(out / "sweep_summary.csv")
    assert failed["status"] == "failed" and failed["exit_code"] == "2"
    assert failed["model.pretrained_model_name_or_path"] == str(empty)
    assert failed["log"] == str(out / failed["run"] / "train.log")
    assert "Model error" in Path(failed["log"]).read_text(encoding="utf-8")
    assert not (out / failed["run"] / ".done").exists()
    assert [row["run"] for row in others] == RUNS
    assert [row["status"] for row in others] == ["skipped-done"] * 4
    assert all(row["model.pretrained_model_name_or_path"] == "" for row in others)
    # after the failure the loop went on through the remaining runs
    assert r.stdout.index(": failed (exit 2") < r.stdout.index(f"[5/5] {RUNS[-1]}: done earlier")


def test_ctrl_c_stops_the_current_run_and_writes_the_summary(env):
    out = env["root"] / "interrupted"
    # Many steps, so the first run is still going when Ctrl-C arrives.
    p = subprocess.Popen([*SWEEP, str(env["base"]), "network_dim=2,4", "--out", str(out),
                          "--", "--max_train_steps", "100000"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "network_dim=2" / "train.log"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and p.poll() is None:
        if log.is_file() and "Data plan" in log.read_text(encoding="utf-8", errors="replace"):
            break
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)  # bash exec'd python: this is the sweep itself
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 130, stdout + stderr
    first, second = read_csv(out / "sweep_summary.csv")
    assert first["status"] == "interrupted" and first["exit_code"] not in ("", "0")
    assert "SIGINT: stop" in log.read_text(encoding="utf-8")  # the child got SIGINT
    assert not (out / "network_dim=2" / ".done").exists()
    assert second["status"] == "pending" and not (out / "network_dim=4").exists()
    assert not list(out.glob(".*.tmp"))  # summaries were renamed into place


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_sweep_sh_prefers_the_repo_venv():
    text = (ROOT / "tools" / "sweep.sh").read_text()
    assert '"$REPO/.venv/bin/python"' in text and 'exec "$PY" "$REPO/tools/sweep.py" "$@"' \
        in text
    assert os.access(ROOT / "tools" / "sweep.sh", os.X_OK)
