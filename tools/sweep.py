#!/usr/bin/env python
"""Run train_network.py over a grid of config overrides and compare the runs side by side.

    bash tools/sweep.sh BASE.toml network_dim=8,16 optimizer.learning_rate=1e-4,5e-5 \\
        [--name NAME] [--out DIR] [--dry-run] [-- extra train_network.py args]
    bash tools/sweep.sh sweep.toml          # base = "...", [sweep] lists, optional [[runs]]

One run per combination (Cartesian product), each in `<out>/<run name>/` (run name from its
overrides, e.g. `network_dim=8__learning_rate=1e-4`) with its TensorBoard run
`<out>/logs/<run name>` (`tensorboard --logdir <out>/logs` overlays them). Values are split
at commas outside quotes and brackets: `resolution=[768,512],[512,768]`,
`caption_prefix="a, b",c`. Every run's config is validated before the first run (exit 2 on
any problem). Finished runs (`.done` marker and final LoRA) are skipped on re-run; a failed
run is recorded and the sweep goes on (exit 1 at the end); Ctrl-C stops the current run,
writes the summary and exits 130. Outputs: `sweep_summary.csv`, `sweep_summary.md` and,
when the runs sample images, `sweep_grid.png`. See README "Sweeps".
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.sweep.check import Planned, plan_runs  # noqa: E402
from library.sweep.grid import last_samples, make_grid  # noqa: E402
from library.sweep.plan import Sweep, build_runs, cli_axes, is_sweep_toml, \
    read_sweep_toml, swept_keys  # noqa: E402
from library.sweep.runner import Outcome, Runner, is_done, read_done, write_done  # noqa: E402
from library.sweep.summary import Row, read_scalars, write_summary  # noqa: E402
from library.sweep.values import SweepError  # noqa: E402

TRAIN = ROOT / "train_network.py"


def parse_args(argv: list[str]) -> argparse.Namespace:
    # Everything after the first `--` goes to train_network.py untouched.
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="tools/sweep.sh", allow_abbrev=False,
                                 description=__doc__.splitlines()[0])
    ap.add_argument("config", help="training config (BASE.toml) or sweep TOML")
    ap.add_argument("overrides", nargs="*", metavar="KEY=V1,V2",
                    help="key (or section.key) and its comma-separated values")
    ap.add_argument("--name", help="sweep name (default: the config's file name)")
    ap.add_argument("--out", help="sweep folder (default: sweeps/<name>)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    ns = ap.parse_intermixed_args(argv)
    ns.extra = extra
    return ns


def load_sweep(ns: argparse.Namespace) -> Sweep:
    path = Path(ns.config)
    sweep = read_sweep_toml(path) if path.is_file() and is_sweep_toml(path) else \
        Sweep(ns.config)
    sweep.axes += cli_axes(ns.overrides)
    sweep.train_args += ns.extra
    sweep.name = ns.name or sweep.name or path.stem
    sweep.out = ns.out or sweep.out or str(Path("sweeps") / sweep.name)
    return sweep


def report(kind: str, problems: list[str]) -> int:
    print(f"\n{kind} ({len(problems)} problem{'s' * (len(problems) != 1)}); no run was "
          "started:", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    return 2


def new_row(p: Planned, keys: list[str], sweep_dir: Path) -> Row:
    values = {k: "" for k in keys} | {o.key: o.label for o in p.run.overrides}
    row = Row(p.run.name, values, "pending", str(p.final), str(p.log))
    if is_done(p.dir, p.final, p.fingerprint):
        done = read_done(p.dir)
        row.status, row.exit_code = "skipped-done", done.get("exit_code")
        row.wall_s, row.peak_rss_gib = done.get("wall_s"), done.get("peak_rss_gib")
        row.scalars = read_scalars(sweep_dir / "logs" / p.run.name)
    return row


def record(row: Row, outcome: Outcome, sweep_dir: Path) -> None:
    row.status = "done" if outcome.exit_code == 0 else \
        "interrupted" if outcome.interrupted else "failed"
    row.exit_code, row.wall_s = outcome.exit_code, outcome.wall_s
    row.peak_rss_gib = outcome.peak_rss_gib
    row.scalars = read_scalars(sweep_dir / "logs" / row.run)


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_grid(planned: list[Planned], rows: list[Row], sweep_dir: Path) -> Path | None:
    """Finished runs only: a failed or pending run's folder may hold an older attempt's
    samples."""
    cells = []
    for p, row in zip(planned, rows):
        if row.status not in ("done", "skipped-done"):
            continue
        found = last_samples(p.dir / "sample", p.output_name)
        if found:
            cells.append((f"{p.run.name}  (step {found[0]})", found[1]))
    return make_grid(cells, sweep_dir / "sweep_grid.png")


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep = load_sweep(ns)
        runs = build_runs(sweep.axes)
    except SweepError as e:
        return report("Sweep error", e.problems)
    sweep_dir = Path(sweep.out)
    planned, problems, warnings = plan_runs(sweep, runs, sweep_dir)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if problems:
        return report("Configuration error", problems)
    keys = swept_keys(runs)
    rows = [new_row(p, keys, sweep_dir) for p in planned]
    n = len(planned)
    if ns.dry_run:
        print(f"sweep {sweep.name!r}: {n} run{'s' * (n != 1)} in {sweep_dir}")
        for i, (p, row) in enumerate(zip(planned, rows), 1):
            todo = "skip (done)" if row.status == "skipped-done" else "run"
            print(f"[{i}/{n}] {todo}: {p.run.name}\n    "
                  + shlex.join([sys.executable, str(TRAIN), *p.argv]))
        return 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_summary(sweep_dir, rows, keys)
    with Runner() as runner:
        for i, (p, row) in enumerate(zip(planned, rows), 1):
            if row.status == "skipped-done":
                print(f"[{i}/{n}] {p.run.name}: done earlier, skipped", flush=True)
                continue
            if runner.stop_signal is not None:
                break
            # A run that is not done starts again from scratch: stale TensorBoard events
            # of an earlier attempt would mix into its curves and summary.
            shutil.rmtree(sweep_dir / "logs" / p.run.name, ignore_errors=True)
            (p.dir / ".done").unlink(missing_ok=True)
            print(f"[{i}/{n}] {p.run.name}: running (log: {p.log})", flush=True)
            outcome = runner.run([sys.executable, str(TRAIN), *p.argv], p.log)
            record(row, outcome, sweep_dir)
            if row.status == "done":
                write_done(p.dir, outcome, p.fingerprint, p.argv)
            write_summary(sweep_dir, rows, keys)
            print(f"[{i}/{n}] {p.run.name}: {row.status} (exit {outcome.exit_code}, "
                  f"{outcome.wall_s:.0f} s, loss/average {fmt(row.scalars.loss_average)})",
                  flush=True)
        stopped = runner.stop_signal
    csv_path, md_path = write_summary(sweep_dir, rows, keys)
    grid = write_grid(planned, rows, sweep_dir)
    print(f"\nsummary: {csv_path}\n         {md_path}" + (f"\ngrid:    {grid}" if grid else "")
          + f"\nTensorBoard: tensorboard --logdir {shlex.quote(str(sweep_dir / 'logs'))}")
    print(md_path.read_text(encoding="utf-8"))
    if stopped is not None:
        return 128 + stopped
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
